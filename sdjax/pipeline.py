"""A Stable Diffusion pipeline: the networks, their params, tokenizers and scheduler config.

`load_pipeline(source)` reads a diffusers-format folder or Hugging Face hub id: SD 1.x / 2.x
(`StableDiffusionPipeline`), SDXL (`StableDiffusionXLPipeline`: two text encoders) and the SDXL
refiner (`StableDiffusionXLImg2ImgPipeline` with only `text_encoder_2`). The component API
(`tokenize`, `encode_text`, `encode_prompt`, `predict_noise`, `vae_decode`, `vae_encode`) is
jit-compiled and NHWC, and takes numpy or jax arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from PIL import Image

from sdjax import aot, conditioning, masks, outputs, sampling, upscaling
from sdjax.checkpoints import embeddings as textual_inversion
from sdjax.checkpoints import hub, lora, single_file, standard
from sdjax.checkpoints import ip_adapter as ip_files
from sdjax.checkpoints.weights import (
  TEXT_PREFIX,
  WeightsError,
  flax_to_torch,
  read_state_dict,
  torch_key,
  torch_to_flax,
  write_safetensors,
)
from sdjax.models import config_utils
from sdjax.models.adapter import T2IAdapter, T2IAdapterConfig
from sdjax.models.clip import (
  CLIPTextConfig,
  CLIPTextModel,
  CLIPTextModelWithProjection,
  CLIPVisionConfig,
  CLIPVisionModelWithProjection,
)
from sdjax.models.controlnet import (
  ControlNetConfig,
  ControlNetModel,
  ControlNetUnionConfig,
  ControlNetUnionModel,
  union_control_type,
)
from sdjax.models.ip_adapter import ImageProjection
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Written beside a model sdjax trained (sdjax.training.recipe); its "prompt_grammar" says which
# prompts the model understands, and marks a model whose vocabulary is only its caption words.
TRAINING_SUMMARY = "sdjax_training.json"
# Optional, in a model folder: the sampling settings the model works best at, used by generate()
# and main.py for whatever the caller leaves unset: {"steps": 20, "guidance_scale": 4.0,
# "scheduler": "dpmpp_2m"} (any subset).
SAMPLING_DEFAULTS = "sdjax_defaults.json"
_DEFAULT_TYPES = {"steps": int, "guidance_scale": (int, float), "scheduler": str}
# Words as CLIP's tokenizer splits them (lowercased): letters, single digits, other symbols.
_WORDS = re.compile(r"[^\W\d_]+|\d|[^\w\s]+|_+")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
_SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                 "StableDiffusionXLInpaintPipeline")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class PipelineError(ValueError):
  """A pipeline that cannot be loaded: one line saying why."""


def parse_dtype(dtype) -> Any:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise PipelineError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
  return jnp.dtype(dtype).type if dtype is not None else jnp.float32


def _expected_params(module, *args):
  """The params `module` takes (shapes and dtypes only) for inputs shaped as `args`."""
  return _abstract_params(module, tuple(
      None if a is None else jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in args))


@functools.lru_cache(maxsize=16)
def _abstract_params(module, specs: tuple):
  """Tracing a model's init is most of loading a small one: once per architecture and input
  shapes in a process (a second pipeline of the same config, a reloaded one), and kept on disk
  beside the compiled programs for the next process."""
  def init(*args):
    return module.init(jax.random.key(0), *args)["params"]

  return aot.param_shapes(repr((module, specs)), lambda: jax.eval_shape(init, *specs))


# init is thousands of small random-number fusions that run once: XLA's optimising backend
# spends most of a tiny UNet's 20 s compile on them (10 s without; values within 1 ulp).
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True}


def init_params(module, *args, seed: int = 0):
  """Fresh random params for a module (training from scratch, tests)."""
  init = jax.jit(lambda key: module.init(key, *args)["params"])
  key = jax.random.key(seed)
  return init.lower(key).compile(compiler_options=_INIT_COMPILER_OPTIONS)(key)


def _unet_example(cfg: UNetConfig, after_context: tuple = ()) -> tuple:
  """Smallest valid positional inputs of a UNet of `cfg` (with `after_context`, a ControlNet's
  control image and scale, of a ControlNet): latents, timesteps, context, then what the config
  needs of text_embeds, time_ids, (context_bias,) timestep_cond."""
  s = cfg.downscale
  head = (jnp.zeros((1, s, s, cfg.in_channels)), jnp.zeros((1,)),
          jnp.zeros((1, 1, cfg.cross_attention_dim)), *after_context)
  tail = [None] * 4  # text_embeds, time_ids, context_bias, timestep_cond
  if cfg.addition_embed_type == "text_time":
    # Any split of add_embedding's input width into pooled text and one time id has its shapes.
    width = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
    tail[:2] = jnp.zeros((1, width)), jnp.zeros((1, 1))
  if cfg.time_cond_proj_dim is not None:
    tail[3] = jnp.zeros((1, cfg.time_cond_proj_dim))
  while tail and tail[-1] is None:
    tail.pop()
  return (*head, *tail)


def _example_inputs(unet_cfg: UNetConfig, text_cfg: CLIPTextConfig | None, vae_cfg: VAEConfig,
                    text_cfg_2: CLIPTextConfig | None = None):
  """Smallest valid inputs, for shape inference of each network's param tree."""
  out = {"unet": _unet_example(unet_cfg),
         "vae": (jnp.zeros((1, vae_cfg.downscale, vae_cfg.downscale, vae_cfg.in_channels)),)}
  for name, cfg in (("text_encoder", text_cfg), ("text_encoder_2", text_cfg_2)):
    if cfg is not None:
      out[name] = (jnp.zeros((1, cfg.max_position_embeddings), jnp.int32),)
  return out


# stable-diffusion-x4-upscaler's latent scale (its VAE's), which diffusers' upscale pipeline
# imposes on any VAE it is given.
X4_SCALING_FACTOR = 0.08333


