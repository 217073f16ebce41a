"""Text conditioning for every family: token ids in, UNet conditioning out (pure, jit-able).

SD 1.x / 2.x condition the UNet on one CLIP encoder's hidden states. SDXL concatenates the
penultimate hidden states of two encoders, adds the second one's projected pooled state
(`text_embeds`) and the micro-conditioning `time_ids` (sizes, crop, aesthetic score) as diffusers'
`added_cond_kwargs`. The SDXL refiner has only the second encoder. `encode` follows diffusers'
`encode_prompt` of each pipeline; `sdxl_time_ids` its `_get_add_time_ids`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import prompts as prompt_lib
from sdjax.models import layers
from sdjax.models.adapter import T2IAdapter
from sdjax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class Networks:
  """The Flax modules of a pipeline (jit-static); either text encoder may be absent."""

  text_encoder: CLIPTextModel | None
  text_encoder_2: CLIPTextModelWithProjection | None
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  # `ControlNetModel`s steering the UNet (a tuple; params["controlnet"]: theirs, in order).
  controlnet: Any = None
  # IP-Adapters: per adapter (image encoder, image projection) (a tuple; params["ip_adapter"]:
  # {"image": theirs, in order, "layers": their per-layer weights beside the UNet's params}).
  ip_adapter: Any = None

  @property
  def is_sdxl(self) -> bool:
    return self.text_encoder_2 is not None


def apply(module, params, *args, method=None, **kwargs):
  """`module.apply({"params": params}, *args, method=method, **kwargs)`, traced once per
  module, method, input shapes and static inputs in this process: a network that several
  programs call (a run's samplers, a hires fix's passes, the UNet under each scheduler) is
  traced once and each program calls that trace (XLA inlines the call: the same HLO). Array
  inputs (and tracers) are the call's arguments; any other leaf (Python numbers and flags, a
  `PerturbedLayers`' set) is static, as it is to an inline trace. Keyed also on what the
  networks read when traced (`layers.trace_settings`)."""
  leaves, tree = jax.tree.flatten((args, kwargs))
  arrays = tuple(isinstance(leaf, (jax.Array, np.ndarray, np.generic)) for leaf in leaves)
  static = tuple(None if a else leaf for a, leaf in zip(arrays, leaves, strict=True))
  try:
    call = _traced(module, method, tree, arrays, static, layers.trace_settings())
  except TypeError:  # an unhashable static input: trace inline
    return module.apply({"params": params}, *args, method=method, **kwargs)
  return call(params, [leaf for a, leaf in zip(arrays, leaves, strict=True) if a])


@functools.lru_cache(maxsize=128)
def _traced(module, method, tree, arrays, static, settings):
  del settings  # the key only: the trace reads them

  def call(params, inputs):
    inputs = iter(inputs)
    args, kwargs = jax.tree.unflatten(tree, [next(inputs) if a else leaf
                                             for a, leaf in zip(arrays, static, strict=True)])
    return module.apply({"params": params}, *args, method=method, **kwargs)

  return jax.jit(call)


@flax.struct.dataclass
class PromptIds:
  """Token ids [B, 77] of one side of guidance, per text encoder (None where it is absent).

  With A1111 prompt syntax each is a `prompts.PromptBatch` (chunks, weights, schedule variants).
  """

  ids: jax.Array | None = None  # for text_encoder
  ids_2: jax.Array | None = None  # for text_encoder_2


@flax.struct.dataclass
class Conditioning:
  """Everything a sampling call conditions on, per image: a pytree, the batch first on every leaf.

  `zero_negative` [B] bool marks images whose negative context and pooled embeds are zeros
  (diffusers' `force_zeros_for_empty_prompt`); `time_ids` / `negative_time_ids` [B, K] are
  SDXL's micro-conditioning. With composable prompts (A1111's `AND`, `:weight`) `prompt` holds
  S rows per image (its parts, padded with parts of weight 0) and `part_weights` [B, S] their
  guidance weights. With IP-Adapters, `ip_images` holds each adapter's images [B, K, S, S, 3]
  (as its image encoder takes them), `ip_scales` [B, A] their scales and `ip_masks` per
  adapter None or its images' masks [B, K, H, W] (0/1 at the image size).
  """

  prompt: PromptIds
  negative: PromptIds
  zero_negative: jax.Array | None = None
  time_ids: jax.Array | None = None
  negative_time_ids: jax.Array | None = None
  part_weights: jax.Array | None = None
  ip_images: tuple | None = None
  ip_scales: jax.Array | None = None
  ip_masks: tuple | None = None


@flax.struct.dataclass
class Embeddings:
  """What the UNet takes besides x and t: context [B, 77, D] and SDXL's added conditioning."""

  context: jax.Array
  text_embeds: jax.Array | None = None
  time_ids: jax.Array | None = None
  # A1111 syntax: additive cross-attention bias [B, 1, 1, M] hiding padded chunks; and the
  # schedule [B, T] of the variant in force at each denoiser call, while `context` [B, V, M, D]
  # and `text_embeds` [B, V, P] still hold every variant (see `at`).
  context_bias: jax.Array | None = None
  schedule: jax.Array | None = None
  # IP-Adapters: image tokens per adapter [B, K*T, D], the adapters' scales [B, A] and per
  # adapter None or its images' masks [B, K, H, W].
  image_tokens: tuple | None = None
  image_scales: jax.Array | None = None
  image_masks: tuple | None = None
  # The UNet's class labels [B] (`num_class_embeds`: the x4 upscaler's noise level).
  class_labels: jax.Array | None = None

  def at(self, call) -> Embeddings:
    """The embeddings in force at denoiser call `call` (traced); themselves without schedule.
    A call past the table takes its last entry (`sampling.a1111_options`)."""
    if self.schedule is None:
      return self
    index = self.schedule[:, jnp.minimum(call, self.schedule.shape[1] - 1)]  # B

    def pick(x):
      return jnp.take_along_axis(x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]

    return self.replace(context=pick(self.context), schedule=None,
                        text_embeds=None if self.text_embeds is None else pick(self.text_embeds))

  @staticmethod
  def concat(a: Embeddings, b: Embeddings) -> Embeddings:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def check_clip_skip(nets: Networks, clip_skip: int | None) -> None:
  if clip_skip is None:
    return
  layers = min(e.config.num_hidden_layers for e in (nets.text_encoder, nets.text_encoder_2) if e)
  if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
    raise ValueError(f"clip_skip must be in [0, {layers}), got {clip_skip}")


