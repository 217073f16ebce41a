"""A ComfyUI image's settings back to main.py flags: the workflow ComfyUI saves in its PNGs.

ComfyUI writes no A1111 `parameters` text; its SaveImage node stores the graph it ran (the
"prompt" text chunk: node id -> {"class_type", "inputs"}, an input linking to another node's
output as ["node id", output index]). `reproduce(graph)` finds the text-to-image sampler
(KSampler or KSamplerAdvanced) and follows its links: the prompts (CLIPTextEncode), the size
(EmptyLatentImage), the checkpoint, Clip skip (CLIPSetLastLayer) and the VAE, and the LoRAs
(LoraLoader) as A1111's `<lora:name:te:unet>` tags on the prompt, for --lora_dir; it maps
ComfyUI's sampler and scheduler names to sdjax's (its "normal", "karras", ... are A1111's
schedule types of the same names, over k-diffusion's noise levels), its CPU noise to
`--rng torch_cpu` and its prompt weighting to `--emphasis ComfyUI`. The result goes through
`infotext.from_fields`, as an A1111 image's fields.

A hires fix (a second KSampler denoising the first's latents enlarged by LatentUpscale or
LatentUpscaleBy, then decoded) comes back as A1111's hires fields: the size (ComfyUI rounds the
latents' size where A1111 floors the pixels': a `Hires resize` then), the upscale method
(nearest-exact, bilinear, bicubic: A1111's latent upscalers of those modes), the second
sampler's steps and denoise (ComfyUI runs the last `steps` of int(steps / denoise), as A1111's
hires pass), and its own sampler, scheduler, CFG and prompts where they differ.

A KSampler over a VAEEncode latent is img2img (its denoise the strength, the image encoded to
the posterior's mode: `Image encode: mode`; a KSamplerAdvanced from step k of n: n - k steps at
the strength that places n levels), over a SetLatentNoiseMask latent inpainting (`Inpaint
blend: ComfyUI`; a DifferentialDiffusion on the model's way: `Differential diffusion`); the image
and mask files are not in the graph: the notes ask for them. An ImageCompositeMasked pasting that
image back over the decoded one through that mask is `Inpaint composite` (--comfyui_composite).

The settings come back, and where sdjax's scheduler takes the `comfyui` option (Euler, Euler a,
Heun, LMS, DPM++ SDE, the DPM++ multistep family) it steps as ComfyUI's KSampler: from its noise times
sqrt(1 + sigma_max^2) (A1111: sigma_max), the UNet at the nearest whole timestep. Its ancestral
samplers draw their step noise from a CUDA generator seeded by the whole 64-bit seed
(--step_rng nv, --seed_high), its SDE samplers from a Brownian tree (--brownian). ComfyUI splits
long prompts its own way; the notes say what differs.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image

from sdjax import infotext, outputs, schedulers
from sdjax.schedulers import dpm_adaptive, sigma_schedules
from sdjax.schedulers.comfyui_samplers import SA_SETTINGS
from sdjax.schedulers.common import check_s_noise
from sdjax.schedulers.lms import LMS_ORDER, check_lms_order

# ComfyUI's sampler names -> sdjax's. Its "ddim" is Euler (DDIM with eta 0, over its scheduler's
# levels); the _gpu variants differ only in where their Brownian tree lives (--brownian).
SAMPLERS = {
    "euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpm_2": "kdpm2",
    "dpm_2_ancestral": "kdpm2_ancestral", "lms": "lms", "dpmpp_2s_ancestral": "dpmpp_2s_ancestral",
    "dpmpp_sde": "dpmpp_sde", "dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m": "dpmpp_2m",
    "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde": "dpmpp_3m_sde", "dpmpp_3m_sde_gpu": "dpmpp_3m_sde", "ddim": "euler",
    "uni_pc": "unipc", "uni_pc_bh2": "unipc", "lcm": "lcm", "ddpm": "k_ddpm",
    "euler_cfg_pp": "euler_cfg_pp", "euler_ancestral_cfg_pp": "euler_ancestral_cfg_pp",
    "ipndm": "ipndm", "ipndm_v": "ipndm_v", "res_multistep": "res_multistep",
    "gradient_estimation": "gradient_estimation", "dpmpp_2m_cfg_pp": "dpmpp_2m_cfg_pp",
    "res_multistep_cfg_pp": "res_multistep_cfg_pp",
    "gradient_estimation_cfg_pp": "gradient_estimation_cfg_pp",
    "res_multistep_ancestral": "res_multistep_ancestral", "er_sde": "er_sde",
    "res_multistep_ancestral_cfg_pp": "res_multistep_ancestral_cfg_pp", "deis": "deis_tab",
    "seeds_2": "seeds_2", "seeds_3": "seeds_3", "heunpp2": "heunpp2",
    "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral_cfg_pp", "dpm_fast": "dpm_fast",
    "sa_solver": "sa_solver", "sa_solver_pece": "sa_solver_pece", "dpm_adaptive": "dpm_adaptive",
}
# ComfyUI's schedulers that are sdjax's (A1111's) schedule types of the same name.
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "beta", "kl_optimal",
              "polyexponential")  # the last: its PolyexponentialScheduler node's
# Samplers whose levels its KSampler (not its custom sampling nodes) places for one step more and
# drops the next-to-last of (its DISCARD_PENULTIMATE_SIGMA_SAMPLERS).
_DISCARDING = ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2")
# Its schedulers whose levels sdjax's schedule types do not place (ddim_uniform's count may not
# be the steps'): computed from its table of Stable Diffusion's schedule, the run's --sigmas.
_TABLE_SCHEDULERS = {"ddim_uniform": "ddim", "linear_quadratic": "linear_quadratic"}
# Samplers drawing fresh noise each step from a generator on ComfyUI's device (its GPU's).
_DEVICE_NOISE = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "lcm", "ddpm",
                 "euler_ancestral_cfg_pp", "res_multistep_ancestral",
                 "res_multistep_ancestral_cfg_pp", "er_sde", "seeds_2", "seeds_3",
                 "dpmpp_2s_ancestral_cfg_pp", "sa_solver", "sa_solver_pece")
# Its sampler nodes with settings (for its custom-sampling nodes) -> the KSampler sampler they
# make: by noise_device (_gpu), solver_type or use_pece; their defaults (of settings sdjax has
# not: others are a note; eta becomes A1111's Eta, which sdjax's takes from 0 to 1, s_noise the
# s_noise option, LMS's order lms's lms_order, ER-SDE's solver type and stages er_sde's options,
# SA-Solver's orders and SDE interval sa_solver's).
_SAMPLER_SETTINGS_NODES = {
  "SamplerEulerAncestral": ("euler_ancestral", {}),
  "SamplerEulerAncestralCFGPP": ("euler_ancestral_cfg_pp", {}),
  "SamplerDPMPP_2S_Ancestral": ("dpmpp_2s_ancestral", {}),
  "SamplerDPMPP_SDE": ("dpmpp_sde", {"r": 0.5}),
  "SamplerDPMPP_2M_SDE": ("dpmpp_2m_sde", {}),
  "SamplerDPMPP_3M_SDE": ("dpmpp_3m_sde", {}),
  "SamplerLMS": ("lms", {}),
  "SamplerER_SDE": ("er_sde", {}),
  "SamplerSASolver": ("sa_solver", {}),
  "SamplerDPMAdaptative": ("dpm_adaptive", {}),
}
# SamplerDPMAdaptative's settings beside its order (dpm_adaptive's options of the same names).
_DPM_ADAPTIVE_NODE = {k: v for k, v in dpm_adaptive.SETTINGS.items() if k != dpm_adaptive.ORDER}
# Its custom-sampling nodes: the sampler, its levels, noise and guidance from nodes of their own
# (`_ksampler_inputs` reads them as a KSampler's inputs).
_CUSTOM_SAMPLER_NODES = ("SamplerCustom", "SamplerCustomAdvanced")
_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced", *_CUSTOM_SAMPLER_NODES)
# Its sigma nodes of fixed ranges: ComfyUI's scheduler name, A1111's settings fields of inputs.
_SIGMA_NODES = {
    "KarrasScheduler": ("karras", {"sigma_min": "Schedule min sigma",
                                   "sigma_max": "Schedule max sigma", "rho": "Schedule rho"}),
    "ExponentialScheduler": ("exponential", {"sigma_min": "Schedule min sigma",
                                             "sigma_max": "Schedule max sigma"}),
    "PolyexponentialScheduler": ("polyexponential", {
        "sigma_min": "Schedule min sigma", "sigma_max": "Schedule max sigma",
        "rho": "Schedule rho"}),
    "BetaSamplingScheduler": ("beta", {"alpha": "Beta schedule alpha",
                                       "beta": "Beta schedule beta"}),
}
# Its AlignYourStepsScheduler's levels (NVIDIA's, to more digits than A1111's table), for SD1.5
# and SDXL: that node's sigmas become the run's own (--sigmas).
_AYS_LEVELS = {
    "SD1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177,
            1.3943805092, 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "SDXL": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
             0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}


def _ays_sigmas(model_type: str, steps: int, denoise: float) -> list[float] | None:
  """ComfyUI's AlignYourStepsScheduler: its levels (interpolated in log sigma to steps + 1 where
  they are not as many), the last round(steps * denoise) + 1 of them, the final one 0, in
  float32; None for a model type sdjax has no levels of."""
  if model_type not in _AYS_LEVELS or not isinstance(steps, int) or steps < 1:
    return None
  levels = np.asarray(_AYS_LEVELS[model_type], np.float64)
  if steps + 1 != len(levels):  # log-linear, on the ascending levels
    ys = np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, len(levels)),
                   np.log(levels[::-1]))
    levels = np.exp(ys)[::-1]
  total = steps if denoise >= 1.0 else round(steps * denoise)
  levels = np.array(levels[-(total + 1):], np.float64)
  levels[-1] = 0
  return [float(v) for v in levels.astype(np.float32)]
_CHECKPOINT_NODES = {"CheckpointLoaderSimple": "ckpt_name", "CheckpointLoader": "ckpt_name",
                     "unCLIPCheckpointLoader": "ckpt_name", "UNETLoader": "unet_name"}
_LORA_NODES = ("LoraLoader", "LoraLoaderModelOnly")
# Its node that sets the model's prediction type and zero-terminal-SNR schedule (zsnr).
_MODEL_SAMPLING = "ModelSamplingDiscrete"
# An inpainting model's conditioning and latent (its masked image and mask for the UNet, the
# image's latents with a noise mask): `_Reader.inpaint_latent`.
_INPAINT_CONDITIONING = "InpaintModelConditioning"
# Its node that thresholds a noise mask at each step (`--differential_diffusion`).
_DIFFERENTIAL = "DifferentialDiffusion"
# Its ControlNet nodes: apply (to a conditioning, or a pair), and load.
_CONTROLNET_APPLY = ("ControlNetApply", "ControlNetApplyAdvanced")
_CONTROLNET_LOADERS = ("ControlNetLoader", "DiffControlNetLoader")
# Its PerturbedAttentionGuidance node: sdjax's PAG over the mid block's self-attention (its
# post-CFG `cfg_result + (cond_pred - pag) * scale` in x0 is diffusers' term in eps), scale 3
# by default.
_PAG = "PerturbedAttentionGuidance"
# Its RescaleCFG node (--guidance_rescale, its multiplier, 0.7 by default, in the comfyui form).
_RESCALE_CFG = "RescaleCFG"
# Its FreeU nodes: sdjax's freeu forms (--freeu_form), with their inputs' defaults.
_FREEU_NODES = {"FreeU": ("comfyui", {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}),
                "FreeU_V2": ("comfyui_v2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2})}
# A latent with a noise mask from a masked image, the mask grown (`--grow_mask_by`).
_ENCODE_FOR_INPAINT = "VAEEncodeForInpaint"
_LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".bin")
_TEXT_NODES = {"CLIPTextEncode": "text", "CLIPTextEncodeSDXL": "text_g",
               "CLIPTextEncodeSDXLRefiner": "text"}
# CLIPTextEncodeSDXL's micro-conditioning inputs (its adm: original, crop, target size).
_MICRO_INPUTS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")
# ComfyUI's latent upscale methods that are A1111's latent upscalers (both torch's interpolate).
_LATENT_UPSCALE_METHODS = {"nearest-exact": "Latent (nearest-exact)", "bilinear": "Latent",
                           "bicubic": "Latent (bicubic)"}
_LATENT_UPSCALE_NODES = ("LatentUpscale", "LatentUpscaleBy")


def read_graph_text(data: bytes) -> str | None:
  """The workflow a ComfyUI PNG carries (its "prompt" text chunk, JSON), or None."""
  with Image.open(io.BytesIO(data)) as image:
    text = image.info.get("prompt")
  return text if isinstance(text, str) and parse_graph(text) is not None else None


def parse_graph(text: str) -> dict[str, dict[str, Any]] | None:
  """ComfyUI's API graph in `text` (node id -> {"class_type", "inputs"}), or None when the text
  is not one."""
  if not text.lstrip().startswith("{"):
    return None
  try:
    graph = json.loads(text)
  except json.JSONDecodeError:
    return None
  if not isinstance(graph, dict) or not graph or not all(
      isinstance(node, dict) and isinstance(node.get("class_type"), str)
      and isinstance(node.get("inputs", {}), dict) for node in graph.values()):
    return None
  return graph


def _linked(graph, value) -> tuple[str, dict[str, Any]] | None:
  """(id, node) an input links to, or None for a literal."""
  if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
      and value[0] in graph):
    return value[0], graph[value[0]]
  return None


def _inputs(node) -> dict[str, Any]:
  return node.get("inputs", {})


class _Reader:
  """Follows one sampler's links through the graph, gathering A1111 fields and notes."""

  def __init__(self, graph):
    self.graph = graph
    self.fields: dict[str, str] = {}  # A1111's names (`infotext.from_fields`)
    self.loras: list[str] = []  # A1111's <lora:name:te:unet> tags, the checkpoint's first
    self.lcm_node: str | None = None  # a ModelSamplingDiscrete "lcm" node's id
    # SDXL micro-conditioning of the CLIPTextEncodeSDXL nodes, by which conditioning it is
    self.micro: dict[str, tuple] = {}
    self.text_l: str | None = None  # of the last `text` read, where it differs from text_g
    self.texts_l: dict[str, str | None] = {}  # the first pass's, by "prompt" / "negative_prompt"
    self.notes: list[tuple[str | None, str]] = []
    self._noted: set[str] = set()
    # an inpainting's image and mask, as the sampler's latent links them (for ImageCompositeMasked)
    self.image_link: Any = None
    self.mask_link: Any = None
    # ControlNet apply nodes on the conditionings' way: id -> which ("positive conditioning",
    # ...), in the order met
    self.controls: dict[str, set[str]] = {}

  def note(self, flag: str | None, text: str) -> None:
    if text not in self._noted:
      self._noted.add(text)
      self.notes.append((flag, text))

  def follow(self, value, through: tuple[str, ...], what: str):
    """The node `value` links to, passing nodes that only modify what flows (their input named
    one of `through`; noted as not reproduced) until one of another kind."""
    seen = set()
    while (link := _linked(self.graph, value)) is not None and link[0] not in seen:
      seen.add(link[0])
      node_id, node = link
      kind = node["class_type"]
      passes = next((name for name in through if name in _inputs(node)), None)
      if kind in _TEXT_NODES or kind in _CHECKPOINT_NODES or kind in _LORA_NODES or (
          kind in (_MODEL_SAMPLING, _DIFFERENTIAL, _PAG, _RESCALE_CFG, *_FREEU_NODES)
          or passes is None):
        return node_id, node
      if kind in _CONTROLNET_APPLY:  # (`controlnets`)
        self.controls.setdefault(node_id, set()).add(what)
      elif kind not in ("CLIPSetLastLayer", _INPAINT_CONDITIONING):  # (its inputs: `latent`)
        self.note(None, f"node {node_id} ({kind}) changes the {what}: not reproduced")
      value = _inputs(node)[passes]
    return None

  def text(self, value, which: str) -> str:
    """The text of a conditioning input (`which`: positive / negative)."""
    found = self.follow(value, ("conditioning", "conditioning_to", which, "conditioning_1"),
                        f"{which} conditioning")
    if found is None or found[1]["class_type"] not in _TEXT_NODES:
      kind = "nothing" if found is None else found[1]["class_type"]
      raise ValueError(f"ComfyUI workflow: the sampler's {which} conditioning comes from {kind}, "
                       "not from a text encoder sdjax can read")
    node_id, node = found
    text = self._string(_inputs(node).get(_TEXT_NODES[node["class_type"]], ""), which)
    # SDXL's CLIP-L text where it is not its text_g (CLIP-G's): sdjax's prompt, with prompt_2
    # text_g (diffusers' pairing: prompt to text_encoder, prompt_2 to text_encoder_2).
    self.text_l = None
    if node["class_type"] == "CLIPTextEncodeSDXL":
      text_l = self._string(_inputs(node).get("text_l", text), which)
      self.text_l = None if text_l == text else text_l
    if node["class_type"] == "CLIPTextEncodeSDXL":  # its size, crop and target size inputs
      self.micro[which] = tuple(_inputs(node).get(key) for key in _MICRO_INPUTS)
    if node["class_type"] == "CLIPTextEncode":
      self._clip(_inputs(node).get("clip"))
    return text

  def _string(self, text, which: str) -> str:
    """A text input's string: its own, or a string node's output; its textual-inversion
    embeddings named as A1111 names them (`_a1111_embeddings`)."""
    while (link := _linked(self.graph, text)) is not None:
      text = next((v for v in _inputs(link[1]).values() if isinstance(v, str)), None)
      if text is None:
        raise ValueError(f"ComfyUI workflow: node {link[0]} ({link[1]['class_type']}) gives "
                         f"the {which} text: not a plain string")
    text, names = _a1111_embeddings(text if isinstance(text, str) else str(text))
    if names:
      self.note("embeddings_dir", f"the {which} text names textual-inversion embeddings "
                                  f"({', '.join(names)}; ComfyUI's embedding:NAME, here A1111's "
                                  "NAME): give --embeddings_dir (ComfyUI's models/embeddings)")
    return text

  def controlnets(self) -> None:
    """The ControlNets the sampler's conditionings went through, as A1111's `ControlNet N`
    units (`infotext` reads them: --controlnet_scale, --control_guidance_start / _end), the one
    nearest the text first (ComfyUI chains them so and sums their residuals): a
    ControlNetApplyAdvanced on both conditionings' way, or a ControlNetApply on the positive's
    (ComfyUI applies its ControlNet to the negative too), steers both halves of guidance as
    sdjax's do; its strength the Weight (0: none), its start / end percent the Guidance Start /
    End (noted: ComfyUI counts them in noise levels). Its image's LoadImage file, or the node
    that made it (the unit's Module: a preprocessor), is noted."""
    units, images = [], []
    both = {"positive conditioning", "negative conditioning"}
    for node_id in reversed(list(self.controls)):
      node = self.graph[node_id]
      kind, inputs, seen = node["class_type"], _inputs(node), self.controls[node_id]
      if (kind == "ControlNetApplyAdvanced" and seen != both) or (
          kind == "ControlNetApply" and "positive conditioning" not in seen):
        self.note("controlnet", f"node {node_id} ({kind}) controls only the "
                                f"{', '.join(sorted(seen))}: not reproduced (sdjax's "
                                "ControlNets steer both halves of guidance)")
        continue
      strength = self.number(node_id, inputs, "strength", 1.0, "controlnet_scale")
      start = self.number(node_id, inputs, "start_percent", 0.0, "control_guidance_start")
      end = self.number(node_id, inputs, "end_percent", 1.0, "control_guidance_end")
      if strength == 0 or None in (strength, start, end):  # (0: ComfyUI's node does nothing)
        continue
      loader = _linked(self.graph, inputs.get("control_net"))
      if loader is not None and loader[1]["class_type"] in _CONTROLNET_LOADERS:
        name = str(_inputs(loader[1]).get("control_net_name"))
      else:
        name = f"node {loader[0] if loader else '?'}'s"
      image = _linked(self.graph, inputs.get("image"))
      module = "none"
      if image is not None and image[1]["class_type"] == "LoadImage":
        images.append(str(_inputs(image[1]).get("image")))
      else:
        module = image[1]["class_type"] if image is not None else "none"
        images.append(f"node {image[0] if image else '?'} ({module})'s image")
      units.append(f"Module: {module}, Model: {name}, Weight: {strength:g}, Guidance Start: "
                   f"{start:g}, Guidance End: {end:g}")
    for i, unit in enumerate(units):
      self.fields[f"ControlNet {i}"] = unit
    if units:
      self.note("control_image", f"the ControlNets' images: {', '.join(images)}: give them "
                                 "with --control_image, in order, at the image's size (ComfyUI "
                                 "fits another size by nearest-exact scaling and a centre crop)")
    if any(", Guidance Start: 0, Guidance End: 1" not in unit for unit in units):
      self.note("control_guidance_end", "ComfyUI bounds a ControlNet by noise levels (start / "
                                        "end percent of the model's timesteps), sdjax by the "
                                        "share of the steps: the steps it steers may differ")

  def micro_conditioning(self) -> None:
    """SDXL's Original size, Crop and Target size fields of a CLIPTextEncodeSDXL's inputs (a
    plain text encoder's: ComfyUI's defaults, the image size, no crop), and the negative ones
    where its sizes differ from the positive's (sdjax's negative conditioning takes the
    positive's unless given)."""
    if not self.micro or "Size" not in self.fields:
      return
    width, height = (int(v) for v in self.fields["Size"].split("x"))
    default = (width, height, 0, 0, width, height)
    sizes = {which: self.micro.get(which, default) for which in ("positive", "negative")}
    if not all(isinstance(v, int) and not isinstance(v, bool)
               for values in sizes.values() for v in values):
      self.note(None, "a CLIPTextEncodeSDXL's size inputs come from other nodes: not reproduced")
      return
    for which, keys in (("positive", ("Original size", "Crop", "Target size")),
                        ("negative", ("Negative original size", "Negative crop",
                                      "Negative target size"))):
      if which == "negative" and sizes["negative"] == sizes["positive"]:
        break
      w, h, crop_w, crop_h, target_w, target_h = sizes[which]
      self.fields.update(zip(keys, (f"{w}x{h}", f"{crop_w}x{crop_h}", f"{target_w}x{target_h}"),
                             strict=True))

  def _clip(self, value) -> None:
    """Clip skip from a CLIPSetLastLayer on the text encoder's way (-2: the penultimate)."""
    seen = set()
    while (link := _linked(self.graph, value)) is not None and link[0] not in seen:
      seen.add(link[0])
      node = link[1]
      if node["class_type"] == "CLIPSetLastLayer":
        layer = _inputs(node).get("stop_at_clip_layer", -1)
        if isinstance(layer, int) and layer < -1:
          self.fields.setdefault("Clip skip", str(-layer))
        return
      value = _inputs(node).get("clip")

  def model(self, value) -> None:
    """The checkpoint (its file name), the LoRAs on the model's way, its sampling settings
    (ModelSamplingDiscrete: the one nearest the sampler, the last ComfyUI applied), a
    DifferentialDiffusion's strength, a FreeU or FreeU_V2 node's factors (`FreeU`, `FreeU
    form`: --freeu, --freeu_form) and a PerturbedAttentionGuidance node's scale (--pag_scale,
    its mid block: sdjax's default --pag_applied_layers)."""
    sampling_seen, seen = False, set()
    while (found := self.follow(value, ("model",), "model")) is not None:
      node_id, node = found
      if node_id in seen:
        raise ValueError(f"ComfyUI workflow: the model's links run in a circle through node "
                         f"{node_id}")
      seen.add(node_id)
      kind, inputs = node["class_type"], _inputs(node)
      if kind == _MODEL_SAMPLING:
        if not sampling_seen:
          self.model_sampling(node_id, inputs)
        sampling_seen = True
        value = inputs.get("model")
        continue
      if kind == _DIFFERENTIAL:  # (its strength: ComfyUI's default 1)
        strength = self.number(node_id, inputs, "strength", 1.0, "differential_diffusion")
        if strength is not None:
          self.fields["Differential diffusion"] = f"{strength:g}"
        value = inputs.get("model")
        continue
      if kind in _FREEU_NODES:
        self.freeu(node_id, kind, inputs)
        value = inputs.get("model")
        continue
      if kind == _RESCALE_CFG:  # (the one nearest the sampler: ComfyUI keeps the last set)
        multiplier = self.number(node_id, inputs, "multiplier", 0.7, "guidance_rescale")
        if multiplier is not None and "Guidance rescale" not in self.fields:
          self.fields["Guidance rescale"] = f"{multiplier:g}"
          self.fields["Guidance rescale form"] = "ComfyUI RescaleCFG"
        value = inputs.get("model")
        continue
      if kind == _PAG:
        if "PerturbedAttentionGuidance_scale" in self.fields:
          self.note("pag_scale", f"node {node_id} ({kind}) adds a second perturbed pass: not "
                                 "reproduced")
        elif scale := self.number(node_id, inputs, "scale", 3.0, "pag_scale"):  # (0: none)
          self.fields["PerturbedAttentionGuidance_scale"] = f"{scale:g}"
        value = inputs.get("model")
        continue
      if kind in _CHECKPOINT_NODES:
        # A name relative to ComfyUI's models folder ("SDXL/x.safetensors" is no hub id).
        self.note("model", f"made with the checkpoint {inputs.get(_CHECKPOINT_NODES[kind])}: "
                           "give it with --model")
        return
      if kind not in _LORA_NODES:
        self.note("model", f"the model comes from node {node_id} ({kind}): give it with --model")
        return
      name, strength = inputs.get("lora_name"), inputs.get("strength_model", 1.0)
      clip = inputs.get("strength_clip", strength) if kind == "LoraLoader" else 0
      if isinstance(name, str) and all(isinstance(s, int | float) for s in (strength, clip)):
        stem = name.rsplit(".", 1)[0] if name.endswith(_LORA_EXTENSIONS) else name
        self.loras.insert(0, f"<lora:{stem}:{clip:g}:{strength:g}>")  # text encoder, UNet
      value = inputs.get("model")

  def number(self, node_id: str, inputs: dict[str, Any], name: str, default: float,
             flag: str) -> float | None:
    """A node's number input (`default` where absent); None, and a note asking for `flag`,
    where another node gives it."""
    value = inputs.get(name, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
      return value
    self.note(flag, f"node {node_id}'s {name} comes from another node: give --{flag}")
    return None

  def freeu(self, node_id: str, kind: str, inputs: dict[str, Any]) -> None:
    """A FreeU / FreeU_V2 node: its factors (ComfyUI's defaults where absent); a second one
    (ComfyUI applies both) is noted."""
    form, defaults = _FREEU_NODES[kind]
    factors = [inputs.get(name, defaults[name]) for name in ("s1", "s2", "b1", "b2")]
    if "FreeU" in self.fields:
      self.note("freeu", f"node {node_id} ({kind}) applies FreeU a second time: not reproduced "
                         "(sdjax applies one)")
    elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in factors):
      self.fields["FreeU"] = ", ".join(f"{name}={value:g}" for name, value in zip(
          ("s1", "s2", "b1", "b2"), factors, strict=True))
      self.fields["FreeU form"] = outputs.FREEU_FORM_NAMES[form]
    else:
      self.note("freeu", f"node {node_id} ({kind})'s factors come from other nodes: give "
                         f"--freeu and --freeu_form {form}")

  def model_sampling(self, node_id: str, inputs: dict[str, Any]) -> None:
    """ModelSamplingDiscrete: zsnr is A1111's Noise Schedule (ComfyUI's rescale, in the comfyui
    form); the prediction type is the model's in sdjax (its v_pred key or scheduler config)."""
    sampling, zsnr = inputs.get("sampling", "eps"), inputs.get("zsnr", False)
    if zsnr is True:
      self.fields["Noise Schedule"] = "Zero Terminal SNR"
    if sampling == "v_prediction":
      self.note("scheduler_options",
                f"node {node_id} ({_MODEL_SAMPLING}) makes the model a v-prediction one"
                + (", without zero terminal SNR" if zsnr is not True else "") + ": sdjax reads "
                "that off the model (its v_pred / ztsnr keys, its scheduler config); for a model "
                "without them give --scheduler_options '{\"prediction_type\": \"v_prediction\"}'")
    elif sampling == "lcm":  # ComfyUI's lcm sampler over it is lcm's comfyui form (`reproduce`)
      self.lcm_node = node_id
    elif sampling != "eps":
      self.note(None, f"node {node_id} ({_MODEL_SAMPLING}) samples the model as {sampling}: not "
                      "reproduced")

  def latent(self, value, denoise) -> None:
    """The size (an empty latent's), or what an img2img latent came from; a noise mask on it
    (SetLatentNoiseMask) is ComfyUI's inpainting (`Inpaint blend`, no mask blur)."""
    masked = _linked(self.graph, value)
    if masked is not None and masked[1]["class_type"] in (_INPAINT_CONDITIONING,
                                                          _ENCODE_FOR_INPAINT):
      self.inpaint_latent(masked[0], masked[1], denoise)
      return
    if masked is not None and masked[1]["class_type"] == "SetLatentNoiseMask":
      self.fields.update({"Inpaint blend": "ComfyUI", "Mask blur": "0"})
      self.mask(_inputs(masked[1]).get("mask"))
      encode = _linked(self.graph, _inputs(masked[1]).get("samples"))
      if encode is not None and encode[1]["class_type"] == "VAEEncode":
        self.image_link = _inputs(encode[1]).get("pixels")
      self.note(None, f"node {masked[0]} (SetLatentNoiseMask) inpaints: give its mask too "
                      "(--mask_image, or a jsonl line's mask_image: its LoadImage file, whose "
                      "transparent pixels repaint, or white repaints)")
      value = _inputs(masked[1]).get("samples")
    found = self.follow(value, ("samples",), "latent")
    if found is not None and "width" in _inputs(found[1]) and "height" in _inputs(found[1]):
      inputs = _inputs(found[1])
      self.fields["Size"] = f"{inputs['width']}x{inputs['height']}"
      batch = inputs.get("batch_size", 1)
      if isinstance(batch, int) and batch > 1 and "Brownian noise" in self.fields:
        self.note(None, f"made in a batch of {batch}: ComfyUI's SDE samplers grow one Brownian "
                        "tree for the whole batch, sdjax one per seed; this makes the batch's "
                        "first (its initial noise; the steps' differ)")
      elif isinstance(batch, int) and batch > 1:  # its noise drawn for the batch at once
        self.fields["Noise batch"] = str(batch)
        if "Step RNG" in self.fields:
          self.note("step_rng", f"made in a batch of {batch}: ComfyUI draws the steps' noise on "
                                "its GPU for the whole batch at once, sdjax each image's alone: "
                                "the steps' noise differs")
      if denoise not in (None, 1, 1.0):
        self.note(None, f"denoise {denoise} of an empty latent: sdjax denoises fully")
      return
    if found is not None and found[1]["class_type"] == "VAEEncode":  # img2img
      self.fields["Image encode"] = "mode"  # its posterior's mode
      if isinstance(denoise, int | float):
        self.fields["Denoising strength"] = str(float(denoise))
      image = _linked(self.graph, _inputs(found[1]).get("pixels"))
      named = (f" ({image[1]['class_type']} {_inputs(image[1])['image']})" if image is not None
               and isinstance(_inputs(image[1]).get("image"), str) else "")
      self.note(None, f"the latent is node {found[0]} (VAEEncode)'s image{named}: give it with "
                      "--init_image (or a jsonl line's init_image) and its size (--width, "
                      "--height: ComfyUI samples at the image's)")
      return
    kind = "nothing" if found is None else f"node {found[0]} ({found[1]['class_type']})"
    self.note(None, f"the latent comes from {kind} (img2img, or a hires or refiner pass), not "
                    f"an empty latent: give its image as a jsonl line's init_image"
                    + (f" with strength {denoise}" if denoise not in (None, 1, 1.0) else ""))

  def inpaint_latent(self, node_id: str, node: dict[str, Any], denoise) -> None:
    """The latent of an InpaintModelConditioning node: its image's (the posterior's mode), with
    a noise mask unless `noise_mask` is off; an inpainting model's UNet sees its masked image and
    mask (sdjax's `inpaint_blend` comfyui makes them as it does). A VAEEncodeForInpaint's: its
    masked image's, the mask grown by its grow_mask_by (`--grow_mask_by`)."""
    kind, inputs = node["class_type"], _inputs(node)
    if kind == _ENCODE_FOR_INPAINT:
      grow = inputs.get("grow_mask_by", 6)
      if isinstance(grow, int) and not isinstance(grow, bool):
        self.fields["Grow mask by"] = str(grow)
      else:
        self.note("grow_mask_by", f"node {node_id}'s grow_mask_by comes from another node: give "
                                  "--grow_mask_by")
    self.fields["Image encode"] = "mode"
    if isinstance(denoise, int | float):
      self.fields["Denoising strength"] = str(float(denoise))
    self.fields["Mask blur"] = "0"
    self.mask(inputs.get("mask"))
    self.image_link = inputs.get("pixels")
    if inputs.get("noise_mask", True) is not False:  # (its default: on)
      self.fields["Inpaint blend"] = "ComfyUI"
    else:
      self.note("inpaint_blend", f"node {node_id} ({kind}) adds no noise mask: "
                                 "sdjax's inpainting keeps the image outside the mask its own "
                                 "ways, and makes an inpainting model's inputs as ComfyUI only "
                                 "with its blend (--inpaint_blend comfyui)")
    self.note(None, f"node {node_id} ({kind}) inpaints its image: give it and "
                    "its mask (--init_image and --mask_image, or a jsonl line's init_image and "
                    "mask_image: its LoadImage file for both, whose transparent pixels repaint) "
                    "and its size (--width, --height: ComfyUI samples at the image's)")

  def mask(self, value) -> None:
    """The mask's way from its file: an InvertMask (or an odd number of them) repaints the rest
    (`Mask mode: Inpaint not masked`, --inpainting_mask_invert); any other node between it and
    its LoadImage / LoadImageMask changes it: noted. A LoadImageMask of a colour channel: noted
    (sdjax reads a file's alpha, else its grey levels)."""
    inverted, seen = False, set()
    self.mask_link = value
    while (link := _linked(self.graph, value)) is not None and link[0] not in seen:
      seen.add(link[0])
      node_id, node = link
      kind, inputs = node["class_type"], _inputs(node)
      if kind == "InvertMask":
        inverted = not inverted
      elif kind == "LoadImageMask" and inputs.get("channel", "alpha") != "alpha":
        self.note("mask_image", f"node {node_id} (LoadImageMask) reads the mask from the "
                                f"{inputs.get('channel')} channel: sdjax reads a file's alpha, "
                                "else its grey levels (give the mask as a grey image)")
      elif kind not in ("LoadImage", "LoadImageMask"):
        self.note("mask_image", f"node {node_id} ({kind}) changes the mask: not reproduced "
                                "(give the mask it makes)")
      value = inputs.get("mask")
    if inverted:
      self.fields["Mask mode"] = "Inpaint not masked"

  def vae(self, sampler_id: str) -> None:
    """A VAELoader on the way from the sampler to the decode."""
    decodes = _decodes(self.graph, sampler_id)
    for node in decodes.values():
      vae = _linked(self.graph, _inputs(node).get("vae"))
      if vae is not None and vae[1]["class_type"] == "VAELoader":
        self.note("vae", f"made with the VAE {_inputs(vae[1]).get('vae_name')}: give it with "
                         "--vae")
    for node_id, node in self.graph.items():  # its inpainting workflows' paste of the original
      inputs = _inputs(node)
      if node["class_type"] != "ImageCompositeMasked" or not any(
          (_linked(self.graph, value) or ("",))[0] in decodes for value in inputs.values()):
        continue
      if (self.fields.get("Inpaint blend") == "ComfyUI" and self.image_link is not None
          and (_linked(self.graph, inputs.get("source")) or ("",))[0] in decodes
          and inputs.get("destination") == self.image_link
          and inputs.get("mask") == self.mask_link
          and inputs.get("x", 0) == 0 and inputs.get("y", 0) == 0):
        self.fields["Inpaint composite"] = "ComfyUI"  # (--comfyui_composite)
      else:
        self.note(None, f"node {node_id} (ImageCompositeMasked) composites the decoded image "
                        "with another through a mask: reproduced only as the paste of the "
                        "sampler's own image through its own mask at (0, 0); sdjax saves the "
                        "decoded image")


