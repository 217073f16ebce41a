"""The safety checker of Stable Diffusion 1.x folders: diffusers' `StableDiffusionSafetyChecker`
(the `safety_checker/` of SD1.x repos, or CompVis/stable-diffusion-safety-checker), deciding
which images to flag exactly as diffusers' pipelines do, and blacking them out on request.

The checker is a CLIP image encoder (transformers' ViT-L/14 in the released one) and 20 fixed
embeddings with a threshold each: 17 concepts and 3 "special care" ones. An image's score for an
embedding is its cosine similarity to the image's CLIP embedding minus the threshold, rounded
to 3 decimals as diffusers rounds it; a special-care score above 0 raises the scores after it
(the image's later special-care ones and all its concept ones) by 0.01, and an image is flagged
when any concept score is above 0. diffusers' pipelines then return a black image instead.

Images reach it as diffusers hands them over: 8-bit (`round(x * 255)`), resized and cropped by
CLIP's image processor (the folder's `feature_extractor/` settings). The encoder runs on the
default device in float32 at full matmul precision, whatever the run's dtype: a flag is a
threshold decision, so it should not move with the hardware.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import aot, outputs
from sdjax.checkpoints import hub
from sdjax.checkpoints import ip_adapter as ip_files
from sdjax.checkpoints.weights import WeightsError, read_state_dict, torch_to_flax
from sdjax.models import config_utils
from sdjax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection

# The checker's fixed embeddings and thresholds (diffusers' parameter names).
_CONCEPTS = ("concept_embeds", "concept_embeds_weights")
_SPECIAL = ("special_care_embeds", "special_care_embeds_weights")
# What older transformers (4.2x, which wrote the released checker's config) dumped into a
# vision config besides the keys CLIPVisionConfig reads or already ignores.
_LEGACY_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_encoder_decoder")
_SPECIAL_ADJUSTMENT = 0.01  # diffusers' raise of the later scores after a special-care hit
NSFW_ACTIONS = ("black", "keep")


class SafetyCheckerError(ValueError):
  """A safety checker that cannot be loaded, or images it cannot take: one line saying why."""


@dataclasses.dataclass(frozen=True)
class SafetyResult:
  """What the checker found, per image: `nsfw` (bool [N]) and the scores it decided by, as
  diffusers computes them (float32, rounded to 3 decimals; above 0 is a hit): `concept_scores`
  [N, 17] and `special_scores` [N, 3]."""

  nsfw: np.ndarray
  concept_scores: np.ndarray
  special_scores: np.ndarray

  @property
  def scores(self) -> np.ndarray:
    """Each image's highest concept score (float32 [N]): flagged exactly when above 0."""
    return self.concept_scores.max(axis=1)


def decide(special_cos: np.ndarray, concept_cos: np.ndarray, special_thresholds: np.ndarray,
           concept_thresholds: np.ndarray) -> SafetyResult:
  """diffusers' decision (`StableDiffusionSafetyChecker.forward`) from the cosine similarities
  of N images to the special-care [N, 3] and concept [N, 17] embeddings, in its float32
  arithmetic: the special-care scores in order, each after the first hit raised by 0.01."""
  special_cos = np.asarray(special_cos, np.float32)
  concept_cos = np.asarray(concept_cos, np.float32)
  special_thresholds = np.asarray(special_thresholds, np.float32)
  concept_thresholds = np.asarray(concept_thresholds, np.float32)
  n = concept_cos.shape[0]
  adjustment = np.zeros(n, np.float32)
  special = np.empty_like(special_cos)
  for k in range(special_cos.shape[1]):
    special[:, k] = np.round(special_cos[:, k] - special_thresholds[k] + adjustment, 3)
    adjustment = np.where(special[:, k] > 0, np.float32(_SPECIAL_ADJUSTMENT), adjustment)
  concept = np.round(concept_cos - concept_thresholds + adjustment[:, None], 3)
  return SafetyResult((concept > 0).any(axis=1), concept, special)