def _encode_side_a1111(nets: Networks, params, ids: PromptIds, clip_skip: int | None):
  """A1111: every schedule variant's weighted, chunked context [B, V, K*77, D] (each text
  encoder weighted on its own, as A1111's SDXL embedders) and pooled embeds of the first chunk."""
  if not nets.is_sdxl:
    def encode(tokens, token_embeds):
      return apply(nets.text_encoder, params["text_encoder"], tokens, clip_skip,
                   token_embeds)["prompt_embeds"]

    return prompt_lib.encode_weighted(encode, ids.ids), None
  layer = -((clip_skip or 0) + 2)
  contexts = []
  if nets.text_encoder is not None:
    def encode_1(tokens, token_embeds):
      return apply(nets.text_encoder, params["text_encoder"], tokens, None,
                   token_embeds)["hidden_states"][layer]

    contexts.append(prompt_lib.encode_weighted(encode_1, ids.ids))

  def encode_2(tokens, token_embeds):
    out = apply(nets.text_encoder_2, params["text_encoder_2"], tokens, None, token_embeds)
    return out["hidden_states"][layer], out["text_embeds"]

  context, pooled = prompt_lib.encode_weighted(encode_2, ids.ids_2)
  return jnp.concatenate([*contexts, context], axis=-1), pooled  # B, V, K*77, D1 + D2


def encode_side(nets: Networks, params, ids: PromptIds, clip_skip: int | None):
  """Context [B, 77, D] and pooled text embeds [B, P] (None for SD1/SD2) of one side."""
  if isinstance(ids.ids if ids.ids is not None else ids.ids_2, prompt_lib.PromptBatch):
    return _encode_side_a1111(nets, params, ids, clip_skip)
  if not nets.is_sdxl:
    out = apply(nets.text_encoder, params["text_encoder"], ids.ids, clip_skip)
    return out["prompt_embeds"], None
  # diffusers' SDXL encode_prompt: hidden_states[-(clip_skip + 2)], no final LayerNorm.
  layer = -((clip_skip or 0) + 2)
  hidden = []
  if nets.text_encoder is not None:
    out = apply(nets.text_encoder, params["text_encoder"], ids.ids)
    hidden.append(out["hidden_states"][layer])
  out = apply(nets.text_encoder_2, params["text_encoder_2"], ids.ids_2)
  hidden.append(out["hidden_states"][layer])
  return jnp.concatenate(hidden, axis=-1), out["text_embeds"]  # B, 77, D1 + D2