# ComfyUI's textual-inversion syntax: `embedding:NAME` where a word starts (its prompt's start,
# after a space, a newline or a weighting parenthesis), NAME the file's name up to a space (with
# or without .safetensors / .pt / .bin), a comma after it not part of it.
_EMBEDDING = re.compile(r"(^|[\s(])embedding:([^\s,():]+?)(\.safetensors|\.pt|\.bin)?(?=[\s,():]|$)")


def _a1111_embeddings(text: str) -> tuple[str, list[str]]:
  """(`text` with each `embedding:NAME` as A1111's NAME, the trigger word its file stem: the
  embedding's vectors in its place, as ComfyUI puts them, once --embeddings_dir loads it; the
  names)."""
  names = []

  def name(match):
    names.append(match.group(2))
    return match.group(1) + match.group(2)

  return _EMBEDDING.sub(name, text), list(dict.fromkeys(names))


def _decodes(graph, sampler_id: str) -> dict[str, dict[str, Any]]:
  """The VAEDecode nodes decoding the sampler's latents, by id."""
  return {node_id: node for node_id, node in graph.items() if node["class_type"] == "VAEDecode"
          and (_linked(graph, _inputs(node).get("samples")) or ("",))[0] == sampler_id}


def _hires_pass(graph, first_id: str, others: list[str]):
  """(sampler id, sampler node, upscale node) of a KSampler denoising the first pass's latents
  enlarged by a LatentUpscale(By) node, whose latents are decoded (ComfyUI's hires fix), or
  None."""
  for sampler_id in others:
    node = graph[sampler_id]
    upscale = _linked(graph, _inputs(node).get("latent_image"))
    if (node["class_type"] == "KSampler" and upscale is not None
        and upscale[1]["class_type"] in _LATENT_UPSCALE_NODES and _decodes(graph, sampler_id)):
      source = _linked(graph, _inputs(upscale[1]).get("samples"))
      if source is not None and source[0] == first_id:
        return sampler_id, node, upscale
  return None