@dataclasses.dataclass(eq=False)
class Pipeline:
  """The networks (Flax modules), their params, the tokenizer and the scheduler config."""

  text_encoder: CLIPTextModel | None  # None for the SDXL refiner
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  params: dict[str, Any]
  tokenizer: Any
  scheduler_config: dict[str, Any]
  name: str = "sdjax"
  # SDXL: the second text encoder (with projection) and its tokenizer; model_index options.
  text_encoder_2: CLIPTextModelWithProjection | None = None
  tokenizer_2: Any = None
  force_zeros_for_empty_prompt: bool = False
  requires_aesthetics_score: bool = False
  # The x4 upscaler (StableDiffusionUpscalePipeline): the DDPM config that noises its low-res
  # images, and the highest noise level it takes.
  low_res_scheduler_config: dict[str, Any] | None = None
  max_noise_level: int = 350
  # Textual-inversion embeddings by token (`checkpoints.embeddings.Embedding`: vectors per
  # text encoder); their tokens are already in the tokenizer and the embedding table.
  embeddings: dict[str, Any] = dataclasses.field(default_factory=dict)
  prompt_grammar: str | None = None  # set for models trained on a fixed caption grammar
  sampling_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
  # ControlNets (and T2I-Adapters) steering the UNet, see `with_controlnet`;
  # params["controlnet"]: theirs.
  controlnet: tuple[ControlNetModel | T2IAdapter, ...] | None = None
  # IP-Adapters conditioning the UNet on images, see `with_ip_adapter`: per adapter (image
  # encoder, image projection); params["ip_adapter"]: theirs.
  ip_adapter: tuple[tuple[CLIPVisionModelWithProjection, ImageProjection], ...] | None = None

  # -- properties -------------------------------------------------------------------------------
  @property
  def dtype(self):
    return self.unet.dtype

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2 is not None

  @property
  def networks(self) -> conditioning.Networks:
    return conditioning.Networks(self.text_encoder, self.text_encoder_2, self.unet, self.vae,
                                 self.controlnet, self.ip_adapter)

  def with_ip_adapter(self, ip_adapter: IPAdapter | Sequence[IPAdapter],
                      layer_scales=None) -> Pipeline:
    """This pipeline with the networks and params of an IP-Adapter, or of several (each
    attended to on its own, their outputs summed), in its own, after checking each fits the
    UNet. `layer_scales`: per adapter, None or a per-layer scale dict (`ip_layer_scales`)."""
    adapters = as_ip_adapters(ip_adapter)
    layer_scales = [None] * len(adapters) if layer_scales is None else list(layer_scales)
    layers: dict[str, Any] = {}
    for i, (adapter, scales) in enumerate(zip(adapters, layer_scales, strict=True)):
      layers = conditioning.merge_params(layers, adapter.layer_tree(self, i, scales))
    return dataclasses.replace(
        self, ip_adapter=tuple((a.image_encoder, a.projection) for a in adapters),
        params={**self.params, "ip_adapter": {
            "image": tuple({"image_encoder": a.params["image_encoder"],
                            "image_proj": a.params["image_proj"]} for a in adapters),
            "layers": layers}})

  def with_controlnet(self, controlnet: ControlNet | Sequence[ControlNet]) -> Pipeline:
    """This pipeline with the networks and params of a ControlNet, or of several (their
    residuals summed, in order), in its own (main.py's runs), after checking each fits the
    UNet."""
    nets = as_controlnets(controlnet)
    for net in nets:
      net.check_fits(self)
    models = [net.model for net in nets]
    if len(models) > 1:  # a union among several: diffusers' MultiControlNetUnionModel's scaling
      models = [m.clone(from_multi=True) if isinstance(m, ControlNetUnionModel) else m
                for m in models]
    return dataclasses.replace(self, controlnet=tuple(models),
                               params={**self.params,
                                       "controlnet": tuple(net.params for net in nets)})

  @property
  def vae_scale(self) -> int:
    return self.vae.config.downscale

  @property
  def scaling_factor(self) -> float:
    return self.vae.config.scaling_factor

  @property
  def native_size(self) -> int:
    """Image side the UNet was trained at (pixels)."""
    return (self.unet.config.sample_size or 64) * self.vae_scale

  @property
  def max_length(self) -> int:
    return (self.text_encoder or self.text_encoder_2).config.max_position_embeddings

  # -- component API ------------------------------------------------------------------------------
  def tokenize(self, prompts) -> np.ndarray:
    """Prompts -> int32 token ids [B, 77], padded and truncated as Stable Diffusion does."""
    if self.tokenizer is None:
      return self.tokenize_2(prompts)
    return _tokenize(self.tokenizer, prompts, self.max_length, self.embeddings)

  def tokenize_2(self, prompts) -> np.ndarray:
    """As `tokenize`, with SDXL's second tokenizer (the one for `text_encoder_2`)."""
    if self.tokenizer_2 is None:
      raise ValueError("this pipeline has no second tokenizer (not SDXL)")
    return _tokenize(self.tokenizer_2, prompts,
                     self.text_encoder_2.config.max_position_embeddings, self.embeddings)

  def encode_prompt(self, prompts, negative_prompts=None, prompts_2=None,
                    negative_prompts_2=None, clip_skip: int | None = None):
    """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
    negative_pooled_prompt_embeds) as diffusers' pipelines' `encode_prompt` with guidance.

    SD 1.x / 2.x: the text encoder's output, the pooled ones None. SDXL: both encoders'
    penultimate hidden states concatenated and the second's projected pooled state; with no
    negative prompt and `force_zeros_for_empty_prompt`, zeros. `clip_skip` applies to the
    prompts only, as in diffusers.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = sampling._as_list(negative_prompts, len(prompts), "negative_prompts")  # noqa: SLF001
    conditioning.check_clip_skip(self.networks, clip_skip)
    cond = sampling.make_conditioning(self, prompts, negatives, prompts_2=prompts_2,
                                      negative_prompts_2=negative_prompts_2,
                                      size=(self.native_size, self.native_size))
    negative, positive = _encode_prompt(self.networks, self._text_params(),
                                        jax.tree.map(jnp.asarray, cond), clip_skip)
    return positive.context, negative.context, positive.text_embeds, negative.text_embeds

  def _text_params(self):
    return {k: v for k, v in self.params.items() if k.startswith("text_encoder")}

  def unknown_words(self, prompts) -> list[str]:
    """The words of `prompts` that the tokenizer's vocabulary does not hold whole, in order of
    first appearance (they become sub-word or byte pieces). Only meaningful for a model whose
    vocabulary is its training captions' words (`prompt_grammar` set)."""
    if isinstance(prompts, str):
      prompts = [prompts]
    from sdjax import prompts as prompt_syntax  # noqa: PLC0415

    vocab = self.tokenizer.get_vocab()
    unknown = {}
    for prompt in prompts:
      try:  # the words, without A1111 emphasis syntax: "(red:1.2)" -> "red"
        text = " ".join(t for t, w in prompt_syntax.parse_prompt_attention(prompt) if w >= 0)
      except ValueError:
        text = prompt
      for word in _WORDS.findall(text.lower()):
        # Every CLIP vocabulary holds each single byte as a word end ("x</w>", ",</w>"): a lone
        # letter or digit may be a word, a lone symbol is punctuation no caption had.
        if word + "</w>" not in vocab or not (len(word) > 1 or word.isalnum()):
          unknown[word] = None
    return list(unknown)

  def encode_text(self, ids, clip_skip: int | None = None) -> jax.Array:
    """Token ids [B, 77] -> prompt embeddings [B, 77, D] (the last hidden state by default)."""
    return _encode_text(self.text_encoder, self.params["text_encoder"], jnp.asarray(ids),
                        clip_skip)

  def predict_noise(self, x, t, ctx, text_embeds=None, time_ids=None,
                    timestep_cond=None) -> jax.Array:
    """UNet output [B, h, w, 4] for latents x [B, h, w, 4], timesteps t [B], context ctx.

    SDXL also takes diffusers' `added_cond_kwargs`: `text_embeds` [B, P], `time_ids` [B, K];
    an LCM-distilled UNet `timestep_cond` [B, time_cond_proj_dim]
    (`conditioning.guidance_embedding`).
    """
    x = jnp.asarray(x)
    self._check_latent_size(x.shape[1:3])
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    if self.unet.config.addition_embed_type and (text_embeds is None or time_ids is None):
      raise ValueError("this SDXL UNet needs text_embeds and time_ids")
    extra = (None, None) if text_embeds is None else (
        jnp.asarray(text_embeds), jnp.asarray(time_ids, jnp.float32))
    if self.unet.config.time_cond_proj_dim is not None and timestep_cond is None:
      raise ValueError("this LCM UNet (time_cond_proj_dim) needs timestep_cond")
    cond = None if timestep_cond is None else jnp.asarray(timestep_cond, jnp.float32)
    return _predict_noise(self.unet, self.params["unet"], x, t, jnp.asarray(ctx), *extra, cond)

  def vae_decode(self, z) -> jax.Array:
    """Latents [B, h, w, 4] (already divided by the scaling factor) -> images [B, H, W, 3]."""
    return _vae_decode(self.vae, self.params["vae"], jnp.asarray(z))

  def vae_encode(self, x) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> posterior mean latents [B, h, w, 4] (unscaled)."""
    return _vae_encode(self.vae, self.params["vae"], jnp.asarray(x))

  def _check_latent_size(self, hw) -> None:
    s = self.unet.config.downscale
    if hw[0] % s or hw[1] % s:
      raise ValueError(
          f"latent size {hw[0]}x{hw[1]} must be a multiple of {s} for this UNet "
          f"(image size a multiple of {s * self.vae_scale})"
      )

  # -- sampling ----------------------------------------------------------------------------------
  def generate(self, prompts, *, negative_prompts=None, steps: int | None = None,
               guidance_scale: float | None = None, scheduler: str | None = None,
               scheduler_options: dict | None = None, sigmas=None, timesteps=None,
               schedule_type: str | None = None, height: int | None = None,
               width: int | None = None, seed: int = 0,
               latents=None, init_images=None, mask_images=None,
               strength: float | None = None, mask_blur: float = 0.0,
               padding_mask_crop: int | None = None, mask_overlay: bool = False,
               masked_content: str = "original", guidance_rescale: float = 0.0,
               guidance_rescale_form: str = "diffusers",
               clip_skip: int | None = None,
               prompts_2=None, negative_prompts_2=None,
               original_size: tuple[int, int] | None = None,
               crops_coords_top_left: tuple[int, int] = (0, 0),
               target_size: tuple[int, int] | None = None,
               negative_original_size: tuple[int, int] | None = None,
               negative_crops_coords_top_left: tuple[int, int] = (0, 0),
               negative_target_size: tuple[int, int] | None = None,
               aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
               refiner: Pipeline | None = None, refiner_start: float | int = 0.8,
               refiner_switch: str = "diffusers", hires_refiner: str = "second pass",
               eta: float = 0.0, prompt_syntax: str = "plain",
               embeddings=None, cfg_parallel: bool = False,
               emphasis: str = "Original", hires_scale: float | None = None,
               hires_steps: int | None = None, hires_strength: float = 0.7,
               hires_upscaler: str | upscaling.Upscaler = "latent", hires_prompts=None,
               hires_negative_prompts=None,
               hires_resize: tuple[int, int] | None = None, hires_scheduler: str | None = None,
               hires_guidance_scale: float | None = None, hires_model: Pipeline | None = None,
               hires_schedule_type: str | None = None,
               controlnet: ControlNet | Sequence[ControlNet] | None = None,
               control_images=None, hires_control_images=None,
               controlnet_conditioning_scale: float | Sequence[float] = 1.0,
               control_guidance_start: float | Sequence[float] = 0.0,
               control_guidance_end: float | Sequence[float] = 1.0,
               guess_mode: bool = False,
               control_mode: str | Sequence[str] = "balanced",
               ip_adapter: IPAdapter | Sequence[IPAdapter] | None = None,
               ip_adapter_images=None, ip_adapter_scale=1.0,
               ip_adapter_masks=None, pag_scale: float = 0.0, pag_adaptive_scale: float = 0.0,
               pag_applied_layers: str | Sequence[str] = "mid", freeu=None,
               freeu_form: str = "diffusers",
               token_merging_ratio: float = 0.0, hires_token_merging_ratio: float | None = None,
               inpainting_mask_weight: float = 1.0, inpaint_blend: str = "diffusers",
               image_encode: str = "sample", grow_mask_by: int | None = None,
               soft_inpainting: Any = None, differential_diffusion: float | None = None,
               tiling: bool | str = False, rng: str = "jax", subseed: int | None = None,
               subseed_strength: float = 0.0, ensd: int = 0,
               seed_resize_from: tuple[int, int] | None = None, s_min_uncond: float = 0.0,
               s_min_uncond_all: bool = False, skip_early_cond: float = 0.0,
               pad_cond_uncond: bool = False, pad_cond_uncond_v0: bool = False,
               old_prompt_editing_timelines: bool = False,
               brownian: str | None = None, step_rng: str | None = None,
               seed_high: int = 0, noise_multiplier: float = 1.0,
               extra_noise: float = 0.0, noise_batch: int = 1,
               image_guidance_scale: float | None = None, depth_maps=None,
               noise_level: int | None = None) -> np.ndarray:
    """Text-to-image generation, or image-to-image with `init_images` (inpainting with
    `mask_images` too; an instruct-pix2pix model edits them as its prompts say).

    Args:
      prompts: a prompt or a list of them; one image each.
      negative_prompts: what guidance steers away from (default: the empty prompt).
      steps: denoising steps (default: the model folder's `sdjax_defaults.json`, else 50).
      guidance_scale: classifier-free guidance scale; <= 1 skips the unconditional half
        (default: the model folder's `sdjax_defaults.json`, else 7.5).
      scheduler: one of `sdjax.schedulers.SCHEDULERS`; default: the model folder's
        `sdjax_defaults.json`, else the checkpoint's own.
      scheduler_options: options of the scheduler's config to override, as diffusers'
        `Scheduler.from_config(config, **options)`: e.g. `{"timestep_spacing": "trailing"}`
        (SDXL Lightning, Turbo), `{"use_karras_sigmas": True}` (euler); an option the scheduler
        does not have is an error.
      sigmas: the noise levels to step through, as diffusers' `pipe(sigmas=...)`: n + 1
        descending values for n steps (`steps` may be left out), the last where the final step
        lands (0; Euler and Euler a take any); replaces the scheduler's own placement (of the
        first pass: a hires pass keeps its scheduler's). For the sigma schedulers (euler,
        euler_ancestral, heun, lms, kdpm2*, dpmpp_*, unipc).
      timesteps: the training timesteps to step through, as diffusers' `pipe(timesteps=...)`:
        n descending values for n steps (`steps` may be left out), their noise levels read off
        the training schedule, the final one the scheduler's own (diffusers' Align Your Steps
        recipe: `timesteps=AysSchedules["StableDiffusionTimesteps"]` with dpmpp_2m_sde). For
        euler, euler_ancestral, heun, dpmpp_*, ddpm, lcm and tcd (all but the first three take
        them as integers, as diffusers).
      schedule_type: one of A1111's schedule types that diffusers lacks, for the same
        schedulers (`sdjax.schedulers.sigma_schedules.SCHEDULE_TYPES`): "align_your_steps"
        (NVIDIA's levels for SD1.5, or SDXL's for an SDXL model), "sgm_uniform", "normal",
        "uniform", "simple", "kl_optimal" (Euler only: it ends above 0); and "karras",
        "exponential", "beta" (A1111's Karras, Exponential, Beta): diffusers' spacing options
        `use_karras_sigmas` etc., for the schedulers that have them.
      height, width: image size in pixels (default: the model's native size).
      seed: image i uses seed `seed + i` for all of its randomness.
      rng: where that randomness comes from: "jax" (each seed's JAX key, split into independent
        streams), or "torch_cpu": each seed's torch CPU generator, drawn in turn as diffusers'
        pipelines draw from `generator=[torch.Generator().manual_seed(s) for s in seeds]` (a
        refiner after the base's draws), so diffusers' seeds make the same images here; also
        AUTOMATIC1111's "RNG source: CPU" (its hires pass starts the seed's generator again);
        or "nv": each seed's A1111 NV generator, drawn in turn as A1111 draws: its "RNG source:
        NV", which is torch's CUDA generator, A1111's default "GPU" source on NVIDIA GPUs (to a
        few float32 ulps), so A1111's seeds make its images here. An upscaler's encoding and
        what diffusers lacks stay JAX's.
      brownian: where an SDE sampler's (dpmpp_sde, dpmpp_2m_sde, dpmpp_2m_sde_heun,
        dpmpp_3m_sde) step noise comes from: None, fresh draws from `rng` (dpmpp_sde: its own
        Brownian-consistent construction); or k-diffusion's Brownian tree (torchsde's),
        one per image seeded by its seed, as A1111, ComfyUI and diffusers' DPMSolverSDEScheduler
        make it, on the tree's device: "nv" (a CUDA generator: A1111 and diffusers on an NVIDIA
        GPU, ComfyUI's *_gpu samplers) or "torch_cpu" (ComfyUI's other SDE samplers, diffusers
        on CPU). Independent of `rng`, which makes the initial noise. Each schedule compiles
        its own program (the tree's shape follows the noise levels).
      step_rng: a generator of its own for the steps' fresh noise (ancestral and SDE samplers'),
        seeded by each image's seed and drawn from its first draw: "nv" (CUDA's: ComfyUI's
        ancestral samplers on an NVIDIA GPU, with its CPU initial noise: rng="torch_cpu") or
        "torch_cpu"; None: `rng`'s (after the initial noise).
      noise_multiplier: A1111's "Noise multiplier for img2img": an img2img or inpainting run's
        initial noise times this before it noises the init images (1: off).
      extra_noise: A1111's "Extra noise multiplier for img2img and hires fix": such a pass's
        start gets its noise again, times this, in k-diffusion's x (0: off).
      noise_batch: ComfyUI's batches (with rng="torch_cpu"): the images come in batches of
        this many that draw their noise from one seed at once (torch.randn of the batch's
        latents), image k of a batch its k-th slice; batch j takes seed + j (1: one draw per
        image, seed + i).
      seed_high: the high 32 bits of the seeds (`seed` gives the low ones): ComfyUI's seeds are
        64-bit, and what takes a seed whole uses them (the Brownian tree's SeedSequence, CUDA's
        generator key); torch's CPU generator and JAX's keys take the low 32 bits.
      subseed, subseed_strength: A1111's variation seeds ("Variation seed", "Variation
        strength"): image i's initial noise (and hires noise) is moved towards that of seed
        `subseed + i` along A1111's slerp, by the strength in [0, 1] (0: off).
      ensd: A1111's Eta noise seed delta ("ENSD", e.g. 31337): the steps' fresh noise (ancestral
        and SDE samplers') comes from seed + ensd's generator (or key) instead of the seed's.
      seed_resize_from: A1111's "Resize seed from" (width, height): the initial (and hires)
        noise is that of each seed at that size, pasted at the centre of its own (the rest its
        own), so a seed keeps its composition at another size.
      s_min_uncond, s_min_uncond_all, skip_early_cond: A1111's settings that leave the
        negative prompt out of some UNet calls, running the prompt's rows alone there (faster;
        the image follows the prompt unguided at those calls): "Negative Guidance minimum sigma"
        (NGMS, 0: off) at every other call (every call with `s_min_uncond_all`) whose noise
        level is below it (DDIM, PLMS, UniPC: whose timestep is); "Ignore negative prompt during
        early sampling" (Skip Early CFG) at the calls of the first fraction of the run (0: off).
        See `sampling.CfgSkip`.
      pad_cond_uncond: A1111's "Pad prompt/negative prompt" (Pad conds), with
        prompt_syntax="a1111": where an image's prompt and negative prompt have different
        chunk counts, the shorter goes on with empty-prompt chunks (else the shorter attends to
        its own length only, A1111's default). `pad_cond_uncond_v0` ("Pad conds v0", before 1.6)
        instead fits the negative prompt to the prompt: its last vector repeated, or cut.
      old_prompt_editing_timelines: A1111's "Old prompt editing timelines" (its counting before
        1.6; prompt_syntax="a1111"): in `[a:b:when]` a number below 1 is a fraction of the steps
        and any other a step (`1.0`: step 1), and the hires pass schedules as the first.
      latents: NHWC unit Gaussian initial noise [N, h, w, 4] (as diffusers' `latents`, before
        scaling by the scheduler's initial sigma); default: drawn from the seeds.
      init_images: float [N, H, W, 3] in [0, 1] to start from (img2img).
      mask_images: float [N, H, W] (or [N, H, W, 1]) in [0, 1], with `init_images`: inpaint
        where the mask is >= 0.5, as diffusers' StableDiffusionInpaintPipeline. An inpainting
        model (9-channel UNet: sd-v1-5-inpainting, stable-diffusion-2-inpainting) sees the
        mask and the masked image; another model keeps the latents outside the mask to the
        image's, noised to each step. An inpainting model given no mask repaints everything,
        as A1111 runs it (no init_images either: text-to-image from pure noise).
        An instruct-pix2pix model (8-channel UNet: timbrooks/instruct-pix2pix) edits
        `init_images` as each prompt says ("make it snowy"), as diffusers'
        StableDiffusionInstructPix2PixPipeline: every UNet call sees the images' latents too.
      image_guidance_scale: an instruct-pix2pix model's image guidance (A1111's "Image CFG
        Scale"; default 1.5): how closely the edit keeps to the image. With guidance_scale > 1
        each call runs the prompt with the image, the negative prompt with the image and
        without, as uncond + guidance_scale * (text - image) + image_guidance_scale *
        (image - uncond).
      depth_maps: a depth-to-image model's (5-channel UNet: stable-diffusion-2-depth) depth of
        each of `init_images`, float [N, h, w] of any size, larger nearer (a depth estimator's
        output, e.g. DPT-Hybrid's; sdjax has none), as diffusers'
        StableDiffusionDepth2ImgPipeline's `depth_map`: resized to the latents and brought to
        [-1, 1], every UNet call sees it.
      noise_level: an x4 upscaler's (stable-diffusion-x4-upscaler: its UNet takes the low-res
        image too) noise level for `init_images`, the low-res images (the output is the VAE's
        scale, 4 times, larger): 0 to the model's max_noise_level (350), default 20, as
        diffusers' StableDiffusionUpscalePipeline; more lets the model invent more detail.
      strength: img2img: how much of the schedule to run (1.0 ignores the image; default 0.8,
        1.0 when inpainting or editing, as diffusers' pipelines; an instruct-pix2pix edit at
        strength 1 starts from pure noise, below it from the image noised, as A1111's img2img).
      mask_blur, padding_mask_crop, mask_overlay: inpainting as A1111 (see `sdjax.masks`): the
        masks' Gaussian blur radius in pixels ("Mask blur"; diffusers' `mask_processor.blur`);
        "Only masked" with this padding (diffusers' `padding_mask_crop`): the masked box of
        each image, widened to `height`:`width` (default: the model's size), is inpainted at
        that size and pasted back, and `init_images` may have any size, which the results keep;
        with the whole picture, paste the original back outside the mask (blended where a
        blurred mask is grey). With any of these, images and masks are taken as 8-bit, as
        image files are, and the results are 8-bit levels too.
      masked_content: what the masked area starts from, A1111's "Masked content"
        (`masks.MASKED_CONTENT`): "original" (the image), "fill" (the colours around it),
        "latent noise" or "latent nothing" (the filled image's latents there replaced by the
        initial noise or zeros); all but "original" change only what strength < 1 starts from
        (and what an inpainting model sees where a blurred mask is grey).
      guidance_rescale: rescales guided noise towards the conditional one's std (0 = off).
      guidance_rescale_form: "diffusers" (above: on the model's output) or "comfyui", ComfyUI's
        RescaleCFG node (its multiplier the guidance_rescale): on the v-space it builds from
        the denoised predictions at each call's noise level (`sampling.comfyui_rescale`; for a
        v-prediction model that is diffusers' rescale). k-diffusion samplers that take
        ComfyUI's inpainting blend; not with cfg_parallel, PAG or instruct-pix2pix.
      clip_skip: condition on the text encoder's output this many layers before the last.
      prompts_2, negative_prompts_2: SDXL: prompts for the second text encoder (default: the
        same as `prompts` / `negative_prompts`).
      original_size, crops_coords_top_left, target_size, negative_*: SDXL micro-conditioning,
        (height, width) / (top, left), as diffusers' arguments of the same names.
      aesthetic_score, negative_aesthetic_score: the refiner's aesthetic conditioning.
      refiner: an SDXL refiner pipeline: the base denoises until `refiner_start` of the schedule
        (a fraction: diffusers' `denoising_end`; an int: after that many steps, as ComfyUI's
        KSamplerAdvanced pair's end_at_step / start_at_step) and the refiner finishes from its
        latents (`denoising_start`), with the same steps, scheduler and guidance. With the hires
        fix the refiner takes over the hires pass at `refiner_start` (a fraction) of its
        schedule, as A1111's refiner does by default ("Hires refiner: second pass"): the first
        pass is the base's alone; the refiner gets the hires prompts, size and guidance.
      hires_refiner: with the hires fix, which pass the refiner finishes, as A1111's "Hires
        refiner" setting: "second pass" (above), "first pass" (the first pass as without the
        hires fix, `refiner_start` a fraction or a step; the refiner's latents, or its decoded
        images for a pixel upscaler, go to the hires pass, which the base runs alone) or "both
        passes".
      refiner_switch: "diffusers" (the refiner's sampler starts afresh where the base stopped)
        or "a1111" (AUTOMATIC1111's switch inside its sampler loop: the refiner takes over from
        the first model call whose level's nearest training timestep t has (999 - t) / 1000 >=
        refiner_start, the sampler's history and Brownian tree running on).
      eta: DDIM's stochasticity (diffusers' `eta`; 0 is deterministic DDIM, 1 DDPM-like); its
        step noise comes from each image's seed. `tcd` takes it as its gamma (in [0, 1]; its
        authors suggest 0.3); no other scheduler does.
      prompt_syntax: "plain" (diffusers: text truncated at 77 tokens) or "a1111" (AUTOMATIC1111's
        weights, long prompts, BREAK, prompt editing and alternation, composable `AND` /
        `:weight` parts; see `sdjax.prompts`).
      embeddings: a1111: textual-inversion vectors {trigger word: float [n, D]}.
      emphasis: a1111: A1111's emphasis mode, "Original" (weights, then each chunk's mean
        restored), "No norm" (weights only; A1111 suggests it for SDXL), "Ignore" (weights
        parsed, not applied) or "None" (brackets and BREAK read as plain text).
      cfg_parallel: make each guidance pair's two UNet calls on the first two devices, one each
        (about half an image's time per step where one device is not kept busy: a CPU split
        with `sdjax.parallel.set_cpu_devices(2)` before JAX starts, or two GPUs). With one
        device the same split program runs there: the pixels never depend on the device count,
        and differ from the default's by float rounding.
      hires_scale: A1111's hires fix: the text-to-image latents are enlarged this
        many times (`hires_upscaler`: one of A1111's latent upscalers, as torch's interpolate
        makes them: "latent" (bilinear), "latent-antialiased", "latent-bicubic",
        "latent-bicubic-antialiased", "latent-nearest", "latent-nearest-exact"; or its pixel
        upscalers "lanczos", "nearest" and "none": the decoded images as 8-bit levels resized as
        A1111's Pillow resizes them, then encoded; or a model upscaler, `sdjax.load_upscaler`'s
        (ESRGAN, Real-ESRGAN files: A1111's tiled passes and Lanczos, `sdjax.upscaling`); each
        side rounded down to a size the model takes) and denoised again at that size as img2img at
        `hires_strength` for `hires_steps` steps (default: `steps`), which run as A1111 runs
        them: the last `hires_steps` of a schedule of int(hires_steps / hires_strength) steps.
        `hires_resize=(width, height)` instead enlarges to that size (A1111's "Resize width to",
        "Resize height to"; 0 keeps the aspect; both: the latents enlarged to cover it, the
        excess cut from both ends). `hires_scheduler` (A1111's Hires sampler) runs the second
        pass (default: `scheduler`), its noise levels placed by `hires_schedule_type` (A1111's
        Hires schedule type, as `schedule_type`, or "automatic": the scheduler's own; default:
        the first pass's), at `hires_guidance_scale` (Forge's Hires CFG Scale;
        default: `guidance_scale`), with the same prompts unless
        `hires_prompts` / `hires_negative_prompts` (A1111's "Hires prompt", per prompt or one
        for all; with SDXL, both encoders') are given; both passes stay on device. SDXL's
        default original and target sizes are each pass's own (as A1111 conditions its hires pass);
        a `refiner` takes the hires pass over (see `refiner`). `hires_model` (A1111's Hires
        checkpoint): another pipeline of the
        same latents (an SD1 fine-tune after an SD1 model, say) runs the second pass: its UNet,
        text encoders (the prompts encoded again), schedule and VAE (the decode); the
        ControlNets and IP-Adapters given steer it too, LoRAs merged into it only if its
        pipeline has them (`add_extras`).
      controlnet, control_images: a `load_controlnet` ControlNet steering text-to-image,
        img2img or inpainting by control images (edges, pose, depth, ... as the ControlNet was
        trained on: float [N or 1, H, W, 3] in [0, 1], the image size; with
        `padding_mask_crop`, the init images' size, cut as they are), as diffusers'
        StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline (and their
        img2img and inpainting pipelines). A list of ControlNets takes a list of control
        images, one entry per ControlNet; their residuals are summed in order (diffusers'
        MultiControlNetModel). With `refiner` the ControlNet steers the base's steps (its share
        of the steps counted over the whole schedule, as diffusers' base with
        `denoising_end`); with `hires_scale` both passes (A1111's ControlNet extension), the
        second by `hires_control_images` at its size (default: `control_images` enlarged
        bilinearly), its share of the steps counted over the second pass's. A T2I-Adapter
        (`load_adapter`) goes where a ControlNet goes, alone or in the list: its feature maps,
        times its scale, are added inside the UNet's down path (diffusers'
        StableDiffusionAdapterPipeline; `adapter_conditioning_factor` is
        `control_guidance_end`); a one-channel adapter takes [N or 1, H, W, 1].
      controlnet_conditioning_scale: the weight of the ControlNet's residuals (a list: one per
        ControlNet).
      control_guidance_start, control_guidance_end: the share of the steps, from and to, in which
        the ControlNet acts (diffusers' arguments; a list: one per ControlNet).
      guess_mode: diffusers' guess mode: the ControlNets act on the conditional half of
        classifier-free guidance only, their residuals scaled from 0.1 (the first) to 1 (the
        mid one), for control images without a prompt to match. On by itself for a ControlNet
        with pooled conditions (the shuffle model), as in diffusers.
      control_mode: A1111's ControlNet "Control Mode" (one, or one per ControlNet): "balanced";
        "prompt" ("My prompt is more important": the residuals softened, the j-th of a
        ControlNet's times 0.825^(12-j), an adapter's feature maps times 0.25, 0.62, 0.825, 1);
        "controlnet" ("ControlNet is more important": softened, and on the conditional half of
        guidance only). A1111's names are taken too. Not with `guess_mode`.
      ip_adapter, ip_adapter_images: a `load_ip_adapter` IP-Adapter conditioning the UNet on
        an image as well as the prompt (diffusers' `load_ip_adapter` + `ip_adapter_image`),
        or a list of them with a list of one entry per adapter. An entry: a PIL image or float
        [H, W, 3] in [0, 1] for every prompt, float [N, H, W, 3] one per prompt, or a list of
        images whose tokens the UNet attends to together (any sizes: CLIP's image processor
        resizes and crops them). Not with `refiner`'s stage (the base's steps have it).
      ip_adapter_scale: the weight of the adapter's attention (diffusers'
        `set_ip_adapter_scale`): a number; or a dict of per-layer weights, InstantStyle's
        {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}} (layers it leaves
        out: 0); a list: one per adapter.
      ip_adapter_masks: where each adapter's images act (diffusers' `ip_adapter_masks`, as
        `IPAdapterMaskProcessor` prepares them): per adapter None, or one mask per image of its
        entry (a single mask for a single image), each a PIL image or float [H, W] / [H, W, C]
        in [0, 1] (8-bit levels), made grey, Lanczos-resized to the output size and cut at 0.5.
        With masks, each image is attended to on its own and its output kept where its mask
        is white (downsampled to each layer); a list of one entry per adapter with several.
      pag_scale, pag_adaptive_scale, pag_applied_layers: perturbed-attention guidance
        (diffusers' PAG pipelines; Forge's and ComfyUI's PAG), on when `pag_scale` > 0: the
        conditional prediction is made again with identity self-attention in the layers
        `pag_applied_layers` names (regular expressions searched in the self-attention layers'
        diffusers names: "mid", "down_blocks.2", "up_blocks.0.attentions.1", ...) and the
        guided prediction moves `pag_scale` times away from it, at timestep t by
        max(pag_scale - pag_adaptive_scale * (1000 - t), 0). One more UNet pass per step;
        text-to-image, img2img, inpainting and the hires pass, with ControlNets and IP-Adapters
        acting on every pass (not a refiner's stage, nor with guess mode, composable prompts or
        cfg_parallel yet).
      freeu: FreeU, as diffusers' `enable_freeu(s1, s2, b1, b2)`: a dict of those names, or the
        four numbers in that order (e.g. SD1.5: s1=0.9, s2=0.2, b1=1.5, b2=1.6; SDXL: 0.6, 0.4,
        1.1, 1.2, FreeU's authors' values). In the UNet's first two up blocks, half the
        backbone's channels are scaled by b1 / b2 and the skip features' lowest frequencies by
        s1 / s2. Every pass of this call (not a refiner's stage); None: off.
      freeu_form: "diffusers" (above), "comfyui" or "comfyui_v2": ComfyUI's FreeU / FreeU_V2
        nodes, which scale by (b1, s1) / (b2, s2) every up-block layer whose backbone input has
        4 / 2 times the UNet's first channels, whichever up block it is in (SD1.5: b1 in the
        first two and the third's first layer, b2 in the third's others and the fourth's
        first), V2 the backbone by (b - 1) times its channel mean min-max normalised per image,
        plus 1.
      token_merging_ratio: A1111's "Token merging ratio" (ToMe SD, tomesd's patch as A1111
        applies it, `models.token_merging`): in the UNet's full-resolution transformer blocks
        the self-attention runs over the tokens left after merging that share of them into
        their most similar ones (0: off; below 1). Faster at large sizes, a slightly different
        image. hires_token_merging_ratio: the hires pass's ("Token merging ratio hr"; None:
        the same).
      inpainting_mask_weight: an inpainting model's A1111 "Conditional mask weight" (its
        "Inpainting conditioning mask strength" setting): the masked image it sees is
        lerp(image, image * (1 - mask), weight) in [-1, 1], so below 1 the masked area shows
        through, faded; 1 (the default, diffusers'): hidden.
      inpaint_blend: how inpainting keeps the image outside the mask (`sampling.INPAINT_BLENDS`):
        "diffusers" (the default: an inpainting model's UNet alone; another model's latents
        outside the mask reset to the image's, noised, after each step) or "a1111", as A1111
        inpaints with any model: its latent mask (PIL's bicubic resize of the 8-bit mask,
        rounded) blends the image's latents into each call's denoised prediction (into its
        DDIM / PLMS / UniPC model input) and into the final latents; or "comfyui", as ComfyUI's
        KSampler samples a latent noise mask (the mask's bilinear resize, unrounded; the latents
        plus sigma times the initial noise into each model input, the latents into each
        denoised prediction, nothing after the loop; an inpainting model's UNet inputs as its
        InpaintModelConditioning makes them: the mask rounded half to even).
      grow_mask_by: with inpaint_blend "comfyui", ComfyUI's VAEEncodeForInpaint (its
        grow_mask_by, 0-64; ComfyUI's default 6): the image's latents are those of the image
        with the rounded mask's pixels mid grey (an inpainting model's masked image latents
        too), and the mask blended with (and an inpainting model's) is the rounded mask grown
        by that many pixels; None (the default): the image as it is (its SetLatentNoiseMask or
        InpaintModelConditioning).
      soft_inpainting: with inpaint_blend "a1111", A1111's Soft inpainting (its built-in
        extension; for soft, blurred masks): "on" (its defaults), a `masks.SoftInpainting` or
        its six numbers (schedule bias, preservation strength, transition contrast boost, mask
        influence, difference threshold, difference contrast). The latent mask is not rounded,
        each blend keeps the latents' magnitude and weighs the original by the mask raised to
        sigma^bias * preservation, nothing is blended after the loop, and the original is
        pasted back where the final latents moved little from the image's (an overlay mask
        made from their distance, `masks.soft_overlay`) rather than by the mask.
      differential_diffusion: with inpaint_blend "comfyui", ComfyUI's DifferentialDiffusion
        node's strength (0-1; its default 1): at each call the blend's mask is where the mask
        reaches the call's timestep over the run's first (a grey mask's lighter parts join the
        repainting later), mixed with the mask itself by 1 - strength; None: off.
      image_encode: how init images (and a hires pass's pixel upscaler's) become latents
        (`sampling.IMAGE_ENCODES`): "sample" (the default, diffusers'), a sample of the VAE's
        posterior, each image's noise for it drawn first; or "mode", ComfyUI's VAEEncode: the
        posterior's mode, nothing drawn (with rng "torch_cpu" the initial noise is then the
        generator's first draw, as ComfyUI's KSampler draws it).
      tiling: A1111's "Tiling" (seamless images that tile): every convolution of the UNet and
        the VAE pads circularly, as A1111 sets torch's padding_mode="circular" on each; every
        pass and the refiner's stage, not ControlNets or T2I-Adapters.
        True wraps both axes; "x" or "y" one (zeros along the other, as A1111's
        asymmetric-tiling extension pads: "x" for 360-degree panoramas).

    Returns:
      float32 images [N, H, W, 3] in [0, 1] (with `hires_scale`, at the enlarged size; with
      `padding_mask_crop`, at the size of `init_images`).
    """
    options = masks.MaskOptions(mask_blur, padding_mask_crop, mask_overlay,
                                masked_content=masked_content,
                                soft=masks.soft_inpainting(soft_inpainting))
    prepared = None
    if options.host_work:
      prepared, init_images, mask_images, height, width = _prepare_masks(
          self, init_images, mask_images, height, width, options)
      if control_images is not None and options.padding is not None:
        several = not isinstance(controlnet, _ControlModel) and isinstance(control_images,
                                                                        list | tuple)
        control_images = ([_cut_control_images(prepared, c, height, width)
                           for c in control_images] if several else
                          _cut_control_images(prepared, control_images, height, width))
    pipe, ip = self, None
    if ip_adapter is not None:
      n = 1 if isinstance(prompts, str) else len(prompts)
      pipe, ip = ip_adapter_input(self, ip_adapter, ip_adapter_images, ip_adapter_scale, n)
      if ip_adapter_masks is not None:
        ip = (*ip, ip_adapter_mask_input(ip_adapter_masks, ip[0], n,
                                         self.native_size if height is None else height,
                                         self.native_size if width is None else width))
      if hires_model is not None:
        hires_model = ip_adapter_input(hires_model, ip_adapter, ip_adapter_images,
                                       ip_adapter_scale, n)[0]
    elif ip_adapter_images is not None or ip_adapter_masks is not None:
      raise ValueError("ip_adapter_images and ip_adapter_masks are an IP-Adapter's: give "
                       "ip_adapter= too")
    micro = conditioning.MicroConditioning(
        original_size, tuple(crops_coords_top_left), target_size, negative_original_size,
        tuple(negative_crops_coords_top_left), negative_target_size, aesthetic_score,
        negative_aesthetic_score)
    if schedule_type is not None:
      scheduler_options = {**(scheduler_options or {}), "schedule_type": schedule_type}
    if hires_schedule_type is not None:
      if hires_scale is None and hires_resize is None:
        raise ValueError("hires_schedule_type is the hires pass's: give hires_scale too")
      hires_schedule_type = outputs.schedule_type_options(hires_schedule_type).get(
          "schedule_type", "")
    for key, values, extra in (("sigmas", sigmas, 1), ("timesteps", timesteps, 0)):
      if values is None:
        continue
      if not isinstance(values, str):  # any array-like, kept as a (hashable) list of floats
        values = np.asarray(values).tolist()
      scheduler_options = {**(scheduler_options or {}), key: values}
      if steps is None and isinstance(values, list):
        steps = len(values) - extra
    images = sampling.generate(
        pipe, prompts, negative_prompts=negative_prompts, steps=steps,
        guidance_scale=guidance_scale, scheduler=scheduler, scheduler_options=scheduler_options,
        height=height, width=width,
        seed=seed, latents=latents, init_images=init_images, mask_images=mask_images,
        strength=strength, masked_content=masked_content,
        guidance_rescale=guidance_rescale, guidance_rescale_form=guidance_rescale_form,
        clip_skip=clip_skip, prompts_2=prompts_2,
        negative_prompts_2=negative_prompts_2, micro=micro, refiner=refiner,
        refiner_start=refiner_start, refiner_switch=refiner_switch,
        hires_refiner=hires_refiner, eta=eta,
        prompt_syntax=prompt_syntax,
        embeddings=embeddings, cfg_parallel=cfg_parallel, emphasis=emphasis,
        hires=None if hires_scale is None and hires_resize is None else sampling.Hires(
            2.0 if hires_scale is None else hires_scale, hires_steps, hires_strength,
            hires_upscaler, tuple(hires_resize or (0, 0)), hires_scheduler,
            hires_guidance_scale, hires_schedule_type),
        hires_prompts=hires_prompts, hires_negative_prompts=hires_negative_prompts,
        hires_model=hires_model, controlnet=controlnet, control_images=control_images,
        hires_control_images=hires_control_images,
        controlnet_conditioning_scale=controlnet_conditioning_scale,
        control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
        guess_mode=guess_mode, control_mode=control_mode, ip=ip, pag_scale=pag_scale,
        pag_adaptive_scale=pag_adaptive_scale, pag_applied_layers=pag_applied_layers,
        freeu=freeu, freeu_form=freeu_form, token_merging_ratio=token_merging_ratio,
        hires_token_merging_ratio=hires_token_merging_ratio,
        inpainting_mask_weight=inpainting_mask_weight, inpaint_blend=inpaint_blend,
        image_encode=image_encode, grow_mask_by=grow_mask_by, soft_inpainting=options.soft,
        differential_diffusion=differential_diffusion,
        tiling=tiling, rng=rng,
        subseed=subseed, subseed_strength=subseed_strength,
        ensd=ensd, seed_resize_from=seed_resize_from, s_min_uncond=s_min_uncond,
        s_min_uncond_all=s_min_uncond_all, skip_early_cond=skip_early_cond,
        pad_cond_uncond=pad_cond_uncond, pad_cond_uncond_v0=pad_cond_uncond_v0,
        old_prompt_editing_timelines=old_prompt_editing_timelines,
        brownian=brownian, step_rng=step_rng, seed_high=seed_high,
        noise_multiplier=noise_multiplier, extra_noise=extra_noise, noise_batch=noise_batch,
        image_guidance_scale=image_guidance_scale, depth_maps=depth_maps,
        noise_level=noise_level)
    images, distances = images if options.soft is not None else (images, [None] * len(images))
    if prepared is None:
      return images
    return np.stack([p.finish(outputs.to_uint8(image), d) for p, image, d in zip(
        prepared, images, distances, strict=True)]).astype(np.float32) / np.float32(255.0)

  # -- export ------------------------------------------------------------------------------------
  def save_pretrained(self, folder: str) -> None:
    """Writes a diffusers-format folder that diffusers' pipeline class (SD, SDXL, refiner) loads."""
    save_pretrained(self, folder)

  def save_single_file(self, path: str, dtype: str = "float32") -> None:
    """Writes one original-layout (CompVis/LDM) `.safetensors`, as A1111 and diffusers'
    `from_single_file` read it; `dtype` "float32" or "float16"."""
    save_single_file(self, path, dtype)


def _prepare_masks(pipe, init_images, mask_images, height, width, options):
  """`masks.prepare` of each image and mask: (prepared, the sampler's images, masks, height,
  width)."""
  options.check()
  if init_images is None or mask_images is None:
    raise ValueError("mask_blur, padding_mask_crop, mask_overlay, masked_content and "
                     "soft_inpainting are inpainting options: give init_images and mask_images")
  init_images, mask_images = np.asarray(init_images), np.asarray(mask_images)
  if mask_images.ndim == 4 and mask_images.shape[-1] == 1:
    mask_images = mask_images[..., 0]
  if init_images.ndim != 4 or init_images.shape[-1] != 3 or (
      mask_images.shape != init_images.shape[:3]):
    raise ValueError(f"init_images [N, H, W, 3] and mask_images [N, H, W] must match, got "
                     f"{init_images.shape} and {mask_images.shape}")
  if options.padding is None:  # the whole picture: generated at the images' size
    height, width = init_images.shape[1:3]
  else:
    height = pipe.native_size if height is None else height
    width = pipe.native_size if width is None else width
  prepared = []
  for image, mask in zip(init_images, mask_images, strict=True):
    # 8-bit, as image files; a mask through three equal channels (to L exactly).
    mask = Image.fromarray(outputs.to_uint8(np.repeat(mask[..., None], 3, -1))).convert("L")
    prepared.append(masks.prepare(Image.fromarray(outputs.to_uint8(image)), mask, height, width,
                                  options))
  return (prepared, np.stack([p.image for p in prepared]), np.stack([p.mask for p in prepared]),
          height, width)


def _cut_control_images(prepared, images, height: int, width: int) -> np.ndarray:
  """ControlNet images at the init images' size, cut as "Only masked" cut those (8-bit, as
  they are); the sampler checks the result's shape."""
  images = np.asarray(images, np.float32)
  images = images[None] if images.ndim == 3 else images
  if images.ndim != 4 or len(images) not in (1, len(prepared)) or images.shape[-1] != 3:
    return images
  images = np.broadcast_to(images, (len(prepared), *images.shape[1:]))
  return np.stack([
      np.asarray(masks.cut_as(Image.fromarray(outputs.to_uint8(image)), p, height, width),
                 np.float32) / np.float32(255.0)
      for image, p in zip(images, prepared, strict=True)])


@functools.partial(aot.bounded_jit, static_argnums=(0, 3))
def _encode_text(module, params, ids, clip_skip):
  return module.apply({"params": params}, ids, clip_skip)["prompt_embeds"]


@functools.partial(aot.bounded_jit, static_argnums=(0, 3))
def _encode_prompt(nets, params, cond, clip_skip):
  return conditioning.encode(nets, params, cond, clip_skip, None)


@functools.partial(aot.bounded_jit, static_argnums=0)
def _predict_noise(module, params, x, t, ctx, text_embeds=None, time_ids=None,
                   timestep_cond=None):
  return module.apply({"params": params}, x, t, ctx, text_embeds, time_ids, None, timestep_cond)


@functools.partial(aot.bounded_jit, static_argnums=0)
def _vae_decode(module, params, z):
  return module.apply({"params": params}, z, method=AutoencoderKL.decode)


@functools.partial(aot.bounded_jit, static_argnums=0)
def _vae_encode(module, params, x):
  return module.apply({"params": params}, x, method=AutoencoderKL.encode).mean


def _tokenize(tokenizer, prompts, max_length: int, embeddings) -> np.ndarray:
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = [textual_inversion.expand_prompt(p, embeddings) for p in prompts]
  ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")["input_ids"]
  return np.asarray(ids, dtype=np.int32)


# -- loading ---------------------------------------------------------------------------------------
def load_tokenizer(folder: str):
  """The checkpoint's CLIP BPE tokenizer (vocab.json + merges.txt, or tokenizer.json)."""
  from transformers import CLIPTokenizer  # noqa: PLC0415

  if not any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json")):
    raise PipelineError(f"no tokenizer in {folder} (need vocab.json + merges.txt or tokenizer.json)")
  try:
    return CLIPTokenizer.from_pretrained(folder)
  except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad folder
    raise PipelineError(f"cannot load the tokenizer in {folder}: {e}") from None


def _read_component_config(folder: str, name: str) -> dict[str, Any]:
  path = os.path.join(folder, name, "scheduler_config.json" if name.endswith("scheduler")
                      else "config.json")
  return config_utils.read_json(path)


@dataclasses.dataclass
class _Source:
  """Where a pipeline's parts come from, before any weights are read."""

  unet: UNetConfig
  vae: VAEConfig
  text_encoder: CLIPTextConfig | None
  scheduler_config: dict[str, Any]
  tokenizer: Any
  read_states: Any  # (expected param trees) -> {component: diffusers-layout state dict}
  # SDXL: the second encoder and tokenizer; model_index flags (Pipeline fields).
  text_encoder_2: CLIPTextConfig | None = None
  tokenizer_2: Any = None
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _folder_source(folder: str, variant: str | None) -> _Source:
  if not os.path.isfile(os.path.join(folder, "model_index.json")):
    raise PipelineError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
  index = config_utils.read_json(os.path.join(folder, "model_index.json"))
  names = _component_names(index)
  for name in names:
    if not os.path.isdir(os.path.join(folder, name)):
      raise PipelineError(f"{folder} has no {name}/ folder")

  def text_config(name):
    return CLIPTextConfig.from_dict(_read_component_config(folder, name)) if name in names else None

  sdxl = index.get("_class_name") in _SDXL_CLASSES
  return _Source(
      unet=UNetConfig.from_dict(_read_component_config(folder, "unet")),
      vae=VAEConfig.from_dict(_read_component_config(folder, "vae")),
      text_encoder=text_config("text_encoder"),
      scheduler_config=_read_component_config(folder, "scheduler"),
      tokenizer=_load_tokenizer_if(folder, "tokenizer", names),
      read_states=lambda expected: {
          name: read_state_dict(os.path.join(folder, name), name, variant=variant)
          for name in expected},
      text_encoder_2=text_config("text_encoder_2"),
      tokenizer_2=_load_tokenizer_if(folder, "tokenizer_2", names),
      options={
          "prompt_grammar": _read_prompt_grammar(folder),
          "sampling_defaults": _read_sampling_defaults(folder),
          "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", sdxl)),
          "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
          **_upscaler_options(folder, index),
      },
  )


