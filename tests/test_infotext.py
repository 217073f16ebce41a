"""Reading an image's A1111 parameters back into main.py flags (A1111's PNG Info)."""

import json
import re

import pytest

from sdjax import outputs
from sdjax.infotext import reproduce

# As A1111 1.10 writes it: sampler and schedule type apart, GPU noise (no RNG field), the
# hires fix with an upscaler sdjax lacks, an extension's field.
A1111_110 = """masterpiece, (a cat:1.2), <lora:foo:0.8>
Negative prompt: blurry, lowres
Steps: 28, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 6.5, Seed: 123456, \
Size: 832x1216, Model hash: 67ab2fd8ec, Model: ponyDiffusionV6XL, Denoising strength: 0.4, \
Clip skip: 2, ENSD: 31337, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: 4x-UltraSharp, \
VAE hash: 735e4c3a44, VAE: sdxl_vae.safetensors, Lora hashes: "foo: 1234567890ab", \
ADetailer model: face_yolov8n.pt, Version: v1.10.1"""


def _flags(text):
  return reproduce(text).flags


def _notes(text):
  return dict(reproduce(text).notes)


@pytest.mark.parametrize(("label", "flag"), [
    ("R-ESRGAN 4x+", "R-ESRGAN 4x+"), ("ESRGAN_4x", "ESRGAN_4x"), ("4x_NMKD-Siax_200k", None),
    ("Latent (bicubic antialiased)", "latent-bicubic-antialiased"), ("Lanczos", "lanczos"),
    ("R-ESRGAN General 4xV3", None), ("SwinIR 4x", ""), ("LDSR", ""), ("ScuNET GAN", ""),
    ("DAT x4", "")])
def test_hires_upscaler_names(label, flag):
  """A1111's Hires upscaler: its latent and PIL ones by our names; ESRGAN-family models (its
  R-ESRGANs, ESRGAN_4x, any file's stem) by their name, for --upscaler_dir; other
  architectures (SwinIR, LDSR, ScuNET, DAT): a note, Latent."""
  found = reproduce(f"a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, "
                    f"Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: {label}")
  if flag == "":
    assert "hires_upscaler" not in found.flags
    assert label in dict(found.notes)["hires_upscaler"]
  else:
    assert found.flags["hires_upscaler"] == (flag or label)
    assert "hires_upscaler" not in dict(found.notes)


def test_a1111_image():
  found = reproduce(A1111_110)
  assert found.flags == {
      "prompt": ["masterpiece, (a cat:1.2), <lora:foo:0.8>"], "negative_prompt": "blurry, lowres",
      "scheduler": "DPM++ 2M", "schedule_type": "Karras", "width": "832", "height": "1216",
      "steps": "28", "guidance_scale": "6.5", "seed": "123456", "clip_skip": "2",
      "ensd": "31337", "hires_scale": "1.5", "hires_strength": "0.4", "hires_steps": "10",
      "hires_upscaler": "4x-UltraSharp",  # an ESRGAN file, found in --upscaler_dir by main.py
      "rng": "nv",  # no RNG: A1111's GPU source, an NVIDIA GPU's noise
      # k-diffusion's placement, and its start and timesteps in diffusers' DPM-Solver++
      "scheduler_options": '{"timestep_spacing": "linspace", "k_diffusion": true}',
      "pixel_levels": "floor"}  # A1111's 8-bit levels: truncated
  notes = dict(found.notes)
  assert set(notes) == {"model", "vae", "rng", None}
  assert notes["vae"] == "made with the VAE sdxl_vae.safetensors: give it with --vae"
  assert "ponyDiffusionV6XL [67ab2fd8ec]" in notes["model"] and "--model" in notes["model"]
  assert notes["rng"].startswith("RNG: GPU") and "NV" in notes["rng"]
  assert notes[None] == "not reproduced: ADetailer model: face_yolov8n.pt"  # not the hashes
  assert found.model_hash == "67ab2fd8ec"


@pytest.mark.parametrize("version,want", [
    ("v1.6.0", (1, 6, 0, 0)), ("v1.7.0-224-g1a2b3c4d", (1, 7, 0, 224)),
    ("v1.7.0-225-g1a2b3c4d", (1, 7, 0, 225)), ("1.8.0-RC", (1, 8, 0, -1)),
    ("v1.7.0-RC-5-gf92d6149", (1, 7, 0, -1)), ("v1.10.1", (1, 10, 1, 0)),
    ("f0.0.17v1.8.0rc-latest-276-g29be1da7", None), ("sdjax 0.3.0", None), (None, None)])