def _zero_where(mask, x):
  if mask is None or x is None:
    return x
  return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x)


def encode(nets: Networks, params, cond: Conditioning, clip_skip: int | None = None,
           negative_clip_skip: int | None = None, guidance: bool = True):
  """(negative, positive) Embeddings of a conditioning; negative is None without guidance."""
  context, pooled = encode_side(nets, params, cond.prompt, clip_skip)
  negative_tokens, tokens = image_tokens(nets, params, cond)
  time_ids, scales, masks = cond.time_ids, cond.ip_scales, cond.ip_masks
  if cond.part_weights is not None:  # a row per part
    parts = cond.part_weights.shape[1]
    time_ids, tokens, scales, masks = jax.tree.map(lambda x: jnp.repeat(x, parts, axis=0),
                                                   (time_ids, tokens, scales, masks))
  positive = Embeddings(context, pooled, time_ids, *_a1111_extras(cond.prompt), tokens, scales,
                        masks)
  if not guidance:
    return None, positive
  context, pooled = encode_side(nets, params, cond.negative, negative_clip_skip)
  negative = Embeddings(_zero_where(cond.zero_negative, context),
                        _zero_where(cond.zero_negative, pooled), cond.negative_time_ids,
                        *_a1111_extras(cond.negative), negative_tokens, cond.ip_scales,
                        cond.ip_masks)
  return negative, positive


def image_tokens(nets: Networks, params, cond: Conditioning):
  """(negative, positive) IP-Adapter image tokens, per adapter [B, K*T, D] (None without
  IP-Adapters), as diffusers' `prepare_ip_adapter_image_embeds` and `encoder_hid_proj` make
  them: the projection of the image encoder's `image_embeds`, negative: of zeros; or, for
  projections of hidden states, of its penultimate hidden states, negative: of a black (zero)
  image's."""
  if cond.ip_images is None:
    return None, None
  negative, positive = [], []
  for (encoder, projection), p, pixels in zip(nets.ip_adapter, params["ip_adapter"]["image"],
                                              cond.ip_images, strict=True):
    b, k = pixels.shape[:2]
    flat = pixels.reshape(b * k, *pixels.shape[2:])
    hidden = projection.config.uses_hidden_states
    features = _image_features(encoder, p["image_encoder"], flat, hidden)
    blank = (_image_features(encoder, p["image_encoder"], jnp.zeros_like(flat[:1]), hidden)
             if hidden else jnp.zeros_like(features[:1]))
    width = projection.config.cross_attention_dim
    positive.append(apply(projection, p["image_proj"], features).reshape(b, -1, width))
    blank = apply(projection, p["image_proj"], blank).reshape(1, -1, width)
    negative.append(jnp.broadcast_to(jnp.tile(blank, (1, k, 1)), positive[-1].shape))  # K
  return tuple(negative), tuple(positive)


def _image_features(encoder, params, pixels, hidden: bool):
  """An IP-Adapter image encoder's penultimate hidden states (`hidden`), else image_embeds."""
  out = apply(encoder, params, pixels)
  return out["hidden_states"][-2] if hidden else out["image_embeds"]


def _a1111_extras(ids: PromptIds):
  """(context bias, schedule) of an A1111 side, else (None, None)."""
  batch = ids.ids if ids.ids is not None else ids.ids_2
  if not isinstance(batch, prompt_lib.PromptBatch):
    return None, None
  return prompt_lib.context_bias(batch), batch.schedule


# A1111's ControlNet "Control Mode" (its extension's names), per control model: "prompt" softens
# the residuals toward the UNet's input (a ControlNet's j-th residual, its down skips then the mid
# one, times 0.825^(12-j); a T2I-Adapter's feature maps times 0.25, 0.62, 0.825, 1);
# "controlnet" softens them too and adds them to the conditional rows of guidance only.
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "controlnet": "ControlNet is more important"}
_SOFT_CONTROLNET, _SOFT_ADAPTER = 0.825, (0.25, 0.62, 0.825, 1.0)


def control_mode(value: str) -> str:
  """A Control Mode's key in CONTROL_MODES, from the key or A1111's name (any case)."""
  for key, name in CONTROL_MODES.items():
    if str(value).strip().lower() in (key, name.lower()):
      return key
  raise ValueError(f"unknown control mode {value!r}; use one of "
                   f"{', '.join(repr(n) for n in CONTROL_MODES.values())} (or "
                   f"{', '.join(CONTROL_MODES)})")