def _upscaler_vae(vae_cfg: VAEConfig) -> VAEConfig:
  """The x4 upscaler's latents are scaled by 0.08333, whatever its VAE config says: diffusers'
  `StableDiffusionUpscalePipeline` imposes it (a config without scaling_factor, as
  stable-diffusion-x4-upscaler's vae/config.json was in 2023, would give the 0.18215 default);
  so does sdjax, with a warning."""
  if vae_cfg.scaling_factor != X4_SCALING_FACTOR:
    logging.warning("the x4 upscaler's VAE config says scaling_factor %s; using %s, as diffusers' "
                    "upscale pipeline does", vae_cfg.scaling_factor, X4_SCALING_FACTOR)
    vae_cfg = dataclasses.replace(vae_cfg, scaling_factor=X4_SCALING_FACTOR)
  return vae_cfg


def _upscaler_options(folder: str, index: dict[str, Any]) -> dict[str, Any]:
  """An x4 upscaler folder's low-res scheduler config and max_noise_level (Pipeline fields)."""
  if not _listed(index, "low_res_scheduler"):
    return {}
  return {"low_res_scheduler_config": _read_component_config(folder, "low_res_scheduler"),
          "max_noise_level": int(index.get("max_noise_level", 350))}


def _single_file_configs(family: str, config: str | None, prediction_type: str | None,
                         revision: str | None, path: str, inpainting: bool = False,
                         upscaler: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """(raw configs by component, plus "model_index" options and an x4 upscaler's "upscaler"
  Pipeline fields; tokenizers by name): from a `config` folder / hub id, else sdjax's built-in
  standard config of the family."""
  if config is None:
    if family == "sd2" and prediction_type is None and not (inpainting or upscaler):
      logging.info("%s: SD2 weights do not say their prediction type; assuming 768-v "
                   "(v_prediction). Pass prediction_type='epsilon' for 512-base models.", path)
    raw = dict(standard.standard_config(single_file.standard_config_name(
        family, prediction_type, inpainting, upscaler)))
    low_res = raw.pop("low_res_scheduler", None)
    raw["upscaler"] = {} if low_res is None else {
        "low_res_scheduler_config": low_res,
        "max_noise_level": int(raw["model_index"]["max_noise_level"])}
    tokenizers = {name: standard.clip_tokenizer(raw[name]["pad_token"])
                  for name in ("tokenizer", "tokenizer_2") if name in raw}
    return raw, tokenizers
  folder = hub.resolve_source(config, revision=revision, configs_only=True)
  index_path = os.path.join(folder, "model_index.json")
  index = config_utils.read_json(index_path) if os.path.isfile(index_path) else {}
  names = _component_names(index)
  for name in names:
    if not os.path.isdir(os.path.join(folder, name)):
      raise PipelineError(f"config {config} has no {name}/ folder")
  raw = {name: _read_component_config(folder, name) for name in names
         if not name.startswith("tokenizer")}
  raw["model_index"] = index
  raw["upscaler"] = _upscaler_options(folder, index)  # {} but for an x4 upscaler's
  return raw, {name: load_tokenizer(os.path.join(folder, name)) for name in names
               if name.startswith("tokenizer")}


def _single_file_source(path: str, config: str | None, prediction_type: str | None,
                        revision: str | None) -> _Source:
  """A single original-layout file, with configs from `config` or the family's standard ones."""
  state = single_file.read_single_file(path)
  family = single_file.detect_family(state, path)
  if config is None and (marker := single_file.cosxl_marker(state)):
    raise single_file.SingleFileError(
      f"{path} is an EDM v-prediction model ({marker}: CosXL), whose file does not say its "
      "scheduler: pass config= (--model_config) a diffusers folder of it with its "
      "EDMEulerScheduler config")
  # Marker keys or ModelSpec metadata; an explicit prediction_type still wins (see load()).
  markers = single_file.scheduler_markers(state, single_file.read_metadata(path))
  if markers:
    logging.info("%s: marked as %s", path, ", ".join(f"{k}={v}" for k, v in markers.items()))
  # The weights say (inpainting 9, pix2pix 8, depth 5, x4 upscaler 7; SD2's inpainting and
  # depth are 512-base).
  in_channels = single_file.unet_in_channels(state)
  upscaler = in_channels == single_file.UPSCALER_CHANNELS
  raw, tokenizers = _single_file_configs(
      family, config, prediction_type or markers.get("prediction_type"), revision, path,
      in_channels in (single_file.INPAINTING_CHANNELS, single_file.DEPTH_CHANNELS), upscaler)
  playground = single_file.playground_configs(state, path)
  if playground is not None and config is None:  # a config folder's own win, as in diffusers
    logging.info("%s: Playground v2.5 (EDM, latent statistics in the file)", path)
    raw = {**raw, "scheduler": playground["scheduler"],
           "vae": {**raw["vae"], **playground["vae"]}}
  text_cfgs = {name: CLIPTextConfig.from_dict(raw[name])
               for name in ("text_encoder", "text_encoder_2") if name in raw}
  config_family = single_file.config_family(text_cfgs)
  if config_family != family:
    raise PipelineError(f"{path} is an {_family_name(family)} checkpoint but config {config} is "
                        f"{_family_name(config_family)}")
  if upscaler != bool(raw.get("upscaler")):
    raise PipelineError(f"{path} is {'an' if upscaler else 'not an'} x4 upscaler ({in_channels} "
                        f"UNet input channels) but config {config} is "
                        f"{'not one' if upscaler else 'one'}")
  unet_cfg = UNetConfig.from_dict({**raw["unet"], "in_channels": in_channels})
  vae_cfg = VAEConfig.from_dict(raw["vae"])

  def read_states(expected):
    keys = {n: [torch_key(p) for p in traverse_util.flatten_dict(tree)]
            for n, tree in expected.items()}
    return single_file.split_state(state, family, unet_cfg, text_cfgs.get("text_encoder"),
                                   vae_cfg, keys, path)

  index = raw.get("model_index", {})
  sdxl = family.startswith("sdxl")
  return _Source(
      unet_cfg, vae_cfg, text_cfgs.get("text_encoder"), {**raw["scheduler"], **markers},
      tokenizers.get("tokenizer"), read_states, text_encoder_2=text_cfgs.get("text_encoder_2"),
      tokenizer_2=tokenizers.get("tokenizer_2"),
      options={
          "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", sdxl)),
          "requires_aesthetics_score": bool(index.get("requires_aesthetics_score",
                                                      family == "sdxl_refiner")),
          **raw.get("upscaler", {}),
      })


