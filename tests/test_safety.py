"""The safety checker against diffusers' `StableDiffusionSafetyChecker`: its CLIP image encoder
and similarities, its decision (rounding, the special-care raise) on designed similarities, a
pipeline's flagged images black as diffusers returns them, loading (pipeline folder, a
checker's own folder with an older transformers config and pickled weights, hub file lists)
and main.py runs with --safety_checker."""

import json
import os
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import safety_checker as diffusers_checker
from parity import nchw, one_image_run
from transformers import CLIPConfig, CLIPImageProcessor

import sdjax
from sdjax import outputs, run, safety, testing
from sdjax.checkpoints import hub

torch.set_num_threads(1)

VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "hidden_act": "gelu"}
PROJECTION = 24  # != the vision config's own projection_dim: the CLIPConfig's is the one used


def torch_checker(seed=0, concept_thresholds=0.5, special_thresholds=0.5):
  """A random diffusers safety checker (a tiny CLIP image encoder, random embeddings)."""
  torch.manual_seed(seed)
  config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2},
                      vision_config=VISION, projection_dim=PROJECTION)
  checker = diffusers_checker.StableDiffusionSafetyChecker(config).eval()
  with torch.no_grad():
    for p in checker.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
    checker.concept_embeds_weights.fill_(0).add_(torch.as_tensor(concept_thresholds))
    checker.special_care_embeds_weights.fill_(0).add_(torch.as_tensor(special_thresholds))
  return checker


def torch_similarities(checker, pixels):
  with torch.no_grad():
    image = checker.visual_projection(checker.vision_model(nchw(pixels))[1])
    return (diffusers_checker.cosine_distance(image, checker.special_care_embeds).numpy(),
            diffusers_checker.cosine_distance(image, checker.concept_embeds).numpy())


def processor(side=32):
  return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side,
                                                                    "width": side})


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("checker"))
  torch_checker().save_pretrained(folder)
  processor().save_pretrained(folder)
  return folder


def test_similarities_match_diffusers(checker_folder):
  ref = diffusers_checker.StableDiffusionSafetyChecker.from_pretrained(checker_folder).eval()
  ours = safety.load_safety_checker(checker_folder)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),  # sizes differ: a list
            rng.random((30, 64, 3), dtype=np.float32),  # float in [0, 1], as generate() makes
            rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
  pixels = ours.pixels(images)
  want = processor()([_pil(x) for x in images],
                     return_tensors="np")["pixel_values"]
  np.testing.assert_array_equal(pixels, np.asarray(want).transpose(0, 2, 3, 1))
  special, concept = ours.similarities(pixels, batch=4)  # padded rows change nothing
  ref_special, ref_concept = torch_similarities(ref, pixels)
  assert special.shape == (3, 3) and concept.shape == (3, 17)
  np.testing.assert_allclose(special, ref_special, atol=1e-6, rtol=0)
  np.testing.assert_allclose(concept, ref_concept, atol=1e-6, rtol=0)


def _pil(image):
  from PIL import Image  # noqa: PLC0415

  array = np.asarray(image)
  return Image.fromarray(array if array.dtype == np.uint8 else outputs.to_uint8(array))


# Similarities relative to every threshold (0.5): per image, (special-care deltas [3], concept
# delta of concept 4, the other concepts' delta). diffusers rounds scores to 3 decimals before
# comparing with 0 and raises the later scores by 0.01 after a special-care hit.
_CASES = [
    ((-0.1, -0.1, -0.1), -0.1, -0.2),  # clean
    ((-0.1, -0.1, -0.1), 0.0004, -0.2),  # above 0, rounded to 0: not flagged
    ((-0.1, -0.1, -0.1), 0.0006, -0.2),  # rounded to 0.001: flagged
    ((0.02, -0.1, -0.1), -0.005, -0.2),  # special-care hit: -0.005 + 0.01, flagged
    ((0.0004, -0.1, -0.1), -0.005, -0.2),  # special-care 0.0004 rounds to 0: no raise
    ((-0.1, 0.02, -0.1), -0.009, -0.2),  # a later special-care hit raises too: flagged
    ((0.02, -0.1, -0.1), -0.0104, -0.2),  # raised to -0.0004, rounded to -0.0: not flagged
    ((-0.1, -0.1, -0.1), -0.3, 0.1),  # every other concept: flagged
    ((-0.1, -0.1, -0.0096), -0.0096, -0.2),  # -0.0096 + 0.01 on special 2 only: no raise
]