def _refiner_pass(graph, first_id: str, others: list[str]):
  """(sampler id, node) of a KSamplerAdvanced (or custom sampler) continuing the first pass's
  latents as they are (its first output: SDXL's refiner), whose latents are decoded, or None."""
  for sampler_id in others:
    node = graph[sampler_id]
    latent = _inputs(node).get("latent_image")
    source = _linked(graph, latent)
    if (node["class_type"] in ("KSamplerAdvanced", *_CUSTOM_SAMPLER_NODES)
        and source is not None and source[0] == first_id and latent[1] == 0
        and graph[first_id]["class_type"] in ("KSamplerAdvanced", *_CUSTOM_SAMPLER_NODES)
        and _decodes(graph, sampler_id)):
      return sampler_id, node
  return None


def _hands_off(reader: _Reader, first: dict[str, Any], sampler_id: str,
               inputs: dict[str, Any]) -> bool:
  """Whether a base KSamplerAdvanced and the one after it (`_ksampler_inputs`: custom samplers
  too, over a SplitSigmas node's high and low levels) are a handoff at a step sdjax makes
  (`refiner_start` a number of steps): the base stops at step k < steps keeping its leftover
  noise, the second starts at k of the same steps without adding noise; else a note."""
  steps, end, start = first.get("steps"), first.get("end_at_step"), inputs.get("start_at_step")
  if not (isinstance(steps, int) and isinstance(end, int) and 1 <= end < steps and start == end
          and inputs.get("steps") == steps and first.get("start_at_step", 0) == 0
          and first.get("add_noise", "enable") == "enable"
          and first.get("split") == inputs.get("split")):
    reader.note(None, f"node {sampler_id} (a second sampler on its latents) runs steps "
                      f"{start or 0} to {inputs.get('end_at_step', inputs.get('steps'))} of "
                      f"{inputs.get('steps')} after the first's {first.get('start_at_step', 0)} "
                      f"to {end} of {steps}: not reproduced")
    return False
  if inputs.get("add_noise") != "disable" or first.get("return_with_leftover_noise",
                                                       "enable") != "enable":
    reader.note(None, f"node {sampler_id} (a refiner pass) adds noise, or the first pass returns "
                      "its latents denoised: sdjax's refiner continues the base's noisy latents "
                      "(not reproduced)")
    return False
  sampler = SAMPLERS.get(first.get("sampler_name"))
  if sampler is not None and schedulers.plans_its_run(sampler):
    reader.note(None, f"node {sampler_id} (a refiner pass) follows sampler {sampler}, which plans "
                      "its steps between its run's ends: sdjax hands none of its runs over (not "
                      "reproduced)")
    return False
  return True