def test_a1111_versions(version, want):
  """`Version` ordered as A1111 orders it (a tag, commits after it, a release candidate before
  it); Forge's and other programs' versions are none of A1111's."""
  from sdjax.infotext import a1111_version  # noqa: PLC0415

  assert a1111_version(version) == want


@pytest.mark.parametrize("version,downcast,pad_v0", [
    ("v1.5.2", "sd1_sd2", True), ("v1.6.0", "sd1_sd2", False),
    ("v1.7.0-224-gabc", "sd1_sd2", False),
    ("v1.7.0-225-gabc", False, False), ("v1.10.1", False, False), (None, False, False)])
def test_what_an_older_a1111_did(version, downcast, pad_v0):
  """A1111's backcompat from the image's Version: before 1.7.0-225 a float16 SD1/SD2 model's
  alphas_cumprod was float16 (an SDXL model's float32: "sd1_sd2"); before 1.6.0 DDIM padded conds as `Pad conds v0` and prompt
  editing counted steps in the old way (`Old prompt editing timelines`)."""
  text = "a [cat:dog:0.5]\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1" + (
      f", Version: {version}" if version else "")
  found = reproduce(text)
  options = json.loads(found.flags["scheduler_options"])
  assert options.get("downcast_alphas_cumprod", False) == downcast
  assert found.flags.get("pad_cond_uncond_v0") == ("true" if pad_v0 else None)
  assert found.flags.get("old_prompt_editing_timelines") == ("true" if pad_v0 else None)
  written = reproduce(text.replace("Seed: 1", "Seed: 1, Downcast alphas_cumprod: True"))
  assert json.loads(written.flags["scheduler_options"])["downcast_alphas_cumprod"]
  ddpm = reproduce(text.replace("DDIM", "DDPM"))  # a sampler without the option: a note
  assert ("float32 training schedule" in dict(ddpm.notes).get("scheduler", "")) == bool(downcast)
  unipc = json.loads(reproduce(text.replace("DDIM", "UniPC")).flags["scheduler_options"])
  assert unipc.get("downcast_alphas_cumprod", False) == downcast


@pytest.mark.parametrize("sampler,label,want", [
    ("DPM++ 2M", "Automatic", "Karras"),  # A1111 >= 1.9: the sampler's own choice
    ("DPM++ 2M SDE", "Automatic", "Exponential"),
    ("Euler a", "Automatic", "Uniform"),  # else k-diffusion's get_sigmas: A1111's Uniform
    ("DPM++ 2M", None, "Uniform"),  # older A1111: no schedule types, get_sigmas too
    ("DPM++ 2M Karras", None, None),  # ... but where the name says Karras
    ("Euler", "Align Your Steps", "Align Your Steps"),
    ("Euler a", "Karras", "Karras"),
    ("DPM++ 2S a", "Automatic", "Karras"),
    ("DPM2", "Automatic", "Karras"),
    ("DPM2 a", None, "Uniform"),
    ("DPM++ SDE", "Automatic", "Karras"),
    ("Restart", "Automatic", "Karras"),
    ("Restart", None, "Karras"),  # A1111 1.6-1.8 ran it on Karras levels
    ("DDIM", "Karras", None),  # A1111 steps its timestep samplers over their own timesteps
    ("UniPC", "Exponential", None),
])
def test_schedule_type(sampler, label, want):
  typed = f", Schedule type: {label}" if label else ""
  flags = _flags(f"a cat\nSteps: 20, Sampler: {sampler}{typed}, CFG scale: 7, Seed: 1")
  assert flags["scheduler"] == sampler and flags.get("schedule_type") == want
  options = json.loads(flags.get("scheduler_options", "{}"))
  if sampler in ("DDIM", "UniPC"):  # A1111 runs the others in k-diffusion; these in its loops
    assert options == {"a1111": True, **({} if sampler == "DDIM" else {
      "solver_type": "bh1", "solver_order": 3})}  # A1111's UniPC settings
  else:  # as A1111 steps (k_diffusion), but Restart, A1111's own loop
    assert options == {"timestep_spacing": "linspace",
                       **({} if sampler == "Restart" else {"k_diffusion": True})}
  # sdjax's own images name their schedule type when they have one: nothing to infer.
  flags = _flags(f"a cat\nSteps: 20, Sampler: {sampler}{typed}, CFG scale: 7, Seed: 1, "
                 "Version: sdjax 0.1.0")
  assert "scheduler_options" not in flags


@pytest.mark.parametrize("field,rng,note", [
    ("RNG: CPU, ", "torch_cpu", False), ("RNG: NV, ", "nv", False),
    ("", "nv", True),  # A1111's GPU default: NVIDIA's noise is NV's; others' are not
    ("Version: sdjax 0.1.0, ", "jax", False), ("RNG: Quantum, ", None, True)])