def test_decision_matches_diffusers():
  special = np.array([[0.5 + d for d in s] for s, _, _ in _CASES], np.float32)
  concept = np.array([[0.5 + (c if j == 4 else rest) for j in range(17)]
                      for _, c, rest in _CASES], np.float32)
  ref = torch_checker()
  images = np.ones((len(_CASES), 2, 2, 3), np.float32)
  pixels = torch.zeros((len(_CASES), 3, VISION["image_size"], VISION["image_size"]))
  with mock.patch.object(diffusers_checker, "cosine_distance",
                         side_effect=[torch.from_numpy(special), torch.from_numpy(concept)]):
    black, flags = ref(clip_input=pixels, images=images.copy())
  ours = safety.decide(special, concept, np.full(3, 0.5), np.full(17, 0.5))
  assert list(ours.nsfw) == list(flags) == [False, False, True, True, False, True, False, True,
                                            False]
  np.testing.assert_array_equal(safety.SafetyChecker.censor(images, ours), black)
  assert ours.scores[2] == np.float32(0.001) and ours.scores[1] == 0
  assert ours.special_scores[3, 0] == np.float32(0.02)


@pytest.fixture(scope="module")
def pipeline_with_checker(tmp_path_factory):
  """(diffusers pipeline with its safety checker, sdjax pipeline, folder, two images' latents),
  the checker's thresholds set so that exactly one of the two images is flagged."""
  root = tmp_path_factory.mktemp("checked")
  folder = str(root / "pipe")
  testing.write_torch_pipeline(folder, "sd1", seed=5)
  pipe = sdjax.load_pipeline(folder)
  latents = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
  images = np.asarray(pipe.generate(["a cat", "a dog"], steps=3, height=16,
                                    width=16, latents=latents, guidance_scale=3.0))
  checker = torch_checker(seed=1, concept_thresholds=2.0, special_thresholds=2.0)
  checker.save_pretrained(os.path.join(folder, "safety_checker"))
  processor().save_pretrained(os.path.join(folder, "feature_extractor"))
  ours = safety.load_safety_checker(folder)
  _, concept = ours.similarities(ours.pixels(images))
  j = int(np.argmax(np.abs(concept[0] - concept[1])))
  assert abs(concept[0, j] - concept[1, j]) > 0.01  # far from the rounding
  with torch.no_grad():
    checker.concept_embeds_weights[j] = float(concept[:, j].mean())
  checker.save_pretrained(os.path.join(folder, "safety_checker"))
  index = json.load(open(os.path.join(folder, "model_index.json")))
  index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"],
               requires_safety_checker=True)
  json.dump(index, open(os.path.join(folder, "model_index.json"), "w"))
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  return ref, pipe, folder, latents


def test_pipeline_flags_and_blacks_out_as_diffusers(pipeline_with_checker):
  ref, pipe, folder, latents = pipeline_with_checker
  with torch.no_grad():
    out = ref(["a cat", "a dog"], num_inference_steps=3, guidance_scale=3.0, height=16,
              width=16, latents=nchw(latents), output_type="np")
  checker = safety.load_safety_checker(folder)  # safety_checker/ and feature_extractor/
  images = np.asarray(pipe.generate(["a cat", "a dog"], steps=3, height=16,
                                    width=16, latents=latents, guidance_scale=3.0))
  result = checker.check(images)
  assert sorted(out.nsfw_content_detected) == [False, True]
  assert list(result.nsfw) == list(out.nsfw_content_detected)
  censored = checker.censor(images, result)
  flagged = int(np.argmax(result.nsfw))
  assert not censored[flagged].any() and not out.images[flagged].any()
  np.testing.assert_allclose(censored, out.images, atol=1e-4, rtol=0)
  assert images[flagged].any()  # censor() copies