def _refiner(reader: _Reader, first: dict[str, Any], sampler_id: str,
             inputs: dict[str, Any]) -> None:
  """The refiner fields of ComfyUI's SDXL base + refiner pair: the step it takes over at
  (`Refiner switch step`), its checkpoint (a note: give --refiner), its aesthetic scores
  (CLIPTextEncodeSDXLRefiner's ascore, else ComfyUI's 6 and 2.5), and whatever it does other
  than sdjax's refiner, which runs the base's sampler, schedule and CFG on the image's prompts:
  notes."""
  fields = reader.fields
  fields["Refiner switch step"] = str(first["end_at_step"])
  found = reader.follow(inputs.get("model"), ("model",), "refiner's model")
  if found is not None and found[1]["class_type"] in _CHECKPOINT_NODES:
    fields["Refiner"] = str(_inputs(found[1]).get(_CHECKPOINT_NODES[found[1]["class_type"]]))
  else:
    reader.note("refiner", f"node {sampler_id} (the refiner) takes a model sdjax cannot name: "
                           "give it with --refiner")
  for key in ("sampler_name", "scheduler", "cfg"):
    if inputs.get(key) != first.get(key):
      reader.note(None, f"node {sampler_id} (the refiner) runs {key} {inputs.get(key)}, the base "
                        f"{first.get(key)}: sdjax's refiner runs the base's")
  sampler = inputs.get("sampler_name")
  if sampler in _DEVICE_NOISE or schedulers.takes_brownian(SAMPLERS.get(sampler)):
    reader.note(None, f"node {sampler_id} (the refiner) draws its steps' noise afresh from its "
                      "noise_seed; sdjax's refiner draws on from the base's")
  if sampler in ("heunpp2", "uni_pc", "uni_pc_bh2", "sa_solver", "sa_solver_pece"):
    reader.note(None, f"sampler {sampler} steps by where its run ends: the base's last steps "
                      "before the refiner differ")
  size = fields.get("Original size", fields.get("Size"))
  for which, label, default in (("positive", "Aesthetic score", 6.0),
                                ("negative", "Negative aesthetic score", 2.5)):
    if inputs.get(which) is None:  # a BasicGuider's one conditioning: no guidance
      reader.note(None, f"node {sampler_id} (the refiner) runs without guidance: sdjax's refiner "
                        "with the base's")
      continue
    text = reader.text(inputs.get(which), which)
    key = "prompt" if which == "positive" else "negative_prompt"
    if text != (reader.texts_l.get(key) or fields[key]):
      reader.note(None, f"node {sampler_id} (the refiner) has a {which} text of its own: "
                        f"sdjax's refiner encodes the image's {which} prompt")
    found = reader.follow(inputs.get(which), ("conditioning", "conditioning_to", which),
                          f"refiner's {which} conditioning")
    own = _inputs(found[1]) if found and found[1]["class_type"] == "CLIPTextEncodeSDXLRefiner" \
        else {}
    fields[label] = str(own.get("ascore", default))
    if own and size is not None and f"{own.get('width')}x{own.get('height')}" != size:
      reader.note(None, f"node {sampler_id} (the refiner) is conditioned on size "
                        f"{own.get('width')}x{own.get('height')}; sdjax's refiner on the base's "
                        f"original size {size}")