def test_rng_sources(field, rng, note):
  found = reproduce(f"a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, {field}"
                    "Size: 64x64")
  assert found.flags.get("rng") == rng and ("rng" in dict(found.notes)) == note


def test_what_sdjax_lacks_is_a_note_not_a_flag():
  text = ("a cat\nSteps: 20, Sampler: Euler SMEA Dy, Schedule type: Cosine, "
          "CFG scale: 7, Seed: 1, RNG: NV, Eta: 0.67, Denoising strength: 0.5, Mask blur x: 4")
  found = reproduce(text)
  assert set(found.flags) == {"prompt", "negative_prompt", "steps", "guidance_scale", "seed",
                              "rng", "strength", "pixel_levels"}
  notes = dict(found.notes)
  assert set(notes) == {"scheduler", "schedule_type", "init_image", None}
  assert notes["init_image"] == (
      "Denoising strength: 0.5: an img2img or inpainting image, whose init image is not in the "
      "file (give it with --init_image or in a .jsonl prompts line)")
  assert [t for f, t in found.notes if f is None] == [
      "Eta: 0.67: sdjax's sampler takes no eta", "not reproduced: Mask blur x: 4"]


def test_img2img_and_inpaint_fields():
  """An img2img or inpainting image's Denoising strength is --strength (its init image a note);
  A1111's inpaint settings their flags: Mask blur, Inpaint area "Only masked" with its Masked
  area padding, Masked content (A1111 writes fill; sdjax the latent ones too); an A1111 image's
  A1111's blend (`--inpaint_blend a1111`)."""
  text = ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Denoising strength: 0.6, "
          "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 16, Masked content: ")
  flags = _flags(text + "fill")
  assert (flags["strength"], flags["mask_blur"], flags["inpaint_full_res"],
          flags["inpaint_full_res_padding"], flags["inpainting_fill"]) == (
      "0.6", "2.0", "true", "16", "fill")
  assert _flags(text + "latent nothing")["inpainting_fill"] == "latent_nothing"
  assert "not one sdjax has" in _notes(text + "lama cleaner")["inpainting_fill"]
  # A1111's in-loop blend: an A1111 image's (a sampler without it: a note); an sdjax image's
  # where it says so.
  assert flags["inpaint_blend"] == "a1111"
  cfg_pp = text.replace("Euler,", "Euler CFG++,") + "fill"
  assert "inpaint_blend" not in _flags(cfg_pp)
  assert "the repainted pixels differ" in _notes(cfg_pp)["inpaint_blend"]
  sdjax = text + "fill, Version: sdjax 0.1.0"
  assert "inpaint_blend" not in _flags(sdjax)
  assert _flags(sdjax.replace("Version", "Inpaint blend: A1111, Version"))["inpaint_blend"] == (
      "a1111")
  assert _flags(text + "fill, Mask mode: Inpaint not masked")["inpainting_mask_invert"] == "true"
  assert "inpainting_mask_invert" not in _flags(text + "fill, Mask mode: Inpaint masked")
  plain = _flags("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1")
  assert not {"strength", "mask_blur", "inpaint_full_res", "inpainting_fill",
              "inpaint_blend"} & set(plain)


def test_soft_inpainting_fields():
  """A1111's Soft inpainting (its extension writes "enabled" and all six settings) is
  --soft_inpainting in its order, with A1111's blend; without that blend (a sampler that does
  not take it) a note; settings without "enabled: True" are dropped."""
  text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Denoising strength: 0.75, "
          "Mask blur: 8, Soft inpainting enabled: True, Soft inpainting schedule bias: 1.5, "
          "Soft inpainting preservation strength: 0.5, Soft inpainting transition contrast "
          "boost: 4, Soft inpainting mask influence: 0.2, Soft inpainting difference "
          "threshold: 0.5, Soft inpainting difference contrast: 2, Version: v1.10.1")
  found = reproduce(text)
  assert found.flags["inpaint_blend"] == "a1111"
  assert found.flags["soft_inpainting"] == ["1.5", "0.5", "4.0", "0.2", "0.5", "2.0"]
  assert not [n for n in found.notes if "Soft" in str(n)]
  cfg_pp = reproduce(text.replace("Euler a,", "Euler CFG++,"))
  assert "soft_inpainting" not in cfg_pp.flags
  assert "with A1111's blend only" in dict(cfg_pp.notes)["soft_inpainting"]
  off = reproduce(text.replace("enabled: True", "enabled: False"))
  assert "soft_inpainting" not in off.flags and "Soft inpainting" not in str(off.notes)