def _local_file(source: str, kind: str, revision: str | None) -> str:
  """A single file's local path: `source` itself, or a hub file it names (downloaded once, then
  from the hub cache); a missing local file is left for the reader to report."""
  if hub.is_hub_file(source):
    return hub.resolve_file(source, kind, revision=revision)
  return os.path.expanduser(source)


def _family_name(family: str) -> str:
  return family.replace("_", " ").upper()


def _vae_source(vae: str, default_cfg: VAEConfig, revision: str | None):
  """(config, state reader) of a replacement VAE: a file, a VAE folder or a pipeline folder."""
  if single_file.is_single_file(vae):
    path = _local_file(vae, "VAE", revision)
    return default_cfg, lambda expected: single_file.read_vae_file(path, default_cfg, expected)
  folder = hub.resolve_source(vae, revision=revision, component="vae")
  if os.path.isdir(os.path.join(folder, "vae")):
    folder = os.path.join(folder, "vae")
  cfg = VAEConfig.from_dict(config_utils.read_json(os.path.join(folder, "config.json")))
  return cfg, lambda expected: read_state_dict(folder, "vae")


def _pipeline_name(source, config, vae, prediction_type) -> str:
  """What the pixels depend on (run.py compares it when resuming a run)."""
  extras = [f"{k} {v}" for k, v in (("config", config), ("vae", vae),
                                    ("prediction_type", prediction_type)) if v is not None]
  return str(source) + (f" ({', '.join(extras)})" if extras else "")