class SafetyChecker:
  """A loaded safety checker (`load_safety_checker`). `check(images)` says which to flag;
  `censor(images, result)` blacks those out, as diffusers' pipelines return them."""

  def __init__(self, model: CLIPVisionModelWithProjection, params, embeddings: dict[str, Any],
               processor, source: str):
    self.model, self.params, self.processor, self.source = model, params, processor, source
    self._special_thresholds = np.asarray(embeddings["special_care_embeds_weights"], np.float32)
    self._concept_thresholds = np.asarray(embeddings["concept_embeds_weights"], np.float32)
    self._embeds = jax.device_put({k: np.asarray(embeddings[k], np.float32)
                                   for k in ("special_care_embeds", "concept_embeds")})

  def pixels(self, images) -> np.ndarray:
    """The encoder's input: float32 [N, S, S, 3] from images as `check` takes them."""
    pil = [_as_pil(image) for image in _as_list(images)]
    if not pil:
      return np.zeros((0, *self.input_shape), np.float32)
    pixels = self.processor(pil, return_tensors="np")["pixel_values"]  # N, 3, S, S
    return np.ascontiguousarray(np.asarray(pixels, np.float32).transpose(0, 2, 3, 1))

  @property
  def input_shape(self) -> tuple[int, int, int]:
    side = self.model.config.image_size
    return side, side, self.model.config.num_channels

  def similarities(self, pixels: np.ndarray, batch: int | None = None):
    """(special-care [N, 3], concept [N, 17]) cosine similarities of the images' CLIP
    embeddings, float32. `batch`: pad the rows to this many (one compiled program for a run's
    batches, whatever the last one holds)."""
    n = len(pixels)
    rows = max(n, batch or 0, 1)
    padded = np.zeros((rows, *self.input_shape), np.float32)
    padded[:n] = pixels
    with jax.default_matmul_precision("highest"):
      special, concept = _similarities(self.model, self.params, self._embeds, padded)
    return np.asarray(special)[:n], np.asarray(concept)[:n]

  def check(self, images, batch: int | None = None) -> SafetyResult:
    """Which `images` to flag: a PIL image, an array [H, W, 3] or [N, H, W, 3] (uint8, or
    float in [0, 1] as `Pipeline.generate` returns them), or a list of those (sizes may
    differ)."""
    special, concept = self.similarities(self.pixels(images), batch)
    return decide(special, concept, self._special_thresholds, self._concept_thresholds)

  @staticmethod
  def censor(images, result: SafetyResult):
    """`images` (an array [N, H, W, 3] or a list) with the flagged ones replaced by black ones
    of the same shape and dtype, as diffusers does; the rest unchanged."""
    if isinstance(images, list | tuple):
      return [np.zeros_like(np.asarray(image)) if flag else image
              for image, flag in zip(images, result.nsfw, strict=True)]
    images = np.array(images, copy=True)
    images[np.asarray(result.nsfw, bool)] = 0
    return images


def _as_list(images) -> list:
  if isinstance(images, Image.Image):
    return [images]
  if isinstance(images, list | tuple):
    return list(images)
  array = np.asarray(images)
  if array.ndim == 3:
    return [array]
  if array.ndim != 4:
    raise SafetyCheckerError(f"the safety checker takes images [N, H, W, 3] or [H, W, 3], got "
                             f"shape {array.shape}")
  return list(array)


def _as_pil(image) -> Image.Image:
  """An image as the 8-bit RGB picture diffusers hands the checker's image processor."""
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise SafetyCheckerError(f"the safety checker takes RGB images [H, W, 3], got shape "
                             f"{array.shape}")
  if array.dtype != np.uint8:
    try:
      array = outputs.to_uint8(array)
    except ValueError as e:
      raise SafetyCheckerError(f"the safety checker cannot take this image: {e}") from None
  return Image.fromarray(array)


@functools.partial(aot.bounded_jit, static_argnums=0)
def _similarities(model, params, embeds, pixels):
  def unit(x):  # torch's F.normalize: x / max(||x||, 1e-12)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  image = unit(model.apply({"params": params}, pixels)["image_embeds"].astype(jnp.float32))
  return image @ unit(embeds["special_care_embeds"]).T, image @ unit(embeds["concept_embeds"]).T