def test_forge_schedule_types():
  """Forge's Align Your Steps GITS / 11 / 32 and Turbo read as the schedule types they are."""
  for label, name in (("Align Your Steps GITS", "align_your_steps_gits"),
                      ("Align Your Steps 11", "align_your_steps"),
                      ("Align Your Steps 32", "align_your_steps_32"), ("Turbo", "turbo")):
    found = reproduce(f"a cat\nSteps: 8, Sampler: Euler, Schedule type: {label}, CFG scale: 7, "
                      "Seed: 1, Version: f2.0.1v1.10.1-previous-669-gdfdcbab6")
    assert outputs.schedule_type_options(found.flags["schedule_type"]) == {"schedule_type": name}
    assert "schedule_type" not in dict(found.notes)


def test_ancestral_eta():
  """A1111's Eta of an ancestral sampler is its `eta` option (1, the default, sets nothing); an
  sdjax image says it twice (its Scheduler options and A1111's Eta): one option."""
  flags = _flags("a cat\nSteps: 20, Sampler: DPM2 a, CFG scale: 7, Seed: 1, Eta: 0.4")
  assert json.loads(flags["scheduler_options"]) == {"timestep_spacing": "linspace",
                                                    "k_diffusion": True, "eta": 0.4}
  flags = _flags("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Eta: 1.0")
  assert "eta" not in json.loads(flags["scheduler_options"])
  found = reproduce("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Eta: 0.0, "
                    "Scheduler options: eta=0.0, Version: sdjax 0.1.0")
  assert json.loads(found.flags["scheduler_options"]) == {"eta": 0.0} and not found.notes


def test_sigma_noise():
  """A1111's Sigma noise (its s_noise setting) is the `s_noise` option of the samplers that take
  it (Euler, Heun and DPM2 too, for their churn); an sdjax image says it twice: one option;
  other samplers, a note."""
  flags = _flags("a cat\nSteps: 20, Sampler: DPM++ 2M SDE, CFG scale: 7, Seed: 1, "
                 "Sigma noise: 0.9")
  assert json.loads(flags["scheduler_options"])["s_noise"] == 0.9
  found = reproduce("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Sigma noise: 0.5, "
                    "Scheduler options: s_noise=0.5, Version: sdjax 0.1.0")
  assert json.loads(found.flags["scheduler_options"]) == {"s_noise": 0.5} and not found.notes
  found = reproduce("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Sigma churn: 0.3, "
                    "Sigma noise: 0.9")
  assert json.loads(found.flags["scheduler_options"]) == {
      "k_diffusion": True, "timestep_spacing": "linspace", "s_churn": 0.3, "s_noise": 0.9}
  assert "Sigma" not in str(found.notes)
  assert "Sigma noise: 0.9: sdjax's" in str(reproduce(
      "a cat\nSteps: 20, Sampler: DPM++ 2M, Sigma noise: 0.9, Seed: 1").notes)
  for scheduler_field in ("DPM2 a", "DPM++ SDE"):
    flags = _flags(f"a cat\nSteps: 20, Sampler: {scheduler_field}, Seed: 1, Sigma noise: 1.0")
    assert "s_noise" not in flags.get("scheduler_options", "{}")


def test_conditional_mask_weight():
  """A1111 writes its Conditional mask weight for every image of an inpainting model: 1 (its
  default, what sdjax does) needs no flag and no note; another is --inpainting_mask_weight."""
  text = "a cat\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: 0.75, "
  found = reproduce(text + "Conditional mask weight: 1.0")
  assert "inpainting_mask_weight" not in found.flags and "mask weight" not in str(found.notes)
  assert _flags(text + "Conditional mask weight: 0.5")["inpainting_mask_weight"] == "0.5"


def test_sigma_churn():
  """A1111's Sigma churn, tmin and tmax (its Euler's, Heun's and DPM2's k-diffusion churn) are
  their options; for another sampler, which takes no churn, a note each."""
  flags = _flags("a cat\nSteps: 20, Sampler: Heun, Schedule type: Karras, CFG scale: 7, Seed: 1, "
                 "Sigma churn: 0.5, Sigma tmin: 0.2, Sigma tmax: 10, Sigma noise: 0.95")
  options = json.loads(flags["scheduler_options"])
  assert (options["s_churn"], options["s_tmin"], options["s_tmax"], options["s_noise"]) == (
      0.5, 0.2, 10.0, 0.95)
  notes = str(reproduce("a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Sigma churn: 0.5, "
                        "Sigma tmax: 10").notes)
  assert "Sigma churn: 0.5: sdjax's euler_ancestral takes no s_churn" in notes
  assert "Sigma tmax: 10: sdjax's euler_ancestral takes no s_tmax" in notes