def load_pipeline(
    source: str | None = None,
    dtype="float32",
    *,
    param_dtype=None,
    variant: str | None = None,
    allow_pickle: bool = True,
    revision: str | None = None,
    config: str | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
    loras=(),
    embeddings=(),
) -> Pipeline:
  """Loads a Stable Diffusion pipeline.

  Args:
    source: a diffusers-format folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
      `tokenizer/`, `scheduler/`), a Hugging Face hub id, a single original-layout checkpoint
      file (`.safetensors`, `.ckpt`, `.pt`, `.bin`; SD1, SD2, SDXL base or refiner): a path, a
      hub file `owner/name/file.safetensors` or its URL
      (`https://huggingface.co/owner/name/blob/main/file.safetensors`), or None for the
      built-in model.
    dtype: compute dtype of the networks ("float32", "bfloat16", "float16").
    param_dtype: dtype the params are stored in (default: `dtype`).
    variant: weight file variant to prefer, e.g. "fp16".
    allow_pickle: ignored, kept for compatibility: `.bin`/`.ckpt` pickles are always read by an
      allowlisting unpickler that never runs code from the file.
    revision: hub revision (branch, tag or commit).
    config: single files only: a diffusers folder or hub id whose configs, tokenizer and scheduler
      to use (default: sdjax's built-in standard config of the file's family).
    vae: a replacement VAE: a diffusers VAE or pipeline folder, a hub id, or a single VAE file
      (original layout `encoder.*`/`decoder.*`, optionally under `first_stage_model.`; a path,
      hub file or URL as for `source`).
    prediction_type: "epsilon" or "v_prediction", overriding the scheduler config (SD2 single
      files: picks the 512-base or the 768-v standard config; default v_prediction).
    loras: LoRA files merged into the weights: `path`, `(path, scale)` or
      `(path, unet_scale, text_encoder_scale)` each (see `checkpoints.lora`).
    embeddings: textual-inversion files: `path` or `(path, token)` each (token default: the
      file's stem; see `checkpoints.embeddings`).
  """
  del allow_pickle
  if prediction_type not in (None, "epsilon", "v_prediction"):
    raise PipelineError(f"unknown prediction_type {prediction_type!r} (epsilon or v_prediction)")
  if source is None:
    from sdjax import BUILTIN_MODEL  # noqa: PLC0415

    source = BUILTIN_MODEL
  compute = parse_dtype(dtype)
  store = parse_dtype(param_dtype) if param_dtype is not None else compute
  if single_file.is_single_file(source):
    src = _single_file_source(_local_file(source, "checkpoint", revision), config,
                              prediction_type, revision)
  elif config is not None:
    raise PipelineError("config= is only for single-file checkpoints; a folder has its own")
  else:
    src = _folder_source(hub.resolve_source(source, variant=variant, revision=revision), variant)
  vae_cfg, read_vae = src.vae, None
  if vae is not None:
    vae_cfg, read_vae = _vae_source(vae, src.vae, revision)
  if src.options.get("low_res_scheduler_config") is not None:
    vae_cfg = _upscaler_vae(vae_cfg)
  scheduler_config = dict(src.scheduler_config)
  if prediction_type is not None:
    scheduler_config["prediction_type"] = prediction_type

  text_cfgs = {name: cfg for name, cfg in (("text_encoder", src.text_encoder),
                                           ("text_encoder_2", src.text_encoder_2)) if cfg}
  modules = _modules(src.unet, vae_cfg, text_cfgs, compute, store)
  examples = _example_inputs(src.unet, src.text_encoder, vae_cfg, src.text_encoder_2)
  expected = {name: _expected_params(m, *examples[name]) for name, m in modules.items()}
  states = src.read_states({n: t for n, t in expected.items() if n != "vae" or read_vae is None})
  if read_vae is not None:
    states["vae"] = read_vae(expected["vae"])
  params = {name: jax.device_put(torch_to_flax(states[name], expected[name], name,
                                               np.dtype(store)))
            for name in modules}
  pipe = Pipeline(
      text_encoder=modules.get("text_encoder"),
      unet=modules["unet"],
      vae=modules["vae"],
      params=params,
      tokenizer=src.tokenizer,
      scheduler_config=scheduler_config,
      name=_pipeline_name(source, config, vae, prediction_type),
      text_encoder_2=modules.get("text_encoder_2"),
      tokenizer_2=src.tokenizer_2,
      **src.options,
  )
  # A folder saved after adding embeddings: its tokenizers hold them (multi-vector expansion).
  pipe = dataclasses.replace(pipe, embeddings=textual_inversion.from_vocabulary(pipe))
  return add_extras(pipe, loras=loras, embeddings=embeddings)