def load_safety_checker(source: str, *, revision: str | None = None) -> SafetyChecker:
  """Loads a safety checker from `source`: a diffusers SD1.x folder or hub id holding
  `safety_checker/` (its image processor from `feature_extractor/`), or a checker's own folder
  or hub id (config.json, weights, preprocessor_config.json: CompVis/stable-diffusion-safety-
  checker). Pickled weights are read without running code."""
  try:
    folder = hub.resolve_source(source, revision=revision, component="safety_checker")
    checker = os.path.join(folder, "safety_checker")
    if os.path.isfile(os.path.join(checker, "config.json")):
      processor_folder = os.path.join(folder, "feature_extractor")
      folder = checker
    elif os.path.isfile(os.path.join(folder, "config.json")):
      processor_folder = folder
    else:
      raise SafetyCheckerError(f"{source} holds no safety checker (no safety_checker/ folder "
                               "and no config.json)")
    config = _vision_config(config_utils.read_json(os.path.join(folder, "config.json")))
    state = read_state_dict(folder, "safety_checker")
    missing = [k for k in _CONCEPTS + _SPECIAL if k not in state]
    if missing:
      raise SafetyCheckerError(f"{folder} is not a safety checker's weights (no "
                               f"{', '.join(missing)})")
    embeddings = {k: state.pop(k) for k in _CONCEPTS + _SPECIAL}
    _check_embeddings(embeddings, config.projection_dim, folder)
    model = CLIPVisionModelWithProjection(config)
    side = config.image_size
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, side, side, config.num_channels)))["params"]
    params = jax.device_put(torch_to_flax(ip_files.vision_state(state), expected,
                                          "safety_checker", np.dtype(np.float32)))
    processor = _image_processor(processor_folder, side)
  except (hub.HubError, config_utils.ConfigError, WeightsError, OSError) as e:
    raise SafetyCheckerError(f"cannot load safety checker {source}: {e}") from None
  return SafetyChecker(model, params, embeddings, processor, str(source))


def _vision_config(raw: dict[str, Any]) -> CLIPVisionConfig:
  """The image encoder of a safety checker's CLIPConfig: its `vision_config` (and older
  transformers' `vision_config_dict`, which takes precedence), projected to the config's own
  `projection_dim` (transformers' CLIPConfig default 512), not the vision config's."""
  if raw.get("model_type") != "clip" or not isinstance(raw.get("vision_config"), dict):
    raise config_utils.ConfigError("the safety checker's config.json is not a CLIP config "
                                   "(model_type 'clip' with a vision_config)")
  vision = {**raw["vision_config"], **(raw.get("vision_config_dict") or {})}
  for key in _LEGACY_KEYS:
    vision.pop(key, None)
  vision["projection_dim"] = raw.get("projection_dim", 512)
  vision.setdefault("model_type", "clip_vision_model")
  return CLIPVisionConfig.from_dict(vision)


def _check_embeddings(embeddings: dict[str, np.ndarray], width: int, folder: str) -> None:
  for embeds, thresholds in (_CONCEPTS, _SPECIAL):
    e, t = np.shape(embeddings[embeds]), np.shape(embeddings[thresholds])
    if len(e) != 2 or e[1] != width or t != (e[0],):
      raise SafetyCheckerError(f"{folder}: {embeds} {e} and {thresholds} {t} do not fit a "
                               f"checker projecting to {width}")


def _image_processor(folder: str, side: int):
  """transformers' CLIP image processor from `folder`'s preprocessor_config.json (its PIL
  backend: the same pixels with or without torchvision), else CLIP's defaults at `side`."""
  import transformers  # noqa: PLC0415

  cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
  if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
    return cls.from_pretrained(folder, local_files_only=True)
  return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


__all__ = ["NSFW_ACTIONS", "SafetyChecker", "SafetyCheckerError", "SafetyResult", "decide",
           "load_safety_checker"]