def test_a1111_sampling_sdjax_does_not_do():
  """A1111's "Always discard next-to-last sigma" setting drops a level for any k-diffusion
  sampler (it writes the field only where the sampler would not): sdjax's discard_penultimate_sigma
  where the sampler takes it, else a note; Restart's restarts draw from torch's global
  generator."""
  for steps, said in ((19, {}), (20, {"scheduler"})):  # Restart's restarts from 20 steps
    notes = _notes(f"a cat\nSteps: {steps}, Sampler: Restart, CFG scale: 7, Seed: 1, RNG: CPU")
    assert set(notes) == set(said)
  found = reproduce("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, RNG: CPU, "
                    "Discard penultimate sigma: True")
  assert not found.notes  # sdjax's k-diffusion samplers take it
  assert json.loads(found.flags["scheduler_options"])["discard_penultimate_sigma"] is True
  for sampler in ("Restart", "UniPC"):  # not Restart's plan, nor A1111's own UniPC loop
    found = reproduce(f"a cat\nSteps: 10, Sampler: {sampler}, CFG scale: 7, Seed: 1, "
                      "Discard penultimate sigma: True")
    assert "discard_penultimate_sigma" not in found.flags["scheduler_options"]
    assert "keeps every noise level" in str(found.notes)



def test_brownian_noise():
  """A1111's SDE samplers (of either pass) draw from a Brownian tree grown on its GPU: --brownian
  nv, with a note; sdjax writes its own field (in A1111's RNG words), read back as it was, and
  an sdjax image without it drew its own noise."""
  for sampler, hires in (("DPM++ 2M SDE", ""), ("Euler a", ", Hires upscale: 2, Hires sampler: "
                                                          "DPM++ SDE")):
    found = reproduce(f"a cat\nSteps: 20, Sampler: {sampler}, Schedule type: Karras, CFG scale: "
                      f"7, Seed: 1, RNG: CPU{hires}")
    assert found.flags["brownian"] == "nv"
    assert [flag for flag, _ in found.notes] == ["brownian"]
    assert "NVIDIA" in found.notes[0][1]
  found = reproduce("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, RNG: CPU")
  assert "brownian" not in found.flags and not found.notes
  for value, want in (("CPU", "torch_cpu"), ("NV", "nv")):
    found = reproduce(f"a cat\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1, Brownian "
                      f"noise: {value}, Version: sdjax 0.1.0")
    assert found.flags["brownian"] == want and not found.notes
  found = reproduce("a cat\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1, Version: sdjax "
                    "0.1.0")
  assert "brownian" not in found.flags and not found.notes


def test_schedule_type_of_a_scheduler_without_them():
  notes = _notes("a cat\nSteps: 6, Sampler: DDPM, Schedule type: Karras, CFG scale: 1, Seed: 1")
  assert notes["schedule_type"] == "Schedule type: Karras: sdjax's ddpm places its own noise levels"


def test_a1111_lcm():
  """A1111's LCM sampler: lcm in its k_diffusion form (`test_k_diffusion.test_lcm_as_a1111`),
  Automatic its Uniform, other schedule types its own; sdjax's lcm image stays diffusers'."""
  flags = _flags("a cat\nSteps: 6, Sampler: LCM, Schedule type: Karras, CFG scale: 1, Seed: 1")
  assert json.loads(flags["scheduler_options"])["k_diffusion"]
  assert flags["schedule_type"] == "Karras"
  flags = _flags("a cat\nSteps: 6, Sampler: LCM, CFG scale: 1, Seed: 1, Version: v1.10.1")
  assert (flags["scheduler"], flags["schedule_type"]) == ("LCM", "Uniform")
  flags = _flags("a cat\nSteps: 6, Sampler: LCM, CFG scale: 1, Seed: 1, Version: sdjax 0.1.0")
  assert "scheduler_options" not in flags and "schedule_type" not in flags


def test_cpu_noise_and_variations():
  flags = _flags("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, RNG: CPU, "
                 "Variation seed: 9, Variation seed strength: 0.25, Seed resize from: 512x768, "
                 "Eta: 1.0")
  assert flags["rng"] == "torch_cpu" and flags["subseed"] == "9"
  assert flags["subseed_strength"] == "0.25"
  assert (flags["seed_resize_from_w"], flags["seed_resize_from_h"]) == ("512", "768")
  assert "eta" not in flags