def as_controlnets(controlnet) -> list[ControlNet | Adapter]:
  """A ControlNet or T2I-Adapter, or a sequence of them, as a non-empty list."""
  nets = [controlnet] if isinstance(controlnet, ControlNet | Adapter) else list(controlnet)
  if not nets or not all(isinstance(net, ControlNet | Adapter) for net in nets):
    raise ValueError("controlnet= takes a load_controlnet() ControlNet or T2I-Adapter, or a "
                     "list of them")
  return nets


@dataclasses.dataclass(eq=False)
class _ControlModel:
  """A network steering the UNet and its params, named by where it came from."""

  model: Any
  params: Any
  name: str

  @property
  def config(self):
    return self.model.config


class ControlNet(_ControlModel):
  """A ControlNet (network and params) for `Pipeline.generate(controlnet=...)`."""

  model: ControlNetModel

  @property
  def is_union(self) -> bool:
    """Whether this is a ControlNet union (ControlNet++), which needs control types."""
    return isinstance(self.model, ControlNetUnionModel)

  @property
  def control_types(self) -> tuple[int, ...]:
    """A union's control types (indices), one per control image; () otherwise."""
    return self.model.control_types if self.is_union else ()

  def with_control_type(self, *types: int | str) -> ControlNet:
    """This ControlNet union (same params) for control images of `types`: one image per type,
    each an index or a name of xinsir's models (`UNION_CONTROL_TYPES`: openpose, depth,
    softedge/hed/pidi/scribble, canny/lineart/mlsd, normal, segment, tile, repaint). Several
    types: `control_images` takes a list of one image per type for this ControlNet, which
    diffusers' union pipeline passes as its `control_image` list with `control_mode`."""
    if not self.is_union:
      raise ValueError(f"ControlNet {self.name} is not a ControlNet union: it takes no "
                       f"control type")
    if not types:
      raise ValueError("with_control_type needs at least one control type")
    indices = tuple(union_control_type(t, self.config.num_control_type) for t in types)
    return dataclasses.replace(self, model=self.model.clone(control_types=indices))

  def check_fits(self, pipe: Pipeline) -> None:
    """A one-line error unless this ControlNet was made for `pipe`'s UNet (and a union has
    its control types)."""
    if self.is_union and not self.control_types:
      raise ValueError(f"ControlNet {self.name} is a ControlNet union: give its control type "
                       f"(load_controlnet(..., control_type='depth'), or "
                       f"net.with_control_type('depth'); main.py: --control_type)")
    mine, unet = self.config, pipe.unet.config
    for what, ours, theirs in (
        ("skip_channels", mine.skip_channels, unet.skip_channels),
        ("cross_attention_dim", mine.cross_attention_dim, unet.cross_attention_dim),
        ("addition_embed_type", mine.addition_embed_type, unet.addition_embed_type),
        ("in_channels", mine.in_channels, sampling.latent_channels(pipe))):
      if ours != theirs:
        raise ValueError(f"ControlNet {self.name} does not fit this model ({what} {ours} "
                         f"against the UNet's {theirs}): a ControlNet for another model family?")


class Adapter(_ControlModel):
  """A T2I-Adapter (network and params): `Pipeline.generate(controlnet=...)` takes it as it
  takes a ControlNet (alone, or in a list with ControlNets), as A1111's ControlNet extension
  does."""

  model: T2IAdapter

  def check_fits(self, pipe: Pipeline, height: int | None = None,
                 width: int | None = None) -> None:
    """A one-line error unless each feature map this adapter makes of a (height, width) control
    image (default: the model's native size) has the shape of where the UNet adds it."""
    problem = sampling.adapter_misfit(pipe, self.model, self.params,
                                      pipe.native_size if height is None else height,
                                      pipe.native_size if width is None else width)
    if problem:
      raise ValueError(f"T2I-Adapter {self.name} {problem}")


def load_adapter(source: str, dtype="float32", *, param_dtype=None, variant: str | None = None,
                 revision: str | None = None, config: str | None = None) -> Adapter:
  """Loads a T2I-Adapter: a diffusers-format folder (`config.json` + weights) or hub id (e.g.
  `TencentARC/t2iadapter_canny_sd15v2`, `TencentARC/t2i-adapter-canny-sdxl-1.0`), or a single
  file as A1111 users have them (TencentARC's original `.pth` layout, e.g.
  `t2iadapter_canny_sd15v2.pth`, or one diffusers component, as the SDXL ones; a path, hub file
  or URL). `config`: single files only, a diffusers adapter folder or hub id whose config to use
  (default: read from the weights; see `single_file.adapter_config`). `dtype`, `param_dtype` as
  `load_pipeline`'s."""
  compute = parse_dtype(dtype)
  store = parse_dtype(param_dtype) if param_dtype is not None else compute
  try:
    if single_file.is_single_file(source):
      path = _local_file(source, "T2I-Adapter", revision)
      return _adapter_from_file(source, path, single_file.read_single_file(path), config,
                                revision, compute, store)
    if config is not None:
      raise PipelineError("config= is only for single-file T2I-Adapters; a folder has its own")
    folder, raw = _controlnet_folder_config(source, revision, variant)
    return _adapter_from_folder(source, folder, raw, variant, compute, store)
  except (hub.HubError, config_utils.ConfigError, WeightsError) as e:
    raise PipelineError(f"cannot load T2I-Adapter {source}: {e}") from None


def _adapter_from_folder(source, folder, raw, variant, compute, store) -> Adapter:
  model, expected = _adapter_model(raw, compute, store)
  state = read_state_dict(folder, "controlnet", variant=variant)
  return Adapter(model, jax.device_put(torch_to_flax(state, expected, "t2i_adapter",
                                                     np.dtype(store))), str(source))


def _adapter_from_file(source, path, state, config, revision, compute, store) -> Adapter:
  layout = single_file.adapter_layout(state)
  if layout is None:
    raise single_file.SingleFileError(f"{path} is not a T2I-Adapter file (first key: "
                                      f"{next(iter(state), 'none')!r})")
  raw = (_controlnet_folder_config(config, revision)[1] if config is not None
         else single_file.adapter_config(state, layout, path))
  model, expected = _adapter_model(raw, compute, store)
  keys = [torch_key(p) for p in traverse_util.flatten_dict(expected)]
  state = single_file.adapter_state(state, layout, model.config, keys, path)
  name = str(source) + (f" (config {config})" if config is not None else "")
  return Adapter(model, jax.device_put(torch_to_flax(state, expected, "t2i_adapter",
                                                     np.dtype(store))), name)


def _adapter_model(raw: dict[str, Any], compute, store):
  """The adapter network of config `raw` and the params it expects (abstract)."""
  if raw.get("_class_name", "T2IAdapter") != "T2IAdapter":
    raise config_utils.ConfigError(f"the config is a {raw['_class_name']}'s, not a T2IAdapter's")
  model = T2IAdapter(T2IAdapterConfig.from_dict(raw), compute, store)
  side = model.config.total_downscale
  return model, _expected_params(model, jnp.zeros((1, side, side, model.config.in_channels)))


def load_controlnet(source: str, dtype="float32", *, param_dtype=None, variant: str | None = None,
                    revision: str | None = None, config: str | None = None,
                    base: Pipeline | None = None,
                    control_type: int | str | Sequence[int | str] | None = None
                    ) -> ControlNet | Adapter:
  """Loads a ControlNet: a diffusers-format folder (`config.json` + weights), a hub id (e.g.
  `lllyasviel/sd-controlnet-canny`, `diffusers/controlnet-canny-sdxl-1.0`), a pipeline folder's
  `controlnet/`, or a single file (`.safetensors`, `.pth`, ...: lllyasviel's original layout, as
  ControlNet 1.0/1.1 and the A1111 extension share them, or one diffusers component; a path, hub
  file or URL). `config`: single files only, a diffusers ControlNet folder or hub id whose config
  to use (default: the standard SD1/SD2/SDXL architecture the weights show). `dtype`,
  `param_dtype` as `load_pipeline`'s. A T2I-Adapter folder or hub id gives its `Adapter`
  (`load_adapter`), which `controlnet=` and main.py's `--controlnet` take too. A Control-LoRA
  file (Stability AI's `control-lora-*.safetensors`) holds a ControlNet as its difference from
  the UNet it steers: `base`, the pipeline it is for, supplies the rest. A ControlNet union
  (ControlNet++, diffusers' `ControlNetUnionModel`, e.g. `xinsir/controlnet-union-sdxl-1.0` and
  its promax file) needs `control_type`: one type, or a list (`ControlNet.with_control_type`)."""
  net = _load_controlnet(source, dtype, param_dtype, variant, revision, config, base)
  if control_type is None:
    return net
  if not isinstance(net, ControlNet) or not net.is_union:
    raise PipelineError(f"cannot load ControlNet {source}: control_type is for a ControlNet "
                        f"union (ControlNet++), and this is not one")
  types = [control_type] if isinstance(control_type, int | str) else list(control_type)
  try:
    return net.with_control_type(*types)
  except ValueError as e:
    raise PipelineError(f"cannot load ControlNet {source}: {e}") from None


def _load_controlnet(source, dtype, param_dtype, variant, revision, config, base
                     ) -> ControlNet | Adapter:
  compute = parse_dtype(dtype)
  store = parse_dtype(param_dtype) if param_dtype is not None else compute
  try:
    if single_file.is_single_file(source):
      path = _local_file(source, "ControlNet", revision)
      state = single_file.read_single_file(path)
      if single_file.adapter_layout(state) is not None:
        return _adapter_from_file(source, path, state, config, revision, compute, store)
      if single_file.CONTROL_LORA_MARKER in state:
        return _control_lora(source, path, state, base, config, revision, compute, store)
      prefix = single_file.controlnet_prefix(state, path)
      raw = (_controlnet_folder_config(config, revision)[1] if config is not None
             else single_file.controlnet_config(state, prefix, path))
      model, expected = _controlnet_model(_controlnet_config(raw), compute, store)
      keys = [torch_key(p) for p in traverse_util.flatten_dict(expected)]
      state = single_file.controlnet_state(state, prefix, model.config, keys, path)
    elif config is not None:
      raise PipelineError("config= is only for single-file ControlNets; a folder has its own")
    else:
      folder, raw = _controlnet_folder_config(source, revision, variant)
      if raw.get("_class_name") == "T2IAdapter":  # the folder is already at hand
        return _adapter_from_folder(source, folder, raw, variant, compute, store)
      model, expected = _controlnet_model(_controlnet_config(raw), compute, store)
      state = read_state_dict(folder, "controlnet", variant=variant)
    params = jax.device_put(torch_to_flax(state, expected, "controlnet", np.dtype(store)))
  except (hub.HubError, config_utils.ConfigError, WeightsError) as e:
    raise PipelineError(f"cannot load ControlNet {source}: {e}") from None
  name = str(source) + (f" (config {config})" if config is not None else "")
  return ControlNet(model, params, name)