class ControlInput(NamedTuple):
  """The control models' input at one UNet call."""

  images: tuple  # per control model: images [R, H, W, c] (an adapter's: its feature maps)
  scales: Any  # float32 [n], their weights at this call
  modes: tuple[str, ...] = ()  # per control model, CONTROL_MODES keys; (): all "balanced"
  cond_rows: Any = None  # float32 [R], 1 on the conditional rows of guidance; None: all


def _soften(residuals: list, mode: str, factors, cond_rows) -> list:
  """`residuals` under Control Mode `mode` (see CONTROL_MODES): `factors` per residual (zip
  truncates, as A1111's extension zips them), and no residual on unconditional rows."""
  if mode == "balanced":
    return residuals
  out = [r * jnp.asarray(f, r.dtype) for r, f in zip(residuals, factors, strict=False)]
  out += residuals[len(out):]
  if mode == "controlnet" and cond_rows is not None:
    out = [r * cond_rows.astype(r.dtype).reshape((-1,) + (1,) * (r.ndim - 1)) for r in out]
  return out


def adapter_features(nets: Networks, params, images) -> tuple:
  """The control inputs with each T2I-Adapter's images [B, H, W, c] replaced by its feature maps
  (a list): an adapter sees neither latents nor timestep, so this runs once per image."""
  return tuple(apply(net, p, x) if isinstance(net, T2IAdapter) else x
               for net, p, x in zip(nets.controlnet, params["controlnet"], images, strict=True))


def predict(nets: Networks, params, x, t, emb: Embeddings, timestep_cond=None, control=None,
            guess: int | None = None, pag=None):
  """The UNet's output for latents x [B, h, w, C] at t under embeddings `emb` (and an LCM
  model's `guidance_embedding`); `control` = a `ControlInput` (or (images, scales)): control
  images per ControlNet [B, H, W, c] in [0, 1] (a T2I-Adapter's: its `adapter_features`), their
  scales float32 [n], their Control Modes:
  `nets.controlnet`'s residuals, from the same inputs, summed in order (diffusers'
  MultiControlNetModel) and added to the UNet's, and the adapters' feature maps times their
  scales, summed in order (diffusers' MultiAdapter), added inside its down path. `guess`:
  diffusers' guess mode, the ControlNets run on rows `guess`: only (the first, unconditional
  ones get none). `pag`: the UNet's `PerturbedLayers` (perturbed-attention guidance)."""
  residuals = {}
  if control is not None:
    images, scales, modes, cond_rows = ControlInput(*control)
    modes = modes or ("balanced",) * len(images)
    skip = guess or 0
    n = x.shape[0]  # per-row inputs lose their first `skip` rows; a scalar t stays
    rows = jax.tree.map(lambda a: a[skip:] if jnp.ndim(a) and a.shape[0] == n else a,
                        (x, t, emb, timestep_cond))
    down = mid = intrablock = None
    for i, (net, net_params, image) in enumerate(zip(nets.controlnet, params["controlnet"],
                                                     images, strict=True)):
      if isinstance(net, T2IAdapter):
        scaled = _soften([f * scales[i].astype(f.dtype) for f in image], modes[i],
                         _SOFT_ADAPTER, cond_rows)
        intrablock = scaled if intrablock is None else [
            a + b for a, b in zip(intrablock, scaled, strict=True)]
        continue
      x_, t_, emb_, cond_ = rows
      # An inpainting UNet's input is the latents, the mask, the masked image's latents: a
      # ControlNet sees the latents (as diffusers' ControlNet inpainting pipelines).
      with layers.circular_padding(""):  # A1111's Tiling is the model's, not the ControlNet's
        d, m = apply(net, net_params, x_[..., :net.config.in_channels], t_, emb_.context,
                     image[skip:], scales[i], emb_.text_embeds, emb_.time_ids,
                     emb_.context_bias, cond_, guess is not None)
      *d, m = _soften([*d, m], modes[i], [_SOFT_CONTROLNET ** (12 - j) for j in range(13)],
                      cond_rows)
      down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
      mid = m if mid is None else mid + m
    if skip and down is not None:  # no residuals for the unconditional rows
      down, mid = ([jnp.pad(r, ((skip, 0),) + ((0, 0),) * (r.ndim - 1)) for r in down],
                   jnp.pad(mid, ((skip, 0),) + ((0, 0),) * (mid.ndim - 1)))
    if down is not None:
      residuals = {"down_residuals": down, "mid_residual": mid}
    if intrablock is not None:
      residuals["intrablock_residuals"] = intrablock
  unet_params = params["unet"]
  if emb.image_tokens is not None:  # the IP-Adapters' per-layer weights beside the UNet's
    unet_params = merge_params(unet_params, params["ip_adapter"]["layers"])
    masks = emb.image_masks or (None,) * len(emb.image_tokens)
    residuals["ip"] = tuple((tokens, emb.image_scales[:, a], mask)
                            for a, (tokens, mask) in enumerate(zip(emb.image_tokens, masks,
                                                                   strict=True)))
  if pag is not None:
    residuals["pag"] = pag
  if emb.class_labels is not None:
    residuals["class_labels"] = emb.class_labels
  return apply(nets.unet, unet_params, x, t, emb.context, emb.text_embeds, emb.time_ids,
               emb.context_bias, timestep_cond, **residuals)