def test_sdjax_image_round_trip():
  """What sdjax writes comes back as the flags that wrote it: its own noise, DDIM's eta."""
  text = outputs.a1111_parameters(
      prompt="a red circle, (big:1.1)", negative_prompt="blue", steps=12, sampler="ddim",
      cfg_scale=4.5, seed=3, width=96, height=64, model="org/model", model_hash="0123456789",
      eta=0.3, version="sdjax 0.1.0",
      extra={"Scheduler options": "timestep_spacing=trailing; rescale_betas_zero_snr=True; "
                                  "sigmas=[14.6, 1.5, 0.0]; schedule_type=karras",
             "Schedule type": "Karras", "Emphasis": "No norm", "Guidance rescale": 0.7,
             "Tiling axis": "x", "FreeU": "s1=0.9, s2=0.2, b1=1.5, b2=1.6",
             "PerturbedAttentionGuidance_enabled": True, "PerturbedAttentionGuidance_scale": 3.0,
             "PerturbedAttentionGuidance_layers": '["mid", "up_blocks.0"]'})
  found = reproduce(text)
  assert found.notes == ()
  assert found.flags == {
      "prompt": ["a red circle, (big:1.1)"], "negative_prompt": "blue", "model": "org/model",
      "scheduler": "DDIM", "sigmas": ["14.6", "1.5", "0.0"], "schedule_type": "karras",
      "scheduler_options": '{"timestep_spacing": "trailing", "rescale_betas_zero_snr": true}',
      "eta": "0.3", "rng": "jax", "width": "96", "height": "64", "tiling": "true",
      "tiling_axes": "x", "freeu": ["0.9", "0.2", "1.5", "1.6"],
      "pag_applied_layers": ["mid", "up_blocks.0"], "steps": "12", "guidance_scale": "4.5",
      "seed": "3", "emphasis": "No norm", "guidance_rescale": "0.7", "pag_scale": "3.0"}


def test_pixel_levels():
  """A1111's and ComfyUI's images are truncated to 8 bits (--pixel_levels floor); an sdjax
  image's levels are what it says (rounded, diffusers', where it says nothing)."""
  a1111 = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512"
  assert _flags(a1111)["pixel_levels"] == "floor"
  sdjax_image = a1111 + ", Version: sdjax 0.1.0"
  assert "pixel_levels" not in _flags(sdjax_image)
  assert _flags(sdjax_image.replace("Size", "Pixel levels: floor, Size"))["pixel_levels"] == (
      "floor")


def test_hires_fix():
  base = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, "
  flags = _flags(base + "Denoising strength: 0.55, Hires resize: 1024x768, Hires upscaler: "
                 "Latent (nearest-exact), Hires sampler: DPM++ 2M, Hires schedule type: Karras, "
                 'Hires CFG Scale: 5, Hires prompt: "a big cat, sharp", '
                 "Hires negative prompt: ugly")
  assert {k: v for k, v in flags.items() if k.startswith("hires")} == {
      "hires_resize_width": "1024", "hires_resize_height": "768", "hires_strength": "0.55",
      "hires_upscaler": "latent-nearest-exact", "hires_scheduler": "DPM++ 2M",
      "hires_schedule_type": "Karras", "hires_guidance_scale": "5",
      "hires_prompt": "a big cat, sharp", "hires_negative_prompt": "ugly"}
  # sdjax writes the size it rounded to beside the scale: the scale makes it again.
  flags = _flags(base + "Denoising strength: 0.7, Hires upscale: 1.3, Hires resize: 664x664, "
                 "Hires upscaler: Latent")
  assert flags["hires_scale"] == "1.3" and "hires_resize_width" not in flags
  text = (base + "Denoising strength: 0.7, Hires upscale: 2, Hires sampler: Restart, "
          "Hires checkpoint: other [abcdef1234]")
  assert set(_notes(text)) == {"rng", "hires_model"}  # Restart plans over the pass's levels
  assert _flags(text)["hires_scheduler"] == "Restart"
  text = (base.replace("Sampler: Euler", "Sampler: Restart")
          + "Denoising strength: 0.7, Hires upscale: 2")
  assert "hires_scheduler" not in _notes(text) and "hires_scheduler" not in _flags(text)
  flags = _flags(base + "Denoising strength: 0.7, Hires upscale: 2, Hires sampler: DPM fast")
  assert flags["hires_scheduler"] == "DPM fast"  # planned over the pass's own levels
  flags = _flags(base + "Denoising strength: 0.7, Hires upscale: 2, Hires checkpoint: "
                 "org/detailer [abcdef1234]")
  assert flags["hires_model"] == "org/detailer"  # a hub id, as sdjax writes it