def _control_lora(source, path, state, base, config, revision, compute, store) -> ControlNet:
  if base is None:
    raise PipelineError(f"cannot load ControlNet {source}: a Control-LoRA is made from the "
                        f"model it steers: load_controlnet(path, base=pipe)")
  raw = (_controlnet_folder_config(config, revision)[1] if config is not None else
         single_file.control_lora_config(state, base.unet.config.to_dict(), path))
  model, expected = _controlnet_model(ControlNetConfig.from_dict(raw), compute, store)
  keys = [torch_key(p) for p in traverse_util.flatten_dict(expected)]
  state = single_file.control_lora_state(state, model.config, keys,
                                         flax_to_torch(base.params["unet"]), path)
  params = jax.device_put(torch_to_flax(state, expected, "controlnet", np.dtype(store)))
  name = str(source) + (f" (config {config})" if config is not None else "")
  return ControlNet(model, params, name)


def _controlnet_folder_config(source: str, revision: str | None, variant: str | None = None
                              ) -> tuple[str, dict[str, Any]]:
  """(folder, config dict) of a diffusers ControlNet folder, hub id or pipeline folder."""
  folder = hub.resolve_source(source, variant=variant, revision=revision, component="controlnet")
  if os.path.isdir(os.path.join(folder, "controlnet")):
    folder = os.path.join(folder, "controlnet")
  return folder, config_utils.read_json(os.path.join(folder, "config.json"))


def _controlnet_config(raw: dict[str, Any]) -> ControlNetConfig:
  """A ControlNet's config: a union's (ControlNet++: its class name, or its own options) or a
  plain one's."""
  if "Union" in str(raw.get("_class_name", "")) or "num_control_type" in raw:
    return ControlNetUnionConfig.from_dict(raw)
  return ControlNetConfig.from_dict(raw)


def _controlnet_model(cfg: ControlNetConfig, compute, store):
  """The network and the params it expects (abstract); a union's without control types."""
  union = isinstance(cfg, ControlNetUnionConfig)
  model = (ControlNetUnionModel(cfg, compute, store, control_types=(0,)) if union
           else ControlNetModel(cfg, compute, store))
  f = cfg.downscale * cfg.downscale_control
  control = jnp.zeros((1, f, f, cfg.conditioning_channels))
  expected = _expected_params(model, *_unet_example(cfg, (control, 1.0)))
  return (model.clone(control_types=()) if union else model), expected


def add_extras(pipe: Pipeline, *, loras=(), embeddings=()) -> Pipeline:
  """`pipe` with textual-inversion embeddings added, then LoRAs merged into its weights."""
  if embeddings:
    pipe = textual_inversion.add_embeddings(pipe, embeddings)
  if loras:
    pipe = dataclasses.replace(pipe, params=lora.apply_loras(pipe, loras))
  return pipe


def _listed(index: dict[str, Any], name: str) -> bool | None:
  """Whether model_index.json names a component (None when it does not mention it)."""
  entry = index.get(name)
  if entry is None:
    return None
  return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _component_names(index: dict[str, Any]) -> list[str]:
  """The components to load: the SD set, less a text encoder the index lists as absent (the
  refiner's), plus SDXL's second encoder when listed."""
  names = [n for n in COMPONENTS if _listed(index, n) is not False]
  names += [n for n in SDXL_COMPONENTS if _listed(index, n)]
  if not any(n.startswith("text_encoder") for n in names):
    raise PipelineError("model_index.json lists no text encoder")
  return names


def _load_tokenizer_if(folder: str, name: str, names: list[str]):
  return load_tokenizer(os.path.join(folder, name)) if name in names else None


def _modules(unet_cfg, vae_cfg, text_cfgs, compute, store=None) -> dict[str, Any]:
  store = store or compute
  modules = {
      "unet": UNet2DConditionModel(unet_cfg, compute, store),
      "vae": AutoencoderKL(vae_cfg, vae_cfg.compute_dtype(compute), store),
  }
  if "text_encoder" in text_cfgs:
    modules["text_encoder"] = CLIPTextModel(text_cfgs["text_encoder"], compute, store)
  if "text_encoder_2" in text_cfgs:
    modules["text_encoder_2"] = CLIPTextModelWithProjection(text_cfgs["text_encoder_2"], compute,
                                                            store)
  return modules


def _read_sampling_defaults(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, SAMPLING_DEFAULTS)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      defaults = json.load(f)
  except (OSError, ValueError) as e:
    raise PipelineError(f"cannot read {path}: {e}") from None
  if not isinstance(defaults, dict):
    raise PipelineError(f"{path} must hold a JSON object")
  for key, value in defaults.items():
    kind = _DEFAULT_TYPES.get(key)
    if kind is None or isinstance(value, bool) or not isinstance(value, kind):
      raise PipelineError(f"{path}: unknown or ill-typed setting {key!r}: {value!r} (allowed: "
                          f"{', '.join(_DEFAULT_TYPES)})")
  return defaults


def _read_prompt_grammar(folder: str) -> str | None:
  path = os.path.join(folder, TRAINING_SUMMARY)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      grammar = json.load(f).get("prompt_grammar")
  except (OSError, ValueError, AttributeError) as e:
    raise PipelineError(f"cannot read {path}: {e}") from None
  return grammar if isinstance(grammar, str) else None


def build_pipeline(unet_cfg, vae_cfg, text_cfg, tokenizer, scheduler_config, params=None, *,
                   dtype="float32", seed: int = 0, name: str = "sdjax", text_cfg_2=None,
                   tokenizer_2=None, **options) -> Pipeline:
  """A pipeline from configs, with given params or freshly initialised ones.

  `text_cfg_2` / `tokenizer_2` make an SDXL pipeline (`text_cfg=None`: a refiner); `options` are
  model_index flags (`force_zeros_for_empty_prompt`, `requires_aesthetics_score`).
  """
  compute = parse_dtype(dtype)
  text_cfgs = {k: v for k, v in (("text_encoder", text_cfg), ("text_encoder_2", text_cfg_2))
               if v is not None}
  modules = _modules(unet_cfg, vae_cfg, text_cfgs, compute)
  if params is None:
    examples = _example_inputs(unet_cfg, text_cfg, vae_cfg, text_cfg_2)
    params = {n: init_params(m, *examples[n], seed=seed + i)
              for i, (n, m) in enumerate(modules.items())}
  return Pipeline(modules.get("text_encoder"), modules["unet"], modules["vae"], params, tokenizer,
                  dict(scheduler_config), name, modules.get("text_encoder_2"), tokenizer_2,
                  **options)


# -- export ----------------------------------------------------------------------------------------
_DIFFUSERS_VERSION = "0.30.0"


def _write_json(path: str, data: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _model_index(pipe: Pipeline, scheduler_class: str) -> dict[str, Any]:
  index = {
      "_diffusers_version": _DIFFUSERS_VERSION,
      "feature_extractor": [None, None], "image_encoder": [None, None],
      "scheduler": ["diffusers", scheduler_class],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  }
  clip = ["transformers", "CLIPTextModel"] if pipe.text_encoder else [None, None]
  tokenizer = ["transformers", "CLIPTokenizer"] if pipe.tokenizer else [None, None]
  index.update(text_encoder=clip, tokenizer=tokenizer)
  if pipe.low_res_scheduler_config is not None:
    return {**{k: v for k, v in index.items() if k != "image_encoder"},
            "_class_name": "StableDiffusionUpscalePipeline", "safety_checker": [None, None],
            "watermarker": [None, None], "low_res_scheduler": ["diffusers", "DDPMScheduler"],
            "max_noise_level": pipe.max_noise_level}
  if not pipe.is_sdxl and sampling.is_depth_model(pipe):  # no depth estimator: pass None
    return {**{k: v for k, v in index.items() if k != "image_encoder"},
            "_class_name": "StableDiffusionDepth2ImgPipeline", "depth_estimator": [None, None]}
  if not pipe.is_sdxl:
    return {**index, "_class_name": "StableDiffusionInpaintPipeline"
            if sampling.is_inpainting_model(pipe) else "StableDiffusionInstructPix2PixPipeline"
            if sampling.is_edit_model(pipe) else "StableDiffusionPipeline",
            "safety_checker": [None, None],
            "requires_safety_checker": False}
  refiner = pipe.text_encoder is None
  return {**index,
          "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner
          else "StableDiffusionXLInstructPix2PixPipeline" if sampling.is_edit_model(pipe)
          else "StableDiffusionXLPipeline",
          "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
          "tokenizer_2": ["transformers", "CLIPTokenizer"],
          "force_zeros_for_empty_prompt": pipe.force_zeros_for_empty_prompt,
          **({"requires_aesthetics_score": pipe.requires_aesthetics_score} if refiner else {})}


def _text_encoder_state(params) -> dict[str, np.ndarray]:
  """transformers' layout: the text model under `text_model.`, its projection beside it."""
  body = {k: v for k, v in params.items() if k != "text_projection"}
  state = flax_to_torch(body, prefix=TEXT_PREFIX)
  if "text_projection" in params:
    state.update(flax_to_torch({"text_projection": params["text_projection"]}))
  return state


def save_pretrained(pipe: Pipeline, folder: str) -> None:
  """Writes `pipe` as a diffusers-format folder (float32 safetensors weights)."""
  version = {"_diffusers_version": _DIFFUSERS_VERSION}
  scheduler_class = pipe.scheduler_config.get("_class_name", "PNDMScheduler")
  index = _model_index(pipe, scheduler_class)
  for name, entry in index.items():
    if isinstance(entry, list) and entry[0] is not None:
      os.makedirs(os.path.join(folder, name), exist_ok=True)
  _write_json(os.path.join(folder, "model_index.json"), index)
  _write_json(os.path.join(folder, "unet", "config.json"), {**pipe.unet.config.to_dict(), **version})
  _write_json(os.path.join(folder, "vae", "config.json"), {**pipe.vae.config.to_dict(), **version})
  _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
              {**pipe.scheduler_config, "_class_name": scheduler_class, **version})
  if pipe.low_res_scheduler_config is not None:
    _write_json(os.path.join(folder, "low_res_scheduler", "scheduler_config.json"),
                {**pipe.low_res_scheduler_config, "_class_name": "DDPMScheduler", **version})

  def f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)

  write_safetensors(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"),
                    flax_to_torch(f32(pipe.params["unet"])))
  write_safetensors(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"),
                    flax_to_torch(f32(pipe.params["vae"])))
  encoders = (("text_encoder", pipe.text_encoder, pipe.tokenizer, "tokenizer", "CLIPTextModel"),
              ("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2, "tokenizer_2",
               "CLIPTextModelWithProjection"))
  for name, module, tokenizer, tok_name, architecture in encoders:
    if module is None:
      continue
    _write_json(os.path.join(folder, name, "config.json"), module.config.to_dict(architecture))
    write_safetensors(os.path.join(folder, name, "model.safetensors"),
                      _text_encoder_state(f32(pipe.params[name])))
    tokenizer.save_pretrained(os.path.join(folder, tok_name))


def save_single_file(pipe: Pipeline, path: str, dtype: str = "float32") -> None:
  """Writes `pipe` as one original-layout `.safetensors` file (see `Pipeline.save_single_file`)."""
  if dtype not in ("float32", "float16"):
    raise PipelineError(f"save_single_file dtype {dtype!r}: use float32 or float16")
  if not path.endswith(".safetensors"):
    raise PipelineError(f"save_single_file writes .safetensors, not {path}")
  names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in pipe.params]
  states = {name: flax_to_torch(jax.tree.map(lambda x: np.asarray(x, dtype), pipe.params[name]))
            for name in names}
  text_cfgs = {n: getattr(pipe, n).config for n in ("text_encoder", "text_encoder_2")
               if getattr(pipe, n) is not None}
  family = single_file.config_family(text_cfgs)
  state = single_file.to_original(family, pipe.unet.config, pipe.vae.config, states)
  write_safetensors(path, {**state, **single_file.markers_for(pipe.scheduler_config, dtype,
                                                              pipe.vae.config)})


# -- IP-Adapters -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class IPAdapter:
  """An IP-Adapter for `Pipeline.generate(ip_adapter=...)`: its CLIP image encoder, its image
  projection and per cross-attention layer key/value weights (params: "image_encoder",
  "image_proj", and "layers" {n: (to_k_ip kernel, to_v_ip kernel)} by the file's layer number)."""

  image_encoder: CLIPVisionModelWithProjection
  projection: ImageProjection
  params: dict[str, Any]
  name: str

  @property
  def config(self):
    return self.projection.config

  @property
  def image_size(self) -> int:
    return self.image_encoder.config.image_size

  def layer_tree(self, pipe: Pipeline, index: int, scales=None) -> dict[str, Any]:
    """The per-layer weights as a tree beside `pipe`'s UNet params, as adapter `index` of the
    run (`layers.Attention`'s `to_k_ip_<index>`, `to_v_ip_<index>`, `ip_scale_<index>`); a
    one-line error unless they fit that UNet."""
    unet = pipe.params["unet"]
    if self.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
      raise ValueError(f"IP-Adapter {self.name} does not fit this model (image tokens of width "
                       f"{self.config.cross_attention_dim}, the UNet's context is "
                       f"{pipe.unet.config.cross_attention_dim}): an IP-Adapter for another "
                       "model family?")
    paths = ip_files.cross_attention_paths(unet)
    layers = self.params["layers"]
    if sorted(layers) != list(range(1, 2 * len(paths), 2)):
      raise ValueError(f"IP-Adapter {self.name} has weights for {len(layers)} cross-attention "
                       f"layers, this UNet has {len(paths)}: an IP-Adapter for another model "
                       "family?")
    per_layer = ip_layer_scales(pipe.unet.config, paths, scales)
    tree: dict[str, Any] = {}
    for n, path, scale in zip(sorted(layers), paths, per_layer, strict=True):
      node, want = tree, unet
      for part in path:
        node, want = node.setdefault(part, {}), want[part]
      for kind, kernel in zip(("k", "v"), layers[n], strict=True):
        if kernel.shape != tuple(want[f"to_{kind}"]["kernel"].shape):
          raise ValueError(f"IP-Adapter {self.name} does not fit this model (layer {n}'s "
                           f"to_{kind}_ip is {tuple(kernel.shape)[::-1]}, the UNet's layer "
                           f"takes {tuple(want[f'to_{kind}']['kernel'].shape)[::-1]})")
        node[f"to_{kind}_ip_{index}"] = {"kernel": kernel}
      node[f"ip_scale_{index}"] = jnp.float32(scale)
    return tree