def _hires(reader: _Reader, first: dict[str, Any], hires) -> None:
  """A1111's hires fields of ComfyUI's hires fix: the latent upscale's size and method, the
  second KSampler's steps and denoise, and whatever it does otherwise (sampler, scheduler, CFG,
  prompts: A1111's Hires sampler, ... fields; its seed and model: notes)."""
  sampler_id, node, (upscale_id, upscale) = hires
  inputs, up = _inputs(node), _inputs(upscale)
  fields = reader.fields
  if "Size" not in fields:  # not from an empty latent: noted by `latent`
    reader.note(None, f"node {sampler_id} (a hires pass) is not reproduced")
    return
  width, height = (int(v) for v in fields["Size"].split("x"))
  lw, lh = width // 8, height // 8  # ComfyUI's latents, in latent pixels
  if upscale["class_type"] == "LatentUpscaleBy":
    scale = up.get("scale_by", 1.5)
    size = (round(lw * scale), round(lh * scale))  # ComfyUI's rounding; A1111 floors pixels
    if size == (int(width * scale) // 8, int(height * scale) // 8):
      fields["Hires upscale"] = str(scale)
    else:
      fields["Hires resize"] = f"{size[0] * 8}x{size[1] * 8}"
  else:
    w, h = up.get("width", 0), up.get("height", 0)  # pixels; one 0: from the latents' aspect
    if not w and not h:  # ComfyUI passes the latents on as they are
      w, h = width, height
    w, h = (max(64, w or round(lw * h / lh)), max(64, h or round(lh * w / lw)))
    fields["Hires resize"] = f"{w // 8 * 8}x{h // 8 * 8}"
    if up.get("crop", "disabled") != "disabled" or w * height != h * width:
      reader.note(None, f"node {upscale_id} ({upscale['class_type']}) enlarges to {w}x{h} "
                        f"(crop {up.get('crop')}) at another aspect: sdjax enlarges to cover it "
                        "and cuts the excess (A1111's way)")
  method = up.get("upscale_method")
  if method in _LATENT_UPSCALE_METHODS:
    fields["Hires upscaler"] = _LATENT_UPSCALE_METHODS[method]
  else:
    reader.note("hires_upscaler", f"node {upscale_id}: ComfyUI's {method} latent upscale is not "
                                  "one sdjax has: Latent (bilinear) is used")
  fields["Hires steps"] = str(inputs.get("steps"))
  fields["Denoising strength"] = str(inputs.get("denoise", 1.0))
  if inputs.get("sampler_name") != first.get("sampler_name") and (
      inputs.get("sampler_name") in SAMPLERS):
    name = SAMPLERS[inputs["sampler_name"]]
    fields["Hires sampler"] = outputs.A1111_SAMPLER_NAMES.get(name, name)
  if (inputs.get("sampler_name") in _DISCARDING) != (first.get("sampler_name") in _DISCARDING):
    reader.note(None, f"node {sampler_id} (the hires pass): ComfyUI's KSampler drops the "
                      "next-to-last level for dpm_2 / uni_pc and not for others; sdjax's hires "
                      "pass does as its first pass does")
  if inputs.get("scheduler") != first.get("scheduler") and inputs.get("scheduler") in SCHEDULERS:
    fields["Hires schedule type"] = outputs.A1111_SCHEDULE_TYPE_NAMES[inputs["scheduler"]]
  if inputs.get("cfg") != first.get("cfg"):
    fields["Hires CFG Scale"] = str(inputs.get("cfg"))
  for which, key in (("positive", "Hires prompt"), ("negative", "Hires negative prompt")):
    text = reader.text(inputs.get(which), which)
    field = "prompt" if which == "positive" else "negative_prompt"
    if text != fields[field]:
      fields[key] = text
    if (reader.text_l, text) != (reader.texts_l.get(field), fields[field]) and (
        reader.text_l is not None):  # a hires prompt is both encoders' text
      reader.note(None, f"the hires pass's {which} CLIPTextEncodeSDXL has a text_l of its own: "
                        "sdjax's hires pass gives both encoders its text_g")
  if inputs.get("seed") != first.get("seed"):
    reader.note(None, f"node {sampler_id} (the hires pass) has its own seed {inputs.get('seed')}: "
                      "sdjax's hires pass draws its noise from the image's seed")
  if inputs.get("model") != first.get("model"):
    reader.note(None, f"node {sampler_id} (the hires pass) takes another model: not reproduced "
                      "(give --hires_model)")


def _ksampler_inputs(reader: _Reader, sampler_id: str, node: dict[str, Any]) -> dict[str, Any]:
  """A sampler node's inputs as a KSampler's (seed, steps, cfg, sampler_name, scheduler, denoise,
  model, positive, negative, latent_image): a SamplerCustom's or SamplerCustomAdvanced's read
  off the nodes it takes them from (RandomNoise, CFGGuider / BasicGuider, KSamplerSelect,
  BasicScheduler or a sigma node of fixed range, whose settings go into A1111's fields)."""
  inputs = _inputs(node)
  if node["class_type"] not in _CUSTOM_SAMPLER_NODES:
    return inputs
  graph = reader.graph
  out = {"latent_image": inputs.get("latent_image"), "add_noise": "enable"}

  def source(name: str, kinds: tuple[str, ...], value=None) -> dict[str, Any] | None:
    link = _linked(graph, inputs.get(name) if value is None else value)
    if link is None or link[1]["class_type"] not in kinds:
      kind = "nothing" if link is None else f"node {link[0]} ({link[1]['class_type']})"
      reader.note(None, f"node {sampler_id} ({node['class_type']}) takes its {name} from {kind}: "
                        "not reproduced")
      return None
    return _inputs(link[1]) | {"class_type": link[1]["class_type"]}

  if node["class_type"] == "SamplerCustom":
    out.update({k: inputs.get(k) for k in ("model", "cfg", "positive", "negative")},
               seed=inputs.get("noise_seed"))
    if inputs.get("add_noise") is False:
      out["add_noise"] = "disable"
  else:
    noise = source("noise", ("RandomNoise", "DisableNoise"))
    out["seed"] = None if noise is None else noise.get("noise_seed")
    if noise is not None and noise["class_type"] == "DisableNoise":
      out["add_noise"] = "disable"
    guider = source("guider", ("CFGGuider", "BasicGuider"))
    if guider is not None and guider["class_type"] == "CFGGuider":
      out.update({k: guider.get(k) for k in ("model", "cfg", "positive", "negative")})
    elif guider is not None:  # one conditioning, no guidance
      out.update(model=guider.get("model"), positive=guider.get("conditioning"), cfg=1.0)
  select = source("sampler", ("KSamplerSelect", *_SAMPLER_SETTINGS_NODES))
  if select is not None:
    out["sampler_name"], out["sampler_options"] = _sampler_name(reader, select)
  sigmas = source("sigmas", ("BasicScheduler", *_SIGMA_NODES, *_LEVEL_NODES, *_SPLIT_NODES))
  split = None
  if sigmas is not None and sigmas["class_type"] in _SPLIT_NODES:  # its high or low levels
    split = sigmas, "end_at_step" if inputs["sigmas"][1] == 0 else "start_at_step"
    out["split"] = inputs["sigmas"][0]
    sigmas = source("sigmas", ("BasicScheduler", *_SIGMA_NODES, *_LEVEL_NODES),
                    sigmas.get("sigmas"))
  if sigmas is not None and sigmas["class_type"] in _LEVEL_NODES:
    levels_of, why = _LEVEL_NODES[sigmas["class_type"]]
    levels = levels_of(sigmas)
    if levels is None:
      reader.note(None, f"node {sampler_id}'s {sigmas['class_type']} "
                        f"{why.format(model_type=sigmas.get('model_type'))}: not reproduced")
    else:
      out.update(steps=len(levels) - 1, sigmas=levels)
  elif sigmas is not None:
    out["steps"] = sigmas.get("steps")
    if sigmas["class_type"] == "BasicScheduler":
      out.update(scheduler=sigmas.get("scheduler"), denoise=sigmas.get("denoise", 1.0))
    else:
      out["scheduler"], settings = _SIGMA_NODES[sigmas["class_type"]]
      for key, field in settings.items():
        if isinstance(sigmas.get(key), int | float):
          reader.fields[field] = str(sigmas[key])
  if split is not None:  # the step it splits at: its own, or the last round(steps * denoise)'s
    node, key = split
    step, steps, denoise = node.get("step"), out.get("steps"), node.get("denoise", 1.0)
    if node["class_type"] == "SplitSigmasDenoise" and isinstance(steps, int) and isinstance(
        denoise, int | float):
      step = steps - round(steps * denoise)
    out[key] = step
  return out


def _sampler_name(reader: _Reader, select: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
  """The KSampler sampler a sampler node makes (KSamplerSelect's, or one of
  `_SAMPLER_SETTINGS_NODES` with its settings: notes where they are not the defaults), and the
  scheduler options of its settings: its eta where it is not 1 and sdjax's takes it (A1111's
  Eta), ER-SDE's solver type and stages."""
  kind = select["class_type"]
  if kind == "KSamplerSelect":
    return select.get("sampler_name"), {}
  name, defaults = _SAMPLER_SETTINGS_NODES[kind]
  if kind == "SamplerDPMPP_2M_SDE" and select.get("solver_type") == "heun":
    name = "dpmpp_2m_sde_heun"
  options = {}
  if kind == "SamplerSASolver":  # PECE without a corrector: SA-Solver's plain loop
    options = {k: select[k] for k, v in SA_SETTINGS.items() if k in select and select[k] != v}
    if select.get("use_pece") and select.get("corrector_order", 4) != 0:
      name = "sa_solver_pece"
  if kind == "SamplerDPMAdaptative":  # its settings: dpm_adaptive's options; eta 0 only
    return name, _dpm_adaptive_settings(reader, select)
  if select.get("noise_device") == "gpu":
    name += "_gpu"
  for key, default in defaults.items():
    if key in select and select[key] != default:
      reader.note(None, f"{kind} {key} {select[key]}: sdjax's {name} runs its {default}")
  eta, highest = select.get("eta", 1.0), 1
  if kind == "SamplerER_SDE":
    solver = {"Reverse-time SDE": "reverse_time_sde", "ODE": "ode"}.get(select.get("solver_type"))
    options = {k: v for k, v in (("er_sde_type", solver), ("max_stage", select.get("max_stage")))
               if v not in (None, 3)}
  # LMS's order and the others' s_noise: options where sdjax's checks take them, else a note
  for key, option, default, check in (("order", LMS_ORDER, 4, check_lms_order),
                                      ("s_noise", schedulers.S_NOISE, 1.0, check_s_noise)):
    if select.get(key, default) != default:
      try:
        check(name, select[key])
        options[option] = select[key]
      except schedulers.SchedulerConfigError as e:
        reader.note(None, f"{kind} {key} {select[key]!r}: {e}")
  if kind == "SamplerER_SDE":
    if solver != "reverse_time_sde":  # eta: its reverse-time SDE's only
      return name, options
    highest = 100
  if eta == 1.0:
    return name, options
  if isinstance(eta, int | float) and 0 <= eta <= highest:
    return name, {**options, "eta": eta}
  reader.note(None, f"{kind} eta {eta}: sdjax's {name} takes an eta from 0 to {highest}")
  return name, options


def _dpm_adaptive_settings(reader: _Reader, select: dict[str, Any]) -> dict[str, Any]:
  """SamplerDPMAdaptative's settings as dpm_adaptive's options (its order `adaptive_order`), a
  note where sdjax's check refuses them or its eta is not 0 (sdjax's runs no noise)."""
  options = {("adaptive_order" if key == "order" else key): select[key]
             for key, default in (("order", 3), *_DPM_ADAPTIVE_NODE.items())
             if key in select and select[key] != default}
  try:
    schedulers.get_scheduler("dpm_adaptive", {"prediction_type": "epsilon"}, options=options)
  except schedulers.SchedulerConfigError as e:
    reader.note(None, f"SamplerDPMAdaptative: {e}: sdjax's dpm_adaptive runs its defaults")
    options = {}
  if select.get("eta", 0.0) != 0:
    reader.note(None, f"SamplerDPMAdaptative eta {select['eta']}: sdjax's dpm_adaptive runs at "
                "eta 0 (no fresh noise)")
  return options


def _turbo_sigmas(steps, denoise) -> list[float] | None:
  """ComfyUI's SDTurboScheduler: the levels of timesteps 999, 899, ..., 99 (from the
  10 - int(10 * denoise)-th, `steps` of them) as its ModelSamplingDiscrete reads them (its
  float64 levels' logs in float32, exp in float32), then 0; None where that leaves none."""
  from sdjax.schedulers.common import exp_f32  # noqa: PLC0415

  if not (isinstance(steps, int) and isinstance(denoise, int | float)) or isinstance(steps, bool):
    return None
  start = 10 - int(10 * denoise)
  timesteps = list(range(999, 0, -100))[start:start + steps]
  if not timesteps:
    return None
  alphas = sigma_schedules.form_alphas_cumprod(dict(sigma_schedules.SD_SCHEDULE), "comfyui")
  log_sigmas = np.log(np.sqrt((1 - alphas) / alphas)).astype(np.float32)
  return [float(v) for v in exp_f32(log_sigmas[timesteps])] + [0.0]


def _numbers(inputs: dict[str, Any], defaults: dict[str, float]) -> list[float] | None:
  """A sigma node's number inputs (its defaults where absent), or None where one is not a
  number (a link to another node)."""
  values = [inputs.get(key, default) for key, default in defaults.items()]
  if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
    return None
  return values


def _vp_sigmas(inputs: dict[str, Any]) -> list[float] | None:
  """ComfyUI's VPScheduler (k-diffusion's get_sigmas_vp): sqrt(expm1(beta_d t^2 / 2 + beta_min
  t)) at `steps` times t even from 1 to eps_s, then 0; in float32 as its torch ops."""
  from sdjax.schedulers.common import expm1_f32, torch_linspace_f32  # noqa: PLC0415

  values = _numbers(inputs, {"steps": 20, "beta_d": 19.9, "beta_min": 0.1, "eps_s": 0.001})
  if values is None or values[0] < 1:
    return None
  steps, beta_d, beta_min, eps_s = values
  f = np.float32
  t = torch_linspace_f32(1.0, eps_s, int(steps))
  exponent = f(beta_d) * (t * t) / f(2) + f(beta_min) * t
  return [float(v) for v in np.sqrt(expm1_f32(exponent))] + [0.0]


def _laplace_sigmas(inputs: dict[str, Any]) -> list[float] | None:
  """ComfyUI's LaplaceScheduler (k-diffusion's get_sigmas_laplace, Tiankai et al. 2024): exp of
  mu - beta sign(1/2 - x) log(1 - 2 |1/2 - x| + 1e-5) at `steps` points x even in [0, 1],
  clamped to [sigma_min, sigma_max], in float32 as its torch ops; no 0 after (its run ends at
  the last level)."""
  from sdjax.schedulers.common import exp_f32, log_f32, torch_linspace_f32  # noqa: PLC0415

  values = _numbers(inputs, {"steps": 20, "sigma_max": 14.614642, "sigma_min": 0.0291675,
                             "mu": 0.0, "beta": 0.5})
  if values is None or values[0] < 2:
    return None
  steps, sigma_max, sigma_min, mu, beta = values
  f = np.float32
  x = torch_linspace_f32(0.0, 1.0, int(steps))
  offset = f(0.5) - x
  lmb = f(mu) - f(beta) * np.sign(offset) * log_f32(f(1) - f(2) * np.abs(offset) + f(1e-5))
  return [float(v) for v in np.clip(exp_f32(lmb), f(sigma_min), f(sigma_max))]


def _runs_over(name: str, levels: list[float]) -> bool:
  """Whether sdjax's scheduler `name` takes these levels (a LaplaceScheduler's end above 0,
  where ComfyUI's sampler stops; most of sdjax's step to 0 only)."""
  try:
    schedulers.get_scheduler(name, dict(sigma_schedules.SD_SCHEDULE), options={
        "sigmas": levels}).set_timesteps(len(levels) - 1, sample_shape=(1, 8, 8, 4))
  except ValueError:
    return False
  return True


# Its nodes splitting a schedule's levels into the first steps' (high) and the rest's (low).
_SPLIT_NODES = ("SplitSigmas", "SplitSigmasDenoise")
# Its sigma nodes whose levels sdjax's schedule types do not place: their levels (the run's
# --sigmas) from the node's inputs, or None, and why not.
_LEVEL_NODES = {
    "VPScheduler": (_vp_sigmas, "has inputs from other nodes or no steps"),
    "LaplaceScheduler": (_laplace_sigmas, "has inputs from other nodes or no steps"),
    "SDTurboScheduler": (lambda inputs: _turbo_sigmas(inputs.get("steps", 1),
                                                      inputs.get("denoise", 1.0)),
                         "has no steps to run"),
    "AlignYourStepsScheduler": (lambda inputs: _ays_sigmas(
        inputs.get("model_type"), inputs.get("steps"), inputs.get("denoise", 1.0)),
                                "({model_type}) is not one sdjax has the levels of"),
}


def _sampler_node(graph) -> tuple[str, dict[str, Any], list[str]]:
  """(id, node) of the text-to-image sampler, and the other samplers' ids."""
  samplers = [(i, n) for i, n in graph.items() if n["class_type"] in _SAMPLER_NODES]
  if not samplers:
    raise ValueError("ComfyUI workflow without a sampler node (KSampler, KSamplerAdvanced, "
                     "SamplerCustom, SamplerCustomAdvanced)")

  def from_empty(item):
    latent = _linked(graph, _inputs(item[1]).get("latent_image"))
    return latent is not None and "width" in _inputs(latent[1])

  first = next((s for s in samplers if from_empty(s)), samplers[0])
  return first[0], first[1], [i for i, _ in samplers if i != first[0]]


def _image_latent(graph, value) -> bool:
  """Whether a sampler's latent is an image's (a VAEEncode's, through latent nodes, or an
  inpainting one's): img2img rather than an empty latent's."""
  seen = set()
  while (link := _linked(graph, value)) is not None and link[0] not in seen:
    seen.add(link[0])
    kind, inputs = link[1]["class_type"], _inputs(link[1])
    if kind in ("VAEEncode", _INPAINT_CONDITIONING, _ENCODE_FOR_INPAINT):
      return True
    if "samples" not in inputs:
      return False
    value = inputs["samples"]
  return False


def _img2img_from_step(inputs: dict[str, Any]) -> bool:
  """Whether a KSamplerAdvanced's settings are a KSampler's img2img: noise added, from a step
  after the first to the end of its schedule."""
  start, total = inputs.get("start_at_step", 0), inputs.get("steps")
  end = inputs.get("end_at_step", 10000)
  return (all(isinstance(v, int) and not isinstance(v, bool) for v in (start, total, end))
          and 0 < start < total <= end and inputs.get("add_noise", "enable") != "disable")


def reproduce(graph: dict[str, dict[str, Any]]) -> infotext.Reproduction:
  """The main.py flags that make a ComfyUI workflow's text-to-image pass again, with notes on
  what they cannot give. ValueError for a graph without a sampler or readable prompts, or one
  no ComfyUI could have run (an input of the wrong kind, links in a circle)."""
  try:
    return _reproduce(graph)
  except (TypeError, KeyError, AttributeError, IndexError) as e:
    raise ValueError(f"ComfyUI workflow: a node's inputs are not what its kind takes "
                     f"({type(e).__name__}: {e})") from None


def _reproduce(graph: dict[str, dict[str, Any]]) -> infotext.Reproduction:
  sampler_id, node, others = _sampler_node(graph)
  reader = _Reader(graph)
  inputs = _ksampler_inputs(reader, sampler_id, node)
  advanced = node["class_type"] == "KSamplerAdvanced"
  fields = reader.fields
  fields["prompt"] = reader.text(inputs.get("positive"), "positive")
  texts_l = reader.texts_l = {"prompt": reader.text_l}
  negative = inputs.get("negative")  # none with a BasicGuider: one conditioning
  reader.text_l = None
  fields["negative_prompt"] = ("" if negative is None and node["class_type"] in
                               _CUSTOM_SAMPLER_NODES else reader.text(negative, "negative"))
  texts_l["negative_prompt"] = reader.text_l
  reader.controlnets()  # (the first pass's conditionings')
  for key, name, flag in (("Steps", "steps", "steps"), ("CFG scale", "cfg", "guidance_scale"),
                          ("Seed", "noise_seed" if advanced else "seed", "seed")):
    value = inputs.get(name)
    link = _linked(graph, value)
    if link is not None:  # a seed or number node's value: its one number
      numbers = [v for v in _inputs(link[1]).values()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
      value = numbers[0] if len(numbers) == 1 else None
      if value is None:
        reader.note(flag, f"the sampler's {name} comes from node {link[0]} "
                          f"({link[1]['class_type']}): give --{flag}")
    if value is not None:
      fields[key] = str(value)
  sampler_options = dict(inputs.get("sampler_options") or {})  # a sampler node's settings
  if "eta" in sampler_options:  # as A1111's Eta
    fields["Eta"] = str(sampler_options.pop("eta"))
  seed = int(fields["Seed"]) if fields.get("Seed", "").isdigit() else None
  sampler, scheduler = inputs.get("sampler_name"), inputs.get("scheduler")
  brownian = schedulers.takes_brownian(SAMPLERS.get(sampler))
  if isinstance(seed, int) and seed >= 2**32:  # ComfyUI's are 64-bit
    fields["Seed"] = str(seed % 2**32)
    fields["Seed high"] = str(seed >> 32)  # for what takes it whole (the tree, CUDA's generator)
    reader.note(None, f"seed {seed}: torch's CPU generator keeps its low 32 bits, so seed "
                      f"{seed % 2**32} draws the same initial noise (--seed_high gives the "
                      "others)")
  if sampler in SAMPLERS:
    fields["Sampler"] = outputs.A1111_SAMPLER_NAMES.get(SAMPLERS[sampler], SAMPLERS[sampler])
  else:
    reader.note("scheduler", f"sampler {sampler} is not one sdjax has: give --scheduler")
  table = (scheduler in _TABLE_SCHEDULERS and sampler in SAMPLERS
           and schedulers.takes_option(SAMPLERS[sampler], "sigmas"))  # levels as --sigmas
  if scheduler in SCHEDULERS:
    fields["Schedule type"] = outputs.A1111_SCHEDULE_TYPE_NAMES[scheduler]
  elif scheduler is not None and not table:
    reader.note("schedule_type", f"scheduler {scheduler} (with sampler {sampler}): sdjax places "
                                 "the noise levels its own way")
  fields["RNG"] = "CPU"  # ComfyUI's initial noise: torch's CPU generator, seeded by the seed
  if brownian:  # the SDE samplers' tree: on the CPU, or the GPU for the _gpu variants
    fields["Brownian noise"] = "NV" if sampler.endswith("_gpu") else "CPU"
    if sampler.endswith("_gpu"):
      reader.note("brownian", f"sampler {sampler}: ComfyUI grows its Brownian tree on its GPU: "
                              "sdjax with CUDA's generator, an NVIDIA GPU's (another GPU's tree "
                              "differs)")
  fields["Emphasis"] = "ComfyUI"  # its weighting: towards the empty prompt's encoding
  if any("[" in text for text in (fields["prompt"], fields["negative_prompt"],
                                   *filter(None, texts_l.values()))):
    reader.note("emphasis", "[...] is plain text to ComfyUI; main.py's A1111 syntax weakens it "
                            "(write \\[ \\] for ComfyUI's reading)")
  if sampler in _DEVICE_NOISE:  # from a generator on its GPU seeded by the seed
    fields["Step RNG"] = "NV"
    reader.note("step_rng", f"sampler {sampler}: ComfyUI draws each step's fresh noise from a "
                            "generator on its GPU seeded by the seed: sdjax draws CUDA's, an "
                            "NVIDIA GPU's (--step_rng nv); another GPU's differs")
  refiner = _refiner_pass(graph, sampler_id, others)
  if refiner is not None:
    others = [i for i in others if i != refiner[0]]
    refiner = (refiner[0], _ksampler_inputs(reader, *refiner))
    if not _hands_off(reader, inputs, *refiner):
      refiner = None
  if refiner is None and inputs.get("add_noise") == "disable":
    reader.note(None, f"node {sampler_id} adds no noise to its latent: sdjax starts from noise")
  denoise = None if advanced else inputs.get("denoise")
  start, total = inputs.get("start_at_step", 0), inputs.get("steps")
  from_step = (advanced and refiner is None and not table and _image_latent(
      graph, inputs.get("latent_image")) and _img2img_from_step(inputs))
  if from_step:  # img2img from a step of its schedule: a KSampler's steps and denoise
    denoise = (total - start) / (total + 0.5)  # int((total - start) / denoise) == total
    fields["Steps"] = str(total - start)
    reader.note(None, f"node {sampler_id} runs steps {start} to {total} of its image's "
                      f"schedule: as --steps {total - start} --strength {denoise:.6g} (ComfyUI's "
                      "KSampler places int(steps / strength) and runs the last steps: the same "
                      "levels)")
  elif refiner is None and (inputs.get("start_at_step", 0) > 0
                            or inputs.get("end_at_step", 10000) < inputs.get("steps", 0)):
    reader.note(None, f"node {sampler_id} runs steps {inputs.get('start_at_step', 0)} to "
                      f"{inputs.get('end_at_step', inputs.get('steps'))} only: sdjax runs them "
                      "all")
  reader.latent(inputs.get("latent_image"), denoise)
  reader.micro_conditioning()  # SDXL's, by the size
  if refiner is not None:
    _refiner(reader, inputs, *refiner)
  hires = _hires_pass(graph, sampler_id, others)
  if hires is not None:
    _hires(reader, inputs, hires)
    others = [i for i in others if i != hires[0]]
  reader.model(inputs.get("model"))
  for key, label in (("prompt", "Prompt 2"), ("negative_prompt", "Negative prompt 2")):
    if texts_l[key] is not None:  # text_l to the first encoder, text_g to the second
      fields[label], fields[key] = fields[key], texts_l[key]
  discard = node["class_type"] not in _CUSTOM_SAMPLER_NODES and sampler in _DISCARDING
  if table and inputs.get("sigmas") is None:  # the levels of its table
    zsnr = fields.get("Noise Schedule") == "Zero Terminal SNR"
    inputs["sigmas"] = sigma_schedules.table_levels(
      _TABLE_SCHEDULERS[scheduler], inputs.get("steps"), "comfyui", zero_snr=zsnr,
      discard=discard)
    if inputs["sigmas"] is not None:
      fields["Steps"] = str(len(inputs["sigmas"]) - 1)
  if reader.loras:  # as an A1111 prompt carries them: main.py applies them from --lora_dir
    for key in ("prompt", "Hires prompt"):  # A1111's hires pass reads its own prompt's tags
      if key in fields:
        fields[key] = " ".join([fields[key], *reader.loras])
    reader.note("lora_dir", f"LoRAs {', '.join(reader.loras)} added to the prompt as A1111 "
                            "tags: give --lora_dir (the folder of ComfyUI's loras)")
  # the decode follows the last pass
  reader.vae(hires[0] if hires is not None else refiner[0] if refiner is not None else sampler_id)
  if others:
    reader.note(None, f"{len(others)} more sampler pass(es) (nodes {', '.join(others)}: a hires "
                      "fix or refiner workflow) are not reproduced")
  found = infotext.from_fields(fields, made_in="ComfyUI")
  flags = dict(found.flags)
  if inputs.get("sigmas") is not None:  # an AlignYourStepsScheduler's or ddim_uniform's levels
    flags["sigmas"] = [str(v) for v in inputs["sigmas"]]
    flags.pop("schedule_type", None)
  options = json.loads(flags.get("scheduler_options", "{}"))
  name = flags.get("scheduler") and outputs.scheduler_name(flags["scheduler"])
  if name and inputs.get("sigmas") is not None and not _runs_over(name, inputs["sigmas"]):
    reader.note(None, f"the levels end at {inputs['sigmas'][-1]:.6g}, not 0 (ComfyUI's sampler "
                      f"stops there): sdjax's {name} runs only to 0 (Euler, Euler a and others "
                      "stop anywhere)")
  if reader.lcm_node is not None and name != "lcm":
    reader.note(None, f"node {reader.lcm_node} ({_MODEL_SAMPLING}) samples the model as lcm: "
                      f"reproduced with the lcm sampler only, not {sampler}")
  if name == "lcm" and reader.lcm_node is None:  # the plain model's x0, its levels: not lcm's
    options = {}
    flags.pop("scheduler_options", None)
    if flags.pop("schedule_type", None) is not None:
      reader.note("schedule_type", f"scheduler {scheduler} (with sampler lcm on a model without "
                                   f"{_MODEL_SAMPLING} lcm): sdjax places the noise levels its "
                                   "own way")
  if discard and inputs.get("sigmas") is None:  # its KSampler's levels of one step more
    options["discard_penultimate_sigma"] = True
  options.update(sampler_options)
  if name and options.get("k_diffusion") and schedulers.takes_option(name, "comfyui"):
    flags["scheduler_options"] = json.dumps({**options, "comfyui": True})  # its start, timesteps
  elif name == "unipc":  # its uni_pc code (the UniPC authors'), its order and variant
    flags["scheduler_options"] = json.dumps({
      **options, "comfyui": True, "solver_type": "bh2" if sampler == "uni_pc_bh2" else "bh1",
      "solver_order": 3})
  else:
    reader.note(None, f"sampler {sampler}: ComfyUI starts from its noise times sqrt(1 + "
                      "sigma_max^2) and feeds the UNet whole timesteps, sdjax's "
                      f"{name or 'sampler'} does not")
  comfy = (None, "ComfyUI splits a prompt past 75 tokens without A1111's comma rule (a longer "
                 "prompt's chunks may differ)")
  return infotext.Reproduction(flags, (*found.notes, *reader.notes, comfy), None)


__all__ = ["SAMPLERS", "SCHEDULERS", "parse_graph", "read_graph_text", "reproduce"]