def test_sdxl_fields():
  flags = _flags("a cat\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 1024x768, "
                 "Original size: 2048x1536, Crop: 16x32, Target size: 1024x768, "
                 "Refiner: stabilityai/stable-diffusion-xl-refiner-1.0 [7440042bbd], "
                 "Refiner switch at: 0.8, Aesthetic score: 6.0, Negative aesthetic score: 2.5, "
                 "Negative original size: 512x256, Negative crop: 0x8, Negative target size: "
                 "1024x1024")
  assert flags["original_size"] == ["1536", "2048"]  # HEIGHT,WIDTH
  assert (flags["negative_original_size"], flags["negative_crops_coords_top_left"],
          flags["negative_target_size"]) == (["256", "512"], ["8", "0"], ["1024", "1024"])
  assert flags["crops_coords_top_left"] == ["32", "16"]  # TOP,LEFT from LEFTxTOP
  assert flags["target_size"] == ["768", "1024"]
  assert flags["refiner"] == "stabilityai/stable-diffusion-xl-refiner-1.0"
  assert (flags["refiner_start"], flags["aesthetic_score"]) == ("0.8", "6.0")
  notes = _notes("a cat\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 1, "
                 "Refiner: sd_xl_refiner_1.0 [7440042bbd]")
  assert "--refiner" in notes["refiner"]
  # A1111 switches models inside its sampler loop (--refiner_switch a1111); sdjax's images as
  # their "Refiner switch" says (none: diffusers')
  assert flags["refiner_switch"] == "a1111"
  sdjax = ("a cat\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 5, Seed: 1, Refiner: org/r [1], "
           "Refiner switch at: 0.8, Version: sdjax 0.1.0")
  assert "refiner_switch" not in _flags(sdjax)
  assert _flags(sdjax + ", Refiner switch: A1111")["refiner_switch"] == "a1111"
  assert _flags(sdjax.replace("switch at: 0.8", "switch step: 20") + ", Refiner switch: A1111")[
      "refiner_switch"] == "a1111"
  # "Refiner switch by sampling steps": A1111's denoiser call i of Steps switches from the first
  # i / Steps >= the fraction on: a number of steps for one-call samplers, else a note
  for steps, at, want in ((30, "0.8", "24"), (25, "0.8", "20"), (7, "0.3", "3"),
                          (10, "0.95", None)):
    text = (f"a cat\nSteps: {steps}, Sampler: Euler, CFG scale: 5, Seed: 1, Refiner: org/r [1], "
            f"Refiner switch by sampling steps: True, Refiner switch at: {at}")
    assert _flags(text).get("refiner_start") == want
    assert ("so no refiner step" in _notes(text).get("refiner_start", "")) == (want is None)
  notes = _notes("a cat\nSteps: 30, Sampler: Heun, CFG scale: 5, Seed: 1, Refiner: org/r [1], "
                 "Refiner switch by sampling steps: True, Refiner switch at: 0.8")
  assert "switches at 0.8 of its heun calls; sdjax at that timestep" in notes["refiner_start"]
  # With the hires fix, A1111's "Hires refiner" (written where not "second pass"); a switch by
  # sampling steps is a number of the first pass's steps only where the refiner finishes it
  hires = ("a cat\nSteps: 30, Sampler: Euler, CFG scale: 5, Seed: 1, Refiner: org/r [1], "
           "Refiner switch by sampling steps: True, Refiner switch at: 0.8, Hires upscale: 2, "
           "Denoising strength: 0.5")
  assert "hires_refiner" not in _flags(hires) and _flags(hires)["refiner_start"] == "0.8"
  assert "0.8 of the hires pass's calls; sdjax at that timestep" in _notes(hires)["refiner_start"]
  for which, at in (("first pass", "24"), ("both passes", "0.8")):
    assert _flags(f"{hires}, Hires refiner: {which}")["hires_refiner"] == which
    assert _flags(f"{hires}, Hires refiner: {which}")["refiner_start"] == at


def test_builtin_model_needs_no_flag():
  flags = _flags("a red circle\nSteps: 8, Sampler: Euler, CFG scale: 4, Seed: 1, "
                 "Model: sdjax-shapes, Version: sdjax 0.1.0")
  assert "model" not in flags and flags["rng"] == "jax"