def merge_params(params: dict, extra: dict) -> dict:
  """`params` with the (nested) entries of `extra` added (new dicts: neither is changed)."""
  out = dict(params)
  for key, value in extra.items():
    out[key] = merge_params(out.get(key, {}), value) if isinstance(value, dict) else value
  return out


def guidance_embedding(guidance_scale, batch: int, dim: int) -> jax.Array:
  """An LCM-distilled UNet's `timestep_cond` [batch, dim]: the sinusoidal embedding of
  w = (guidance_scale - 1) * 1000, as diffusers' `get_guidance_scale_embedding` (float32)."""
  w = (jnp.asarray(guidance_scale, jnp.float32) - 1) * jnp.float32(1000.0)
  half = dim // 2
  step = jnp.log(jnp.float32(10000.0)) / jnp.float32(half - 1)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
  angles = w * freqs
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
  if dim % 2:
    emb = jnp.pad(emb, (0, 1))
  return jnp.broadcast_to(emb, (batch, dim))


# -- micro-conditioning ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MicroConditioning:
  """SDXL's size / crop / aesthetic conditioning, by diffusers' argument names.

  Sizes are (height, width); None takes the diffusers default (the output size, (0, 0)).
  """

  original_size: tuple[int, int] | None = None
  crops_coords_top_left: tuple[int, int] = (0, 0)
  target_size: tuple[int, int] | None = None
  negative_original_size: tuple[int, int] | None = None
  negative_crops_coords_top_left: tuple[int, int] = (0, 0)
  negative_target_size: tuple[int, int] | None = None
  aesthetic_score: float = 6.0
  negative_aesthetic_score: float = 2.5

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


def sdxl_time_ids(micro: MicroConditioning, size: tuple[int, int], *, img2img: bool,
                  requires_aesthetics_score: bool) -> tuple[np.ndarray, np.ndarray]:
  """(time_ids, negative_time_ids) float32 [K] as diffusers' SDXL pipelines build them.

  Text-to-image (`StableDiffusionXLPipeline`): the negative ids equal the positive ones unless
  both negative sizes are given. Image-to-image (`StableDiffusionXLImg2ImgPipeline`, the
  refiner): negative sizes default to the positive ones; with an aesthetic score the ids are
  original size, crop, score (5), otherwise the negative ids take the *positive* crop, as there.
  """
  m = micro
  original = tuple(m.original_size or size)
  target = tuple(m.target_size or size)
  crops, neg_crops = tuple(m.crops_coords_top_left), tuple(m.negative_crops_coords_top_left)
  if not img2img:
    ids = original + crops + target
    if m.negative_original_size is not None and m.negative_target_size is not None:
      negative = tuple(m.negative_original_size) + neg_crops + tuple(m.negative_target_size)
    else:
      negative = ids
  else:
    neg_original = tuple(m.negative_original_size or original)
    neg_target = tuple(m.negative_target_size or target)
    if requires_aesthetics_score:
      ids = original + crops + (m.aesthetic_score,)
      negative = neg_original + neg_crops + (m.negative_aesthetic_score,)
    else:
      ids = original + crops + target
      negative = neg_original + crops + neg_target
  return np.asarray(ids, np.float32), np.asarray(negative, np.float32)


def check_time_ids(nets: Networks, n_ids: int) -> None:
  """diffusers' check that pooled width + time ids fill the UNet's add_embedding input."""
  cfg = nets.unet.config
  passed = nets.text_encoder_2.config.projection_dim + n_ids * cfg.addition_time_embed_dim
  if passed != cfg.projection_class_embeddings_input_dim:
    raise ValueError(
        f"the UNet expects added conditioning of width {cfg.projection_class_embeddings_input_dim}"
        f" but {n_ids} time ids and text_encoder_2's projection_dim give {passed}: check "
        "requires_aesthetics_score in model_index.json")