def _legacy_config(folder):
  """The config as transformers 4.2x wrote the released checker's: generation keys dumped into
  the vision config, a `vision_config_dict` beside it."""
  path = os.path.join(folder, "config.json")
  config = json.load(open(path))
  config["vision_config"].update(bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                 tie_encoder_decoder=False, top_k=50, _name_or_path="",
                                 projection_dim=512, hidden_size=999)
  config["vision_config_dict"] = {k: VISION[k] for k in ("hidden_size", "num_hidden_layers")}
  json.dump(config, open(path, "w"))


def test_checker_folder_with_pickled_weights_and_an_old_config(tmp_path, checker_folder):
  ref = torch_checker()
  folder = str(tmp_path / "old")
  ref.save_pretrained(folder)
  os.remove(os.path.join(folder, "model.safetensors"))
  torch.save(ref.state_dict(), os.path.join(folder, "pytorch_model.bin"))
  _legacy_config(folder)  # and no preprocessor_config.json: CLIP's defaults at image_size
  old = safety.load_safety_checker(folder)
  new = safety.load_safety_checker(checker_folder)
  image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
  for a, b in zip(old.similarities(old.pixels(image)), new.similarities(new.pixels(image)),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_bad_checkers(tmp_path, checker_folder, model):
  def error(source):
    with pytest.raises(safety.SafetyCheckerError) as e:
      safety.load_safety_checker(source)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert "does not exist" in error(str(tmp_path / "nowhere"))
  assert "no safety checker" in error(model)  # a pipeline folder without one
  broken = tmp_path / "broken"
  broken.mkdir()
  state = {k: v for k, v in torch_checker().state_dict().items() if k != "concept_embeds"}
  torch.save(state, str(broken / "pytorch_model.bin"))
  (broken / "config.json").write_text(open(os.path.join(checker_folder, "config.json")).read())
  assert "no concept_embeds" in error(str(broken))
  (broken / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
  assert "not a CLIP config" in error(str(broken))
  with pytest.raises(safety.SafetyCheckerError, match="RGB images"):
    safety.load_safety_checker(checker_folder).check(np.zeros((2, 8, 8), np.uint8))


def test_hub_files_of_a_checker():
  pipeline_repo = ["model_index.json", "unet/config.json", "safety_checker/config.json",
                   "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
                   "feature_extractor/preprocessor_config.json"]
  assert hub.select_files(pipeline_repo, component="safety_checker") == [
      "safety_checker/config.json", "feature_extractor/preprocessor_config.json",
      "safety_checker/model.safetensors"]
  own_repo = ["config.json", "pytorch_model.bin", "preprocessor_config.json", "README.md"]
  assert hub.select_files(own_repo, component="safety_checker") == [
      "config.json", "preprocessor_config.json", "pytorch_model.bin"]
  assert not any("safety_checker" in f for f in hub.select_files(pipeline_repo))


@pytest.mark.parametrize("action", ["black", "keep"])
def test_runs_record_and_black_out(model, tmp_path, action):
  pipe = sdjax.load_pipeline(model)
  flag_all, flag_none = str(tmp_path / "all"), str(tmp_path / "none")
  torch_checker(concept_thresholds=-2.0).save_pretrained(flag_all)  # every cosine is above -2
  torch_checker(concept_thresholds=2.0, special_thresholds=2.0).save_pretrained(flag_none)
  _, record, png, settings = one_image_run(pipe, tmp_path / "flagged", safety_checker=flag_all,
                                           nsfw_action=action)
  made = outputs.to_uint8(np.asarray(pipe.generate(["a cat"], **settings))[0])
  assert record["nsfw"] is True and record["nsfw_score"] > 1
  np.testing.assert_array_equal(np.asarray(png), made * (action == "keep"))
  _, record, png, _ = one_image_run(pipe, tmp_path / "clean", safety_checker=flag_none,
                                    nsfw_action=action)
  assert record["nsfw"] is False and record["nsfw_score"] < -1
  np.testing.assert_array_equal(np.asarray(png), made)
  with pytest.raises(run.RunError, match="--safety_checker: cannot load safety checker"):
    one_image_run(pipe, tmp_path / "bad", safety_checker=str(tmp_path / "nowhere"))