def test_controlnet_units():
  """A1111's ControlNet units (its extension's `ControlNet N`: Weight, Guidance Start / End,
  Control Mode; sdjax's Union Control Type) are as many ControlNets' flags, in order; a note
  names the models and the preprocessors (and, for an A1111 Guidance End below 1, the step the
  rules differ by). IP-Adapter units (an ip-adapter module) are --ip_adapter_scale, sdjax's
  per-layer scales where it wrote them, with a note of their own."""
  text = ('a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, '
          'ControlNet 1: "Module: none, Model: depth [12345678], Weight: 0.5, Guidance End: '
          '0.8", ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], '
          'Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, Guidance Start: 0.1, '
          'Guidance End: 1, Pixel Perfect: False, Control Mode: My prompt is more important", '
          'ControlNet 2: "Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 0.6, '
          'Guidance End: 0.5"')
  found = reproduce(text)
  assert found.flags["controlnet_scale"] == ["0.8", "0.5"]
  assert found.flags["control_guidance_start"] == ["0.1", "0.0"]
  assert found.flags["control_guidance_end"] == ["1.0", "0.8"]
  assert found.flags["control_mode"] == ["My prompt is more important", "Balanced"]
  assert "control_type" not in found.flags
  notes = dict(found.notes)
  assert notes["controlnet"].startswith(
      "made with the ControlNet(s) control_v11p_sd15_canny [d14c016b], depth [12345678]: give "
      "each with --controlnet, in this order")
  assert "preprocessor(s) canny: give the preprocessed images" in notes["controlnet"]
  assert "one step less here" in notes["controlnet"]
  assert found.flags["ip_adapter_scale"] == ["0.6"] and None not in notes
  assert notes["ip_adapter"] == (
      "made with the IP-Adapter(s) ip-adapter_sd15 (ip-adapter_clip_h): give each with "
      "--ip_adapter, in this order (its image encoder with --ip_adapter_encoder where it has "
      "none beside it), and its image with --ip_adapter_image (or a jsonl line's "
      "ip_adapter_image); A1111 applied ip-adapter_sd15 only within its Guidance Start / End, "
      "sdjax applies an IP-Adapter at every step")
  sdjax_made = reproduce("a cat\nSteps: 20, Sampler: Euler, Seed: 1, ControlNet 0: \"Model: u, "
                         "Weight: 1, Guidance Start: 0, Guidance End: 0.5, Union Control Type: "
                         "canny\", Version: sdjax 0.1.0")
  assert sdjax_made.flags["control_type"] == ["canny"]
  assert "one step" not in dict(sdjax_made.notes)["controlnet"]
  layers = '{"up":{"block_0":[0,1,0]}}'
  sdjax_made = reproduce('a cat\nSteps: 20, Sampler: Euler, Seed: 1, ControlNet 0: "Module: '
                         'ip-adapter_clip, Model: ip-plus, Weight: 1, Guidance Start: 0, '
                         'Guidance End: 1", ControlNet 1: "Module: ip-adapter_clip_h, Model: '
                         f'two, Weight: 0.5", IP-Adapter 0 layer scales: {json.dumps(layers)}, '
                         'Version: sdjax 0.1.0')  # (quoted as A1111 quotes a value with commas)
  assert sdjax_made.flags["ip_adapter_scale"] == [layers, "0.5"]
  assert "Guidance" not in dict(sdjax_made.notes)["ip_adapter"]


@pytest.mark.parametrize("field,error", [
    ("", "no A1111 parameters line (Steps: ..., Sampler: ..., Seed: ...) after the prompt"),
    ("Size: 512", "Size: '512' is not WIDTHxHEIGHT"),
    ('FreeU: "s1=0.9, s2=0.2"', "FreeU: 's1=0.9, s2=0.2' is not s1=..., s2=..., b1=..., b2=..."),
    ('FreeU: "s1=0.9, s2=0.2, b1=1.5, b2=1.6", FreeU form: V3',
     "FreeU form: 'V3' is not one of ComfyUI FreeU, ComfyUI FreeU_V2"),
    ("Eta: lots", "Eta: 'lots' is not a number"),
    ("Guidance rescale form: other", "Guidance rescale form: 'other' is not ComfyUI RescaleCFG"),
    ('ControlNet 0: "Module: none, Weight: 1"', "ControlNet 0: 'Module: none, Weight: 1' names "
                                                "no Model"),
    ('ControlNet 0: "Model: x, Weight: lots"', "Weight: 'lots' is not a number"),
    ("Scheduler options: karras", "Scheduler options: 'karras' is not key=value"),
    ("PerturbedAttentionGuidance_layers: mid", "PerturbedAttentionGuidance_layers: 'mid' is not "
                                               "a list of names"),
])
def test_malformed_fields(field, error):
  with pytest.raises(ValueError, match=f"^{re.escape(error)}$"):
    reproduce(f"a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, {field}" if field else
              "a cat\nNegative prompt: a dog, Steps: 20")