def as_ip_adapters(value) -> tuple[IPAdapter, ...]:
  """One IP-Adapter or a sequence of them, as a tuple (a one-line error for anything else)."""
  adapters = (value,) if isinstance(value, IPAdapter) else tuple(value)
  if not adapters or not all(isinstance(a, IPAdapter) for a in adapters):
    raise ValueError("ip_adapter= takes an IPAdapter from load_ip_adapter, or a list of them")
  return adapters


def ip_layer_scales(unet_config: UNetConfig, paths, scales) -> list[float]:
  """Each cross-attention layer's scale multiplier: 1 everywhere for None, else from a dict as
  diffusers' `set_ip_adapter_scale` reads it (InstantStyle): {"down": ..., "mid": ..., "up":
  ...}, each a number or {"block_<i>": a number, or a list of one per attention layer of that
  block}; what it leaves out is 0."""
  if scales is None:
    return [1.0] * len(paths)
  if not isinstance(scales, dict) or set(scales) - {"down", "mid", "up"}:
    raise ValueError(f"a per-layer IP-Adapter scale is a dict with keys down, mid, up; got "
                     f"{scales!r}")
  out = []
  for path in paths:
    section, _, block = path[0].partition("_blocks_")
    value = scales.get("mid" if path[0] == "mid_block" else section, 0.0)
    if isinstance(value, list | tuple) and path[0] == "mid_block" and len(value) == 1:
      value = value[0]
    if isinstance(value, dict):
      known = {f"block_{i}" for i, t in enumerate(
          unet_config.down_block_types if section == "down" else unet_config.up_block_types)
          if t.startswith("CrossAttn")}
      if set(value) - known:
        raise ValueError(f"IP-Adapter scale: {section} has no attention block "
                         f"{sorted(set(value) - known)[0]!r} (it has {', '.join(sorted(known))})")
      value = value.get(f"block_{block}", 0.0)
      if isinstance(value, list | tuple):
        layer = int(path[1].rpartition("_")[2])
        count = sum(1 for p in paths if p[:1] == path[:1] and p[2:] == path[2:])
        if len(value) == 1:
          value = value[0]
        elif len(value) != count:
          raise ValueError(f"IP-Adapter scale: {section} block_{block} has {count} attention "
                           f"layers, got {len(value)} scales")
        else:
          value = value[layer]
    if not isinstance(value, int | float):
      raise ValueError(f"IP-Adapter scale: expected a number, got {value!r}")
    out.append(float(value))
  return out


def load_ip_adapter(source: str, image_encoder: str | None = None, dtype="float32", *,
                    param_dtype=None, revision: str | None = None) -> IPAdapter:
  """Loads an IP-Adapter file (`ip-adapter_sd15.safetensors`, `ip-adapter-plus_sdxl_vit-h.bin`,
  ...: a path, hub file or URL; pickles are read without running code) with its CLIP image
  encoder: `image_encoder`, a transformers `CLIPVisionModelWithProjection` folder or hub id, or
  one file of its weights (A1111's / ComfyUI's `clip_vision` files); default: the
  `image_encoder/` folder beside the file, or above it (h94/IP-Adapter's `models/` and
  `sdxl_models/` layout). `dtype`, `param_dtype` as `load_pipeline`'s."""
  compute = parse_dtype(dtype)
  store = parse_dtype(param_dtype) if param_dtype is not None else compute
  try:
    path = _local_file(source, "IP-Adapter", revision)
    proj_state, layer_state = ip_files.read_file(path)
    encoder, encoder_params = _image_encoder(image_encoder, path, revision, compute, store,
                                             source)
    cfg = ip_files.projection_config(proj_state, encoder.config.num_positions)
    want = encoder.config.projection_dim if cfg.kind == "image" else encoder.config.hidden_size
    if cfg.image_embed_dim != want:
      raise PipelineError(f"IP-Adapter {source} takes image features of width "
                          f"{cfg.image_embed_dim}, its image encoder makes {want}: the wrong "
                          "image encoder (ViT-H and ViT-bigG IP-Adapters differ)?")
    projection = ImageProjection(cfg, compute, store)
    features = (jnp.zeros((1, cfg.num_tokens if cfg.kind == "full" else 1, cfg.image_embed_dim))
                if cfg.uses_hidden_states else jnp.zeros((1, cfg.image_embed_dim)))
    proj_params = torch_to_flax(ip_files.projection_state(proj_state, cfg),
                                _expected_params(projection, features), "ip_adapter image_proj",
                                np.dtype(store))
    layers = ip_files.layer_kernels(layer_state, np.dtype(store))
  except (hub.HubError, config_utils.ConfigError, WeightsError, ValueError) as e:
    if isinstance(e, PipelineError):
      raise
    raise PipelineError(f"cannot load IP-Adapter {source}: {e}") from None
  return IPAdapter(encoder, projection, jax.device_put({
      "image_encoder": encoder_params, "image_proj": proj_params, "layers": layers}),
      str(source))


def _image_encoder(source: str | None, path: str, revision: str | None, compute, store,
                   adapter: str = ""):
  """(CLIPVisionModelWithProjection, its params) of `load_ip_adapter`'s `image_encoder`;
  default: beside the adapter's file (for a hub file, its repo's, downloaded)."""
  if source is None and hub.is_hub_file(adapter):
    source = hub.sibling_folder(adapter, "image_encoder", "model", revision=revision)
  if source is None:
    here = os.path.dirname(os.path.abspath(path))
    for folder in (here, os.path.dirname(here)):
      if os.path.isfile(os.path.join(folder, "image_encoder", "config.json")):
        source = os.path.join(folder, "image_encoder")
        break
    else:
      raise PipelineError(f"no image_encoder/ folder beside {path}: give image_encoder= (a "
                          "CLIPVisionModelWithProjection folder, hub id or file)")
  if single_file.is_single_file(source):
    encoder_path = _local_file(source, "image encoder", revision)
    state = single_file.read_single_file(encoder_path)
    raw = ip_files.vision_config(state, encoder_path)
  else:
    folder = hub.resolve_source(source, revision=revision, component="image_encoder")
    if os.path.isdir(os.path.join(folder, "image_encoder")):
      folder = os.path.join(folder, "image_encoder")
    raw = config_utils.read_json(os.path.join(folder, "config.json"))
    state = read_state_dict(folder, "image_encoder")
  model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(raw), compute, store)
  side = model.config.image_size
  expected = _expected_params(model, jnp.zeros((1, side, side, model.config.num_channels)))
  return model, torch_to_flax(ip_files.vision_state(state), expected, "image_encoder",
                              np.dtype(store))


def ip_adapter_input(pipe: Pipeline, ip_adapter, images, scale, n: int):
  """(`pipe` with the IP-Adapters, (each adapter's images [n, K, S, S, 3], their scales float32
  [n, A])) for `n` prompts: see `Pipeline.generate`'s ip_adapter arguments."""
  adapters = as_ip_adapters(ip_adapter)
  k = len(adapters)
  if images is None:
    raise ValueError("ip_adapter= needs ip_adapter_images")
  if k > 1 and (not isinstance(images, list | tuple) or len(images) != k):
    raise ValueError(f"with {k} IP-Adapters, ip_adapter_images is a list of {k} (one entry per "
                     "adapter, in order)")
  scales = list(scale) if isinstance(scale, list | tuple) else [scale] * k
  if len(scales) != k:
    raise ValueError(f"ip_adapter_scale must be one scale or one per IP-Adapter ({k}), got "
                     f"{len(scales)}")
  pixels = []
  for adapter, given in zip(adapters, [images] if k == 1 else images, strict=True):
    if isinstance(given, np.ndarray | jnp.ndarray) and np.ndim(given) == 4:  # one per prompt
      if len(given) not in (1, n):
        raise ValueError(f"ip_adapter_images: [N, H, W, 3] needs one image per prompt ({n}), "
                         f"got {len(given)}")
      per = np.stack([ip_adapter_pixels(adapter.image_size, image)
                      for image in np.asarray(given)])
    else:
      per = ip_adapter_pixels(adapter.image_size, given)[None]  # 1, K, S, S, 3: every prompt's
    pixels.append(np.ascontiguousarray(np.broadcast_to(per, (n, *per.shape[1:]))))
  numbers = [1.0 if isinstance(s, dict) else s for s in scales]
  if not all(isinstance(s, int | float) for s in numbers):
    raise ValueError(f"ip_adapter_scale: a number or a per-layer dict per adapter, got {scale!r}")
  wrapped = pipe.with_ip_adapter(adapters, [s if isinstance(s, dict) else None for s in scales])
  return wrapped, (tuple(pixels), np.tile(np.asarray(numbers, np.float32), (n, 1)))


def ip_adapter_mask_input(masks, pixels, n: int, height: int, width: int) -> tuple:
  """Per adapter None or its images' masks float32 [n, K, height, width] (0 or 1), for the
  adapters' images `pixels` (`ip_adapter_input`'s, [n, K, S, S, 3] each)."""
  several = len(pixels) > 1
  if several and (not isinstance(masks, list | tuple) or len(masks) != len(pixels)):
    raise ValueError(f"with {len(pixels)} IP-Adapters, ip_adapter_masks is a list of "
                     f"{len(pixels)} (one entry per adapter, None for none)")
  out = []
  for given, images in zip(masks if several else [masks], pixels, strict=True):
    if given is None:
      out.append(None)
      continue
    given = list(given) if isinstance(given, list | tuple) else [given]
    if len(given) != images.shape[1]:
      raise ValueError(f"ip_adapter_masks: one mask per image of the adapter's entry "
                       f"({images.shape[1]}), got {len(given)}")
    cut = np.stack([ip_adapter_mask(m, height, width) for m in given])
    out.append(np.ascontiguousarray(np.broadcast_to(cut, (n, *cut.shape))))
  return tuple(out)


def ip_adapter_mask(mask, height: int, width: int) -> np.ndarray:
  """float32 [height, width] of 0 and 1: a mask as diffusers' `IPAdapterMaskProcessor`
  prepares a PIL one (grey, Lanczos-resized, cut at 0.5); arrays in [0, 1] as 8-bit images."""
  if not isinstance(mask, Image.Image):
    array = np.asarray(mask, np.float32)
    if array.ndim == 2:
      array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
      raise ValueError(f"an IP-Adapter mask is a PIL image or [H, W] / [H, W, C] in [0, 1], "
                       f"got shape {array.shape}")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    mask = Image.fromarray(outputs.to_uint8(array))  # grey levels stay theirs in "L"
  grey = mask.convert("L").resize((width, height), resample=Image.Resampling.LANCZOS)
  levels = np.asarray(grey, np.float32) / np.float32(255.0)
  return (levels >= 0.5).astype(np.float32)


def ip_adapter_pixels(image_size: int, images) -> np.ndarray:
  """An IP-Adapter's image(s) as its encoder (of `image_size`) takes them: float32 [K, S, S, 3],
  resized (shorter side, bicubic), centre-cropped and normalized by CLIP's image processor, as
  diffusers' pipelines prepare `ip_adapter_image`. `images`: a PIL image or float [H, W, 3] in
  [0, 1], or a list of them (K images, whose tokens the UNet attends to together)."""
  processor = _clip_image_processor(image_size)
  many = images if isinstance(images, list | tuple) else [images]
  pil = []
  for image in many:
    if not isinstance(image, Image.Image):
      array = np.asarray(image, np.float32)
      if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an IP-Adapter image is a PIL image or [H, W, 3] in [0, 1], got shape "
                         f"{array.shape}")
      image = Image.fromarray(outputs.to_uint8(array))
    pil.append(image.convert("RGB"))
  pixels = processor(pil, return_tensors="np")["pixel_values"]  # K, 3, S, S
  return np.ascontiguousarray(np.asarray(pixels, np.float32).transpose(0, 2, 3, 1))


@functools.lru_cache(maxsize=4)
def _clip_image_processor(size: int):
  """transformers' CLIP image processor (its PIL backend: the same pixels with or without
  torchvision)."""
  import transformers  # noqa: PLC0415

  cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
  return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


__all__ = ["Pipeline", "PipelineError", "WeightsError", "build_pipeline", "load_pipeline"]
