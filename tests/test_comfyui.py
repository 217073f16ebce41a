"""ComfyUI images' workflows back to main.py flags: the API graph SaveImage stores in its PNGs
(the default text-to-image workflow, and with a LoRA, Clip skip, a VAE, KSamplerAdvanced, a
hires pass), read from a PNG by --parameters_file and by a jsonl line's "parameters"."""

import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdjax import comfyui, infotext, outputs, plan, prompts
from sdjax.schedulers.dpm_adaptive import SETTINGS


def default_graph(**sampler):
  """ComfyUI's default workflow as its API graph (node ids as its frontend numbers them)."""
  return {
      "3": {"class_type": "KSampler", "inputs": {
          "seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
          "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
          "negative": ["7", 0], "latent_image": ["5", 0], **sampler}},
      "4": {"class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
      "5": {"class_type": "EmptyLatentImage",
            "inputs": {"width": 512, "height": 768, "batch_size": 1}},
      "6": {"class_type": "CLIPTextEncode", "inputs": {
          "text": "beautiful scenery nature glass bottle landscape, (purple galaxy:1.2) bottle,",
          "clip": ["4", 1]}},
      "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark",
                                                       "clip": ["4", 1]}},
      "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
      "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI",
                                                  "images": ["8", 0]}},
  }


def comfy_png(graph) -> bytes:
  """A PNG as ComfyUI's SaveImage writes it: "prompt" (the API graph), then "workflow"."""
  info = PngImagePlugin.PngInfo()
  info.add_text("prompt", json.dumps(graph))
  info.add_text("workflow", json.dumps({"nodes": [], "links": [], "version": 0.4}))
  out = io.BytesIO()
  Image.new("RGB", (8, 8)).save(out, format="PNG", pnginfo=info)
  return out.getvalue()


def _notes(found):
  return " | ".join(text for _, text in found.notes)


def test_default_workflow():
  text = infotext.parameters_text(comfy_png(default_graph()))
  found = infotext.reproduce(text)
  assert found.flags == {
      "prompt": ["beautiful scenery nature glass bottle landscape, (purple galaxy:1.2) bottle,"],
      "negative_prompt": "text, watermark", "scheduler": "Euler",
      # k-diffusion's Euler as ComfyUI's KSampler runs it: its noise scale, whole timesteps
      "scheduler_options": '{"timestep_spacing": "linspace", "k_diffusion": true, '
                           '"comfyui": true}',
      "schedule_type": "Normal", "rng": "torch_cpu", "width": "512", "height": "768",
      "steps": "20", "guidance_scale": "8.0", "seed": str(156680208700286 % 2**32),
      "seed_high": str(156680208700286 >> 32), "emphasis": "ComfyUI",
      "pixel_levels": "floor"}  # SaveImage truncates to 8 bits
  notes = _notes(found)
  assert "checkpoint v1-5-pruned-emaonly.safetensors: give it with --model" in notes
  assert "sqrt(1 + sigma_max^2)" not in notes and "GPU" not in notes
  assert "seed 156680208700286: torch's CPU generator keeps its low 32 bits" in notes


def test_a_64_bit_seed_draws_its_low_32_bits_noise():
  """ComfyUI's seeds go past 2**32 (sdjax's stop there); its noise, torch's CPU generator's,
  depends on the low 32 bits only, as the flags assume."""
  import torch  # noqa: PLC0415

  seed = 156680208700286
  draws = [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s))
           for s in (seed, seed % 2**32, seed % 2**32 + 1)]
  assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@pytest.mark.parametrize(("sampler", "scheduler", "want", "label"), [
    ("dpmpp_2m", "karras", "DPM++ 2M", "Karras"),  # flags as A1111 names them
    ("dpm_2_ancestral", "exponential", "DPM2 a", "Exponential"),
    ("ddim", "sgm_uniform", "Euler", "SGM Uniform"),  # ComfyUI's ddim is Euler
    ("dpmpp_2m_sde_gpu", "simple", "DPM++ 2M SDE", "Simple"),
    ("dpmpp_sde", "karras", "DPM++ SDE", "Karras"),
    ("uni_pc", "karras", "UniPC", "Karras"),  # its uni_pc code, as the comfyui form runs
    ("uni_pc_bh2", "normal", "UniPC", "Normal"),
    ("ipndm", "beta", "iPNDM", "Beta"),  # its own samplers, in their comfyui form
    ("res_multistep", "kl_optimal", "Res Multistep", "KL Optimal"),
    ("dpmpp_2m_cfg_pp", "karras", "DPM++ 2M CFG++", "Karras"),
    ("deis", "exponential", "DEIS", "Exponential"),  # tAB-DEIS, not diffusers' (log-rho) deis
    ("seeds_3", "sgm_uniform", "SEEDS 3", "SGM Uniform"),  # three calls a step, noise each
    ("heunpp2", "simple", "HeunPP2", "Simple"),  # 3, 2, then 1 calls a step
    ("dpmpp_2s_ancestral_cfg_pp", "karras", "DPM++ 2S a CFG++", "Karras"),
    ("dpm_fast", "normal", "dpm_fast", "Normal"),  # no A1111 name: sdjax's own
    ("ddpm", "karras", "k_ddpm", "Karras"),  # k-diffusion's, over its levels (not diffusers')
    ("sa_solver", "beta", "sa_solver", "Beta"),  # noise only where tau > 0: its draws counted
    ("sa_solver_pece", "karras", "sa_solver_pece", "Karras"),  # two calls a step
    ("dpm_adaptive", "exponential", "dpm_adaptive", "Exponential"),  # its own steps
])
def test_samplers_and_schedulers(sampler, scheduler, want, label):
  found = comfyui.reproduce(default_graph(sampler_name=sampler, scheduler=scheduler))
  assert found.flags["scheduler"] == want
  assert found.flags.get("schedule_type") == label
  notes = _notes(found)
  device_noise = sampler in ("dpm_2_ancestral", "seeds_3", "dpmpp_2s_ancestral_cfg_pp", "ddpm",
                             "sa_solver", "sa_solver_pece")
  assert ("fresh noise from a generator on its GPU" in notes) == device_noise
  # the SDE samplers' Brownian tree: on the CPU, or on the GPU (CUDA's generator) for _gpu
  assert found.flags.get("brownian") == {"dpmpp_2m_sde_gpu": "nv", "dpmpp_sde": "torch_cpu"}.get(
      sampler)
  # the 64-bit seed's high word, for the tree's SeedSequence and CUDA's generator
  assert int(found.flags["seed_high"]) == 156680208700286 >> 32
  assert found.flags.get("step_rng") == ("nv" if device_noise else None)
  assert ("Brownian tree on its GPU" in notes) == sampler.endswith("sde_gpu")
  # Where sdjax's scheduler steps as ComfyUI's KSampler (its noise scale, whole timesteps) the
  # option says so; elsewhere a note.
  stepped = '"comfyui": true' in found.flags.get("scheduler_options", "")
  assert stepped == (want in ("DPM++ 2M", "Euler", "DPM++ 2M SDE", "DPM++ SDE", "UniPC", "iPNDM",
                              "Res Multistep", "DPM++ 2M CFG++", "DEIS", "SEEDS 3", "DPM2 a",
                              "HeunPP2", "DPM++ 2S a CFG++", "dpm_fast", "k_ddpm",
                              "sa_solver", "sa_solver_pece", "dpm_adaptive"))
  # its KSampler's levels of one step more less the next-to-last, for these samplers only
  discards = '"discard_penultimate_sigma": true' in found.flags.get("scheduler_options", "")
  assert discards == (sampler in ("dpm_2_ancestral", "uni_pc", "uni_pc_bh2"))
  assert ("sqrt(1 + sigma_max^2)" in notes) == (not stepped)
  if want == "DEIS":  # Forge's name of tAB-DEIS
    assert outputs.scheduler_name(want) == "deis_tab"
  if want == "UniPC":  # its variant and order 3; not A1111's UniPC
    options = json.loads(found.flags["scheduler_options"])
    assert options["solver_type"] == sampler.removeprefix("uni_pc").lstrip("_") or "bh1"
    assert options["solver_order"] == 3 and "a1111" not in options


def test_unknown_sampler_and_scheduler_are_notes():
  found = comfyui.reproduce(default_graph(sampler_name="res_2s", scheduler="ddim_uniform"))
  assert "scheduler" not in found.flags and "schedule_type" not in found.flags
  notes = _notes(found)
  assert "sampler res_2s is not one sdjax has" in notes
  assert "scheduler ddim_uniform" in notes


@pytest.mark.parametrize(("sampling", "zsnr"), [("v_prediction", True), ("v_prediction", False),
                                               ("eps", True), ("lcm", False)])
def test_model_sampling_discrete(sampling, zsnr):
  """ModelSamplingDiscrete between the checkpoint and the sampler: zsnr is ComfyUI's
  zero-terminal-SNR rescale (the sampler's rescale_betas_zero_snr, in the comfyui form);
  v_prediction, which sdjax reads off the model, a note saying how to give it; the checkpoint
  is still found behind it."""
  graph = default_graph(model=["10", 0])
  graph["10"] = {"class_type": "ModelSamplingDiscrete",
                 "inputs": {"model": ["4", 0], "sampling": sampling, "zsnr": zsnr}}
  found = comfyui.reproduce(graph)
  options = json.loads(found.flags["scheduler_options"])
  assert options.get("rescale_betas_zero_snr", False) is zsnr and options["comfyui"] is True
  notes = dict(found.notes)
  assert "v1-5-pruned-emaonly.safetensors" in notes["model"]
  assert ('"prediction_type": "v_prediction"' in notes.get("scheduler_options", "")) == (
      sampling == "v_prediction")
  assert ("samples the model as lcm" in _notes(found)) == (sampling == "lcm")
  assert "changes the model" not in _notes(found)


def test_freeu_nodes():
  """A FreeU or FreeU_V2 node on the model's way is --freeu with --freeu_form comfyui /
  comfyui_v2 (its factors, ComfyUI's defaults where absent); a second one, which ComfyUI
  applies too, a note."""
  graph = default_graph()
  graph["3"]["inputs"]["model"] = ["10", 0]
  graph["10"] = {"class_type": "FreeU_V2", "inputs": {
      "model": ["4", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}}
  found = comfyui.reproduce(graph)
  assert found.flags["freeu"] == ["0.9", "0.2", "1.3", "1.4"]
  assert found.flags["freeu_form"] == "comfyui_v2" and "FreeU" not in _notes(found)
  graph["10"] = {"class_type": "FreeU", "inputs": {"model": ["4", 0], "b2": 1.5}}
  found = comfyui.reproduce(graph)
  assert found.flags["freeu"] == ["0.9", "0.2", "1.1", "1.5"]
  assert found.flags["freeu_form"] == "comfyui"
  graph["11"] = {"class_type": "FreeU_V2", "inputs": {"model": ["10", 0]}}
  graph["3"]["inputs"]["model"] = ["11", 0]
  found = comfyui.reproduce(graph)
  assert found.flags["freeu_form"] == "comfyui_v2"  # the one nearest the sampler
  assert "node 10 (FreeU) applies FreeU a second time: not reproduced" in _notes(found)


def test_controlnet_nodes():
  """ControlNetApplyAdvanced on both conditionings' way (or a ControlNetApply on the
  positive's, which ComfyUI applies to the negative too) is a ControlNet: its strength, start and
  end percent as --controlnet_scale and --control_guidance_start / _end, in chain order from
  the text; notes name the models, the images (a preprocessor node's as its module) and that
  ComfyUI bounds it in noise levels. One on the positive's way only, or of strength 0, is not."""
  graph = default_graph()
  graph["10"] = {"class_type": "ControlNetLoader",
                 "inputs": {"control_net_name": "control_v11p_sd15_canny.pth"}}
  graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
  graph["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
      "positive": ["6", 0], "negative": ["7", 0], "control_net": ["10", 0], "image": ["11", 0],
      "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}}
  graph["13"] = {"class_type": "ControlNetLoader",
                 "inputs": {"control_net_name": "depth.safetensors"}}
  graph["14"] = {"class_type": "Canny", "inputs": {"image": ["11", 0]}}
  graph["15"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
      "positive": ["12", 0], "negative": ["12", 1], "control_net": ["13", 0], "image": ["14", 0],
      "strength": 0.5, "start_percent": 0.1, "end_percent": 0.9}}
  graph["3"]["inputs"].update(positive=["15", 0], negative=["15", 1])
  found = comfyui.reproduce(graph)
  assert found.flags["controlnet_scale"] == ["0.8", "0.5"]
  assert found.flags["control_guidance_start"] == ["0.0", "0.1"]
  assert found.flags["control_guidance_end"] == ["1.0", "0.9"]
  notes = dict(found.notes)
  assert notes["controlnet"].startswith("made with the ControlNet(s) control_v11p_sd15_canny.pth,"
                                        " depth.safetensors: give each with --controlnet")
  assert "ComfyUI made those images with its preprocessor(s) Canny" in notes["controlnet"]
  assert notes["control_image"].startswith("the ControlNets' images: edges.png, node 14 (Canny)'s"
                                           " image: give them with --control_image")
  assert "ComfyUI bounds a ControlNet by noise levels" in notes["control_guidance_end"]
  assert "changes the" not in _notes(found)
  graph["15"]["inputs"]["strength"] = 0  # does nothing
  graph["3"]["inputs"]["negative"] = ["7", 0]  # the first on the positive's way only
  found = comfyui.reproduce(graph)
  assert "controlnet_scale" not in found.flags
  assert "node 12 (ControlNetApplyAdvanced) controls only the positive conditioning: not " \
         "reproduced" in _notes(found)
  graph["12"] = {"class_type": "ControlNetApply", "inputs": {  # its old node: both halves
      "conditioning": ["6", 0], "control_net": ["10", 0], "image": ["11", 0], "strength": 1.0}}
  found = comfyui.reproduce(graph)
  assert found.flags["controlnet_scale"] == ["1.0"] and "control_guidance_end" not in dict(
      found.notes)


def test_broken_graphs_are_one_line_errors():
  """A graph no ComfyUI could run is a ValueError, never a hang or another exception: links in a
  circle on the model's or the CLIP's way, an input of the wrong kind."""
  graph = default_graph()
  graph["3"]["inputs"]["model"] = ["10", 0]
  graph["10"] = {"class_type": "FreeU", "inputs": {"model": ["11", 0]}}
  graph["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["10", 0],
                                                                  "lora_name": "a.safetensors"}}
  with pytest.raises(ValueError, match="^ComfyUI workflow: the model's links run in a circle "
                                       "through node 10$"):
    comfyui.reproduce(graph)
  graph = default_graph()
  graph["6"]["inputs"]["clip"] = ["12", 0]
  graph["12"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["12", 0]}}  # (no layer)
  assert "clip_skip" not in comfyui.reproduce(graph).flags
  graph = default_graph(sampler_name=["euler"])
  with pytest.raises(ValueError, match="^ComfyUI workflow: a node's inputs are not what its kind "
                                       "takes \\(TypeError: "):
    comfyui.reproduce(graph)


def test_rescale_cfg_node():
  """A RescaleCFG node is --guidance_rescale (its multiplier, 0.7 by default) in ComfyUI's form
  (--guidance_rescale_form comfyui); over a sampler sdjax cannot give each call's noise level
  (its uni_pc: sdjax's UniPC), diffusers' rescale and a note."""
  graph = default_graph()
  graph["3"]["inputs"]["model"] = ["10", 0]
  graph["10"] = {"class_type": "RescaleCFG", "inputs": {"model": ["4", 0]}}
  found = comfyui.reproduce(graph)
  assert (found.flags["guidance_rescale"], found.flags["guidance_rescale_form"]) == (
      "0.7", "comfyui")
  graph["3"]["inputs"]["sampler_name"] = "uni_pc"
  found = comfyui.reproduce(graph)
  assert "guidance_rescale_form" not in found.flags and found.flags["guidance_rescale"] == "0.7"
  assert "ComfyUI's RescaleCFG: sdjax's unipc does not give it" in _notes(found)


def test_pag_node():
  """A PerturbedAttentionGuidance node is --pag_scale (its scale, 3 by default; 0: none) over
  sdjax's default layers, the mid block's self-attention, where the node perturbs it; its
  post-CFG term in x0, (cond - perturbed) * scale, is diffusers' in eps."""
  graph = default_graph()
  graph["3"]["inputs"]["model"] = ["10", 0]
  graph["10"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["4", 0],
                                                                        "scale": 2.5}}
  found = comfyui.reproduce(graph)
  assert found.flags["pag_scale"] == "2.5" and "pag_applied_layers" not in found.flags
  assert "PerturbedAttentionGuidance" not in _notes(found)
  del graph["10"]["inputs"]["scale"]
  assert comfyui.reproduce(graph).flags["pag_scale"] == "3"
  graph["10"]["inputs"]["scale"] = 0
  assert "pag_scale" not in comfyui.reproduce(graph).flags


def test_embeddings_are_a1111s_trigger_words():
  """ComfyUI's `embedding:NAME` (its file, with or without the extension; where a word starts:
  the text's start, after a space, a newline or a weighting parenthesis; a comma after it not
  part of the name) is A1111's NAME, the trigger word --embeddings_dir gives the file's stem:
  the embedding's vectors in its place, as ComfyUI's tokenizer puts them; one note asks for the
  folder. Elsewhere "embedding:" stays text."""
  graph = default_graph()
  graph["6"]["inputs"]["text"] = "a photo of embedding:my-style.safetensors, myembedding:x"
  graph["7"]["inputs"]["text"] = ("embedding:EasyNegative, (embedding:bad_hands.pt:1.2) worst,"
                                  "\nembedding:EasyNegative")
  found = comfyui.reproduce(graph)
  assert found.flags["prompt"] == ["a photo of my-style, myembedding:x"]
  assert found.flags["negative_prompt"] == "EasyNegative, (bad_hands:1.2) worst,\nEasyNegative"
  notes = [(flag, text) for flag, text in found.notes if "embedding" in text]
  assert [flag for flag, _ in notes] == ["embeddings_dir", "embeddings_dir"]
  assert "(EasyNegative, bad_hands; ComfyUI's embedding:NAME, here A1111's NAME)" in notes[1][1]
  graph["7"]["inputs"]["text"] = "an embedding: text"
  assert comfyui.reproduce(graph).flags["negative_prompt"] == "an embedding: text"


def test_loras_clip_skip_vae_and_a_second_pass():
  graph = default_graph()
  graph["10"] = {"class_type": "LoraLoader", "inputs": {
      "lora_name": "sub/style.safetensors", "strength_model": 0.8, "strength_clip": 0.5,
      "model": ["4", 0], "clip": ["4", 1]}}
  graph["19"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
      "lora_name": "only.pt", "strength_model": 1.2, "model": ["10", 0]}}
  graph["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2,
                                                              "clip": ["10", 1]}}
  graph["12"] = {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse.safetensors"}}
  graph["13"] = {"class_type": "PatchModelAddDownscale", "inputs": {"model": ["19", 0],
                                                                    "block_number": 3}}
  graph["3"]["inputs"]["model"] = ["13", 0]
  for node in ("6", "7"):
    graph[node]["inputs"]["clip"] = ["11", 0]
  graph["8"]["inputs"]["vae"] = ["12", 0]
  # A hires pass: upscale the latent, sample again, decode that.
  graph["14"] = {"class_type": "LatentUpscaleBy", "inputs": {
      "samples": ["3", 0], "scale_by": 1.5, "upscale_method": "nearest-exact"}}
  graph["15"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"], "denoise": 0.5,
                                                      "latent_image": ["14", 0]}}
  graph["5"]["inputs"]["batch_size"] = 4
  graph["7"]["inputs"]["text"] = "[text], watermark"
  found = comfyui.reproduce(graph)
  assert found.flags["clip_skip"] == "2" and found.flags["seed"] == "4096709502"
  assert not [k for k in found.flags if k.startswith("hires")]  # the first pass is decoded
  notes = _notes(found)
  # As an A1111 prompt carries LoRAs: <lora:name:text encoder:UNet>, applied from --lora_dir.
  assert found.flags["prompt"][0].endswith("bottle, <lora:sub/style:0.5:0.8> <lora:only:0:1.2>")
  _, tags = prompts.lora_tags(found.flags["prompt"][0])
  assert [(t.name, t.te_scale, t.unet_scale) for t in tags] == [("sub/style", 0.5, 0.8),
                                                                  ("only", 0.0, 1.2)]
  assert "added to the prompt as A1111 tags: give --lora_dir" in notes
  assert "node 13 (PatchModelAddDownscale) changes the model: not reproduced" in notes
  assert "made with the VAE vae-ft-mse.safetensors: give it with --vae" in notes
  assert "1 more sampler pass(es) (nodes 15" in notes
  assert "made in a batch of 4 drawn from its seed at once" in notes
  assert (found.flags["noise_batch"], found.flags["num_images_per_prompt"]) == ("4", "4")
  assert "[...] is plain text to ComfyUI" in notes


def test_lcm():
  """ComfyUI's lcm sampler over a ModelSamplingDiscrete "lcm" model: lcm's comfyui form
  (`test_k_diffusion.test_lcm_as_comfyui`), its scheduler a schedule type; over the plain model
  (its levels, its plain x0) sdjax's lcm with a note, not that form."""
  graph = default_graph(sampler_name="lcm", scheduler="sgm_uniform", model=["10", 0])
  graph["10"] = {"class_type": "ModelSamplingDiscrete",
                 "inputs": {"model": ["4", 0], "sampling": "lcm", "zsnr": False}}
  found = comfyui.reproduce(graph)
  options = json.loads(found.flags["scheduler_options"])
  assert options["k_diffusion"] and options["comfyui"] and found.flags["scheduler"] == "LCM"
  assert found.flags["schedule_type"] == "SGM Uniform"
  assert "samples the model as lcm" not in _notes(found)
  found = comfyui.reproduce(default_graph(sampler_name="lcm"))
  assert found.flags["scheduler"] == "LCM" and "scheduler_options" not in found.flags
  assert "schedule_type" not in found.flags
  notes = _notes(found)
  assert "sampler lcm: ComfyUI starts from its noise times" in notes
  assert "scheduler normal (with sampler lcm on a model without" in notes


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_sde"])
def test_batch_size(sampler):
  """An empty latent's batch_size B: ComfyUI's noise for the batch drawn at once, B images
  (--noise_batch B); the GPU's step noise of ancestral samplers and the SDE samplers' one tree
  for the batch are said."""
  graph = default_graph(sampler_name=sampler)
  graph["5"]["inputs"]["batch_size"] = 3
  found = comfyui.reproduce(graph)
  notes = _notes(found)
  if sampler == "dpmpp_sde":
    assert "noise_batch" not in found.flags and "one Brownian tree for the whole batch" in notes
  else:
    assert (found.flags["noise_batch"], found.flags["num_images_per_prompt"]) == ("3", "3")
    assert found.flags["rng"] == "torch_cpu"
  assert ("the steps' noise differs" in notes) == (sampler == "euler_ancestral")
  graph["5"]["inputs"]["batch_size"] = 1
  assert "noise_batch" not in comfyui.reproduce(graph).flags


def _hires_graph(upscale, **second):
  """The default workflow with ComfyUI's hires fix: `upscale` (a latent upscale node's class and
  inputs) on the first sampler's latents, a second KSampler (`second` over the first's inputs,
  denoise 0.5) on them, and the decode of that."""
  graph = default_graph()
  graph["10"] = {"class_type": upscale[0], "inputs": {"samples": ["3", 0], **upscale[1]}}
  graph["11"] = {"class_type": "KSampler", "inputs": {
      **graph["3"]["inputs"], "denoise": 0.5, "latent_image": ["10", 0], **second}}
  graph["8"]["inputs"]["samples"] = ["11", 0]
  return graph


@pytest.mark.parametrize(("upscale", "want"), [
    (("LatentUpscaleBy", {"upscale_method": "bilinear", "scale_by": 2.0}),
     {"hires_scale": "2.0", "hires_upscaler": "latent"}),
    # ComfyUI rounds the latents' size (64 x 1.33 = 85.1 -> 85, 96 x 1.33 = 127.7 -> 128), A1111
    # floors the pixels' (680, 1021 -> 1016): the size as a resize.
    (("LatentUpscaleBy", {"upscale_method": "bicubic", "scale_by": 1.33}),
     {"hires_resize_width": "680", "hires_resize_height": "1024",
      "hires_upscaler": "latent-bicubic"}),
    (("LatentUpscale", {"upscale_method": "nearest-exact", "width": 768, "height": 0,
                        "crop": "disabled"}),  # the height from the aspect: 1152
     {"hires_resize_width": "768", "hires_resize_height": "1152",
      "hires_upscaler": "latent-nearest-exact"}),
])
def test_hires_fix(upscale, want):
  """ComfyUI's hires fix as A1111's: size, upscale method, the second pass's steps and denoise
  (the first pass's prompts, sampler and CFG carry over: no fields for them)."""
  found = comfyui.reproduce(_hires_graph(upscale, steps=12))
  assert {k: v for k, v in found.flags.items() if k.startswith("hires")} == {
      **want, "hires_steps": "12", "hires_strength": "0.5"}
  assert (found.flags["width"], found.flags["height"], found.flags["steps"]) == (
      "512", "768", "20")
  notes = _notes(found)
  assert "sampler pass" not in notes and "hires pass" not in notes, notes


def test_hires_fix_with_its_own_settings():
  """A second pass with its own sampler, scheduler, CFG, prompts and seed: A1111's Hires
  sampler / schedule type / CFG Scale / prompts; its seed a note (sdjax's hires noise comes from
  the image's seed); an upscale method A1111 has not, or another aspect: notes."""
  graph = _hires_graph(("LatentUpscale", {"upscale_method": "area", "width": 1024,
                                          "height": 1024, "crop": "disabled"}),
                       sampler_name="dpmpp_2m", scheduler="karras", cfg=5.5, seed=7,
                       positive=["12", 0])
  graph["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "sharp details",
                                                            "clip": ["4", 1]}}
  graph["13"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
      "lora_name": "style.safetensors", "strength_model": 0.7, "model": ["4", 0]}}
  graph["3"]["inputs"]["model"] = graph["11"]["inputs"]["model"] = ["13", 0]
  found = comfyui.reproduce(graph)
  hires = {k: v for k, v in found.flags.items() if k.startswith("hires")}
  assert hires == {"hires_resize_width": "1024", "hires_resize_height": "1024",
                   "hires_steps": "20", "hires_strength": "0.5", "hires_scheduler": "DPM++ 2M",
                   "hires_schedule_type": "Karras", "hires_guidance_scale": "5.5",
                   "hires_prompt": "sharp details <lora:style:0:0.7>"}  # A1111 reads both
  notes = _notes(found)
  assert "ComfyUI's area latent upscale is not one sdjax has" in notes
  assert "enlarges to 1024x1024 (crop disabled) at another aspect" in notes
  assert "has its own seed 7" in notes
  assert "drops the next-to-last level" not in notes  # neither pass drops it
  graph["11"]["inputs"]["sampler_name"] = "uni_pc"  # its KSampler drops it for the hires pass
  assert "drops the next-to-last level" in _notes(comfyui.reproduce(graph))


def test_advanced_sampler_and_img2img():
  graph = default_graph()
  graph["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
      "add_noise": "enable", "noise_seed": 7, "steps": 30, "cfg": 6.5,
      "sampler_name": "euler_ancestral", "scheduler": "karras", "start_at_step": 0,
      "end_at_step": 24, "return_with_leftover_noise": "enable", "model": ["4", 0],
      "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}
  graph["17"] = {"class_type": "Seed (rgthree)", "inputs": {"seed": 7}}  # a seed node
  graph["18"] = {"class_type": "CFGNode", "inputs": {"low": 1.0, "high": 9.0}}
  graph["3"]["inputs"].update(noise_seed=["17", 0], cfg=["18", 0])
  found = comfyui.reproduce(graph)
  assert (found.flags["seed"], found.flags["steps"]) == ("7", "30")
  assert "guidance_scale" not in found.flags
  assert "the sampler's cfg comes from node 18 (CFGNode): give --guidance_scale" in _notes(found)
  assert "runs steps 0 to 24 only" in _notes(found)
  graph = default_graph(denoise=0.6)
  graph["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["16", 0], "vae": ["4", 2]}}
  graph["16"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
  found = comfyui.reproduce(graph)  # img2img: its image encoded to the posterior's mode
  assert "width" not in found.flags
  assert (float(found.flags["strength"]), found.flags["image_encode"]) == (0.6, "mode")
  assert ("the latent is node 5 (VAEEncode)'s image (LoadImage photo.png): give it with "
          "--init_image") in _notes(found)
  assert "and its size (--width, --height: ComfyUI samples at the image's)" in _notes(found)
  graph["5"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["15", 0]}}
  graph["15"] = {"class_type": "SomeLatentNode", "inputs": {}}
  found = comfyui.reproduce(graph)
  assert "strength" not in found.flags and "image_encode" not in found.flags
  assert "the latent comes from node 15 (SomeLatentNode)" in _notes(found)
  assert "with strength 0.6" in _notes(found)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_advanced_sampler_img2img_from_a_step(sampler):
  """A KSamplerAdvanced over an image's latent from step k of n to the end, noise added, is a
  KSampler's img2img of n - k steps at a denoise that places n (ComfyUI's KSampler: the last
  steps of int(steps / denoise)): the same levels. Stopping early, or without noise: notes."""
  from sdjax import schedulers  # noqa: PLC0415

  graph = default_graph()
  graph["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
      "add_noise": "enable", "noise_seed": 7, "steps": 20, "cfg": 6.5, "sampler_name": sampler,
      "scheduler": "karras", "start_at_step": 8, "end_at_step": 10000,
      "return_with_leftover_noise": "disable", "model": ["4", 0], "positive": ["6", 0],
      "negative": ["7", 0], "latent_image": ["19", 0]}}
  graph["19"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0]}}
  graph["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["16", 0], "vae": ["4", 2]}}
  graph["16"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
  found = comfyui.reproduce(graph)
  steps, strength = int(found.flags["steps"]), float(found.flags["strength"])
  assert steps == 12 and found.flags["image_encode"] == "mode"
  options = json.loads(found.flags["scheduler_options"])
  assert options["comfyui"] is True
  config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear"}
  sched = schedulers.get_scheduler(comfyui.SAMPLERS[sampler], config, options=options)
  assert sched.img2img_steps(steps, strength) == (20, 8)  # the 20-step levels from the 8th
  assert "runs steps 8 to 20 of its image's schedule: as --steps 12" in _notes(found)
  assert "only: sdjax runs them all" not in _notes(found)
  for change, note in (({"end_at_step": 15}, "runs steps 8 to 15 only"),
                       ({"add_noise": "disable"}, "adds no noise to its latent")):
    found = comfyui.reproduce({**graph, "3": {"class_type": "KSamplerAdvanced", "inputs": {
        **graph["3"]["inputs"], **change}}})
    assert found.flags["steps"] == "20" and "strength" not in found.flags
    assert note in _notes(found)
  graph["19"]["inputs"]["samples"] = ["20", 0]  # an empty latent: not img2img
  graph["20"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512}}
  found = comfyui.reproduce(graph)
  assert found.flags["steps"] == "20" and "runs steps 8 to 10000 only" in _notes(found)


def test_noise_mask_is_comfyuis_inpainting():
  """A KSampler over a SetLatentNoiseMask latent (LoadImage's mask) is ComfyUI's inpainting:
  --inpaint_blend comfyui with no mask blur, a note asking for the mask as for the image; a
  DifferentialDiffusion on the model's way --differential_diffusion, an InvertMask on the
  mask's --inpainting_mask_invert; a sampler sdjax cannot blend so (its uni_pc: sdjax's UniPC)
  a note instead of either."""
  graph = default_graph(denoise=0.8)
  graph["16"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
  graph["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["16", 0], "vae": ["4", 2]}}
  graph["5"] = {"class_type": "SetLatentNoiseMask",
                "inputs": {"samples": ["15", 0], "mask": ["16", 1]}}
  found = comfyui.reproduce(graph)
  assert (found.flags["inpaint_blend"], float(found.flags["mask_blur"])) == ("comfyui", 0)
  assert (float(found.flags["strength"]), found.flags["image_encode"]) == (0.8, "mode")
  notes = _notes(found)
  assert "node 5 (SetLatentNoiseMask) inpaints: give its mask too" in notes
  assert "the latent is node 15 (VAEEncode)'s image (LoadImage photo.png)" in notes
  assert "changes the latent" not in notes
  assert "comfyui_composite" not in found.flags
  composite = {"class_type": "ImageCompositeMasked", "inputs": {  # the encoded image pasted back
      "destination": ["16", 0], "source": ["8", 0], "x": 0, "y": 0, "mask": ["16", 1]}}
  found = comfyui.reproduce({**graph, "13": composite})
  assert found.flags["comfyui_composite"] == "true"
  # a DifferentialDiffusion on the model's way: --differential_diffusion, its strength
  graph["17"] = {"class_type": "DifferentialDiffusion",
                 "inputs": {"model": graph["3"]["inputs"]["model"], "strength": 0.7}}
  graph["3"]["inputs"]["model"] = ["17", 0]
  found = comfyui.reproduce(graph)
  assert float(found.flags["differential_diffusion"]) == 0.7
  assert "differential" not in str(_notes(found)).lower()
  del graph["17"]["inputs"]["strength"]  # (its default)
  assert float(comfyui.reproduce(graph).flags["differential_diffusion"]) == 1.0
  # the mask's way: an InvertMask repaints the rest (A1111's Mask mode); other mask nodes and a
  # LoadImageMask's colour channel: notes
  graph["21"] = {"class_type": "InvertMask", "inputs": {"mask": ["16", 1]}}
  graph["5"]["inputs"]["mask"] = ["21", 0]
  found = comfyui.reproduce(graph)
  assert found.flags["inpainting_mask_invert"] == "true" and "changes the mask" not in str(
      found.notes)
  graph["22"] = {"class_type": "GrowMask", "inputs": {"mask": ["23", 0], "expand": 4}}
  graph["23"] = {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "red"}}
  graph["21"]["inputs"]["mask"] = ["22", 0]
  notes = _notes(comfyui.reproduce(graph))
  assert "node 22 (GrowMask) changes the mask: not reproduced" in notes
  assert "node 23 (LoadImageMask) reads the mask from the red channel" in notes
  graph["5"]["inputs"]["mask"] = ["16", 1]
  graph["3"]["inputs"]["sampler_name"] = "uni_pc"
  found = comfyui.reproduce(graph)
  assert "inpaint_blend" not in found.flags and "differential_diffusion" not in found.flags
  assert "does not blend the image into its calls as ComfyUI does" in _notes(found)
  assert "DifferentialDiffusion: sdjax makes it with ComfyUI's blend only" in _notes(found)


def test_inpaint_model_conditioning():
  """InpaintModelConditioning (its conditioning and latent: an inpainting model's workflow) is
  ComfyUI's blend over the image's posterior mode, its positive and negative prompts read
  through it; without its noise mask, a note (sdjax makes those inputs only with the blend)."""
  graph = default_graph(denoise=1.0)
  graph["16"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
  graph["12"] = {"class_type": "InpaintModelConditioning", "inputs": {
      "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["16", 0],
      "mask": ["16", 1], "noise_mask": True}}
  graph["3"]["inputs"].update(positive=["12", 0], negative=["12", 1], latent_image=["12", 2])
  found = comfyui.reproduce(graph)
  assert found.flags["prompt"][0].startswith("beautiful scenery")
  assert found.flags["negative_prompt"] == "text, watermark"
  assert (found.flags["inpaint_blend"], found.flags["image_encode"]) == ("comfyui", "mode")
  assert (float(found.flags["strength"]), float(found.flags["mask_blur"])) == (1.0, 0.0)
  notes = _notes(found)
  assert "node 12 (InpaintModelConditioning) inpaints its image: give it and its mask" in notes
  assert "changes the" not in notes
  graph["13"] = {"class_type": "ImageCompositeMasked", "inputs": {  # the original pasted back
      "destination": ["16", 0], "source": ["8", 0], "x": 0, "y": 0, "resize_source": False,
      "mask": ["16", 1]}}
  graph["9"]["inputs"]["images"] = ["13", 0]
  found = comfyui.reproduce(graph)  # the sampler's image through its mask: --comfyui_composite
  assert found.flags["comfyui_composite"] == "true"
  assert "ImageCompositeMasked" not in _notes(found)
  for change in ({"x": 8}, {"y": 16}, {"mask": ["16", 0]}, {"destination": ["8", 0]}):
    graph["13"]["inputs"].update(change)  # elsewhere, through another mask, over another image
    found = comfyui.reproduce(graph)
    assert "comfyui_composite" not in found.flags, change
    assert ("node 13 (ImageCompositeMasked) composites the decoded image with another through "
            "a mask: reproduced only as the paste of the sampler's own image") in _notes(found)
    graph["13"]["inputs"].update(x=0, y=0, mask=["16", 1], destination=["16", 0])
  graph["12"]["inputs"]["noise_mask"] = False  # no blend: no composite either
  assert "comfyui_composite" not in comfyui.reproduce(graph).flags
  graph["12"]["inputs"]["noise_mask"] = True
  del graph["13"]
  graph["9"]["inputs"]["images"] = ["8", 0]
  graph["12"]["inputs"]["noise_mask"] = False
  found = comfyui.reproduce(graph)
  assert "inpaint_blend" not in found.flags and found.flags["image_encode"] == "mode"
  assert "adds no noise mask" in _notes(found)


def test_vae_encode_for_inpaint():
  """VAEEncodeForInpaint's latent: ComfyUI's blend with its grow_mask_by; over a sampler sdjax
  cannot blend so, neither (a note each)."""
  graph = default_graph(denoise=1.0)
  graph["16"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
  graph["5"] = {"class_type": "VAEEncodeForInpaint", "inputs": {
      "pixels": ["16", 0], "vae": ["4", 2], "mask": ["16", 1], "grow_mask_by": 8}}
  found = comfyui.reproduce(graph)
  assert (found.flags["inpaint_blend"], found.flags["grow_mask_by"]) == ("comfyui", "8")
  assert (found.flags["image_encode"], float(found.flags["mask_blur"])) == ("mode", 0.0)
  assert "node 5 (VAEEncodeForInpaint) inpaints its image: give it and its mask" in _notes(found)
  graph["3"]["inputs"]["sampler_name"] = "uni_pc"
  found = comfyui.reproduce(graph)
  assert "inpaint_blend" not in found.flags and "grow_mask_by" not in found.flags
  assert "sdjax grows it with ComfyUI's blend only" in _notes(found)


def test_not_a_workflow():
  assert comfyui.parse_graph("a cat\nSteps: 20, Sampler: Euler") is None
  assert comfyui.parse_graph('{"prompt": "a cat"}') is None
  graph = default_graph()
  del graph["3"]
  with pytest.raises(ValueError, match="without a sampler node"):
    comfyui.reproduce(graph)
  graph = default_graph()
  graph["3"]["inputs"]["positive"] = ["9", 0]  # not a text encoder
  with pytest.raises(ValueError, match="positive conditioning comes from SaveImage"):
    comfyui.reproduce(graph)
  out = io.BytesIO()
  Image.new("RGB", (8, 8)).save(out, format="PNG")
  assert infotext.parameters_text(out.getvalue()) is None


def test_a_jsonl_line_of_a_comfyui_image(tmp_path):
  (tmp_path / "comfy.png").write_bytes(comfy_png(default_graph(sampler_name="dpmpp_2m",
                                                               scheduler="karras")))
  path = tmp_path / "p.jsonl"
  path.write_text('{"parameters": "comfy.png", "seed": 3}\n')
  (line,) = plan.read_prompts_file(str(path))
  assert line.prompt.startswith("beautiful scenery") and line.negative_prompt == "text, watermark"
  assert (line.seed, line.steps, line.scheduler, line.guidance_scale) == (3, 20, "dpmpp_2m", 8.0)
  assert (line.width, line.height, line.schedule_type) == (512, 768, "karras")


def test_main_py_makes_a_comfyui_image_again(model, cache, tmp_path):
  """main.py --parameters_file on a ComfyUI PNG of a hires fix workflow: its prompts and
  settings (flags given win), the hires pass, each thing it cannot reproduce one warning."""
  from test_main import _manifest, main_py  # noqa: PLC0415

  image = tmp_path / "ComfyUI_00001_.png"
  graph = _hires_graph(("LatentUpscaleBy", {"upscale_method": "bilinear", "scale_by": 1.5}),
                       steps=2)
  graph["3"]["inputs"].update(sampler_name="dpmpp_2m", scheduler="karras", steps=3)
  image.write_bytes(comfy_png(graph))
  out = str(tmp_path / "out")
  proc = main_py(["--model", model, "--parameters_file", str(image), "--height", "16",
                  "--width", "16", "--output_dir", out, "--compilation_cache", cache])
  (record,) = _manifest(out)
  assert record["prompt"].startswith("beautiful scenery") and record["steps"] == 3
  assert (record["scheduler"], record["seed"], record["rng"]) == (
      "dpmpp_2m", 156680208700286 % 2**32, "torch_cpu")
  assert record["scheduler_options"]["schedule_type"] == "karras"
  assert (record["width"], record["height"]) == (24, 24)  # the hires pass's, 1.5x
  assert record["hires"]["steps"] == 2 and record["hires"]["strength"] == 0.5
  assert "Emphasis: ComfyUI" in Image.open(f"{out}/{record['file']}").info["parameters"]
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
  assert record["scheduler_options"]["comfyui"] is True  # ComfyUI's start, whole timesteps
  assert len(warnings) == 2 and "75 tokens" in warnings[-1]  # the model is given


def _custom_graph(advanced=True, sigmas=("BasicScheduler", {"scheduler": "karras", "steps": 20,
                                                             "denoise": 1.0}), guider="CFGGuider"):
  """The default workflow with its KSampler replaced by ComfyUI's custom sampling nodes:
  SamplerCustomAdvanced (RandomNoise, CFGGuider or BasicGuider, KSamplerSelect, a sigma node) or
  SamplerCustom (its seed, cfg and prompts its own)."""
  graph = default_graph(sampler_name="dpmpp_2m", scheduler="karras")
  first = graph.pop("3")["inputs"]
  graph["20"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
  graph["21"] = {"class_type": sigmas[0], "inputs": {"model": ["4", 0], **sigmas[1]}}
  if advanced:
    graph["22"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": first["seed"]}}
    graph["23"] = ({"class_type": "CFGGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": first["cfg"]}}
        if guider == "CFGGuider" else
        {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}})
    graph["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["22", 0], "guider": ["23", 0], "sampler": ["20", 0], "sigmas": ["21", 0],
        "latent_image": ["5", 0]}}
  else:
    graph["3"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["4", 0], "add_noise": True, "noise_seed": first["seed"], "cfg": first["cfg"],
        "positive": ["6", 0], "negative": ["7", 0], "sampler": ["20", 0], "sigmas": ["21", 0],
        "latent_image": ["5", 0]}}
  return graph


@pytest.mark.parametrize("advanced", [True, False])
def test_custom_sampler_nodes(advanced):
  """SamplerCustom(Advanced) with a BasicScheduler: the same flags as the KSampler it stands for;
  a KarrasScheduler's range and rho and a BetaSamplingScheduler's shape become the schedule
  settings; a BasicGuider's one conditioning runs without guidance."""
  want = comfyui.reproduce(default_graph(sampler_name="dpmpp_2m", scheduler="karras"))
  found = comfyui.reproduce(_custom_graph(advanced))
  assert found.flags == want.flags and _notes(found) == _notes(want)
  found = comfyui.reproduce(_custom_graph(advanced, sigmas=("KarrasScheduler", {
      "steps": 12, "sigma_max": 10.0, "sigma_min": 0.05, "rho": 5.0})))
  options = json.loads(found.flags["scheduler_options"])
  assert (found.flags["steps"], found.flags["schedule_type"]) == ("12", "Karras")
  assert (options["schedule_sigma_max"], options["schedule_sigma_min"], options["schedule_rho"],
          options["comfyui"]) == (10.0, 0.05, 5.0, True)
  found = comfyui.reproduce(_custom_graph(advanced, sigmas=("BetaSamplingScheduler", {
      "steps": 9, "alpha": 0.5, "beta": 0.7})))
  options = json.loads(found.flags["scheduler_options"])
  assert found.flags["schedule_type"] == "Beta"
  assert (options["schedule_beta_alpha"], options["schedule_beta_beta"]) == (0.5, 0.7)
  if advanced:
    found = comfyui.reproduce(_custom_graph(guider="BasicGuider"))
    assert (found.flags["guidance_scale"], found.flags["negative_prompt"]) == ("1.0", "")
    graph = _custom_graph()
    graph["24"] = graph["21"]  # a SplitSigmas' high levels alone: the first 5 steps only
    graph["21"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["24", 0], "step": 5}}
    found = comfyui.reproduce(graph)
    assert "node 3 runs steps 0 to 5 only" in _notes(found) and found.flags["steps"] == "20"


@pytest.mark.parametrize(("node", "settings", "want", "eta", "noted"), [
    ("SamplerEulerAncestral", {"eta": 0.6, "s_noise": 1.0}, "Euler a", 0.6, None),
    ("SamplerDPMPP_2M_SDE", {"solver_type": "heun", "eta": 1.0, "s_noise": 1.0,
                             "noise_device": "gpu"}, "DPM++ 2M SDE Heun", None, None),
    ("SamplerDPMPP_SDE", {"eta": 1.0, "s_noise": 1.0, "r": 0.4, "noise_device": "cpu"},
     "DPM++ SDE", None, "r 0.4"),
    ("SamplerDPMPP_3M_SDE", {"eta": 2.0, "s_noise": 1.2, "noise_device": "cpu"},
     "DPM++ 3M SDE", None, None),
    ("SamplerSASolver", {"eta": 0.5, "sde_start_percent": 0.2, "sde_end_percent": 0.8,
                         "s_noise": 1.0, "predictor_order": 3, "corrector_order": 4,
                         "use_pece": False, "simple_order_2": False}, "sa_solver", 0.5, None),
    ("SamplerSASolver", {"eta": 1.0, "use_pece": True, "predictor_order": 2,
                         "sde_end_percent": 0.7}, "sa_solver_pece", None, None),
    ("SamplerLMS", {"order": 3}, "LMS", None, None),
    ("SamplerLMS", {"order": 40}, "LMS", None, "order 40"),
    ("SamplerER_SDE", {"solver_type": "Reverse-time SDE", "max_stage": 2, "eta": 2.5,
                       "s_noise": 1.0}, "ER SDE", 2.5, None),  # its eta up to 100
    ("SamplerER_SDE", {"solver_type": "ODE", "max_stage": 3, "eta": 0.5, "s_noise": 0.5},
     "ER SDE", None, None),
    ("SamplerDPMAdaptative", {"order": 2, "rtol": 0.1, "atol": 0.0078, "h_init": 0.05,
                              "pcoeff": 0.2, "icoeff": 1.0, "dcoeff": 0.0,
                              "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0},
     "dpm_adaptive", None, None),
    ("SamplerDPMAdaptative", {"order": 3, "rtol": 0.0, "atol": 0.0, "eta": 0.5},
     "dpm_adaptive", None, "eta 0.5"),
])
def test_sampler_nodes_with_settings(node, settings, want, eta, noted):
  """Custom sampling's sampler nodes with settings: the KSampler sampler each makes (by its
  noise_device, solver_type, use_pece), its eta as A1111's Eta (sdjax's from 0 to 1), its
  s_noise as the `s_noise` option, a note for settings sdjax runs at their defaults;
  SamplerER_SDE's solver type and stages as er_sde's options."""
  graph = _custom_graph()
  graph["20"] = {"class_type": node, "inputs": {**({"model": ["4", 0]} if node ==
                                                   "SamplerSASolver" else {}), **settings}}
  found = comfyui.reproduce(graph)
  assert found.flags.get("scheduler") == want
  options = json.loads(found.flags.get("scheduler_options", "{}"))
  assert options.get("eta") == eta
  assert options.get("s_noise", 1.0) == settings.get("s_noise", 1.0)
  if node == "SamplerLMS":  # its order: lms's lms_order (1 to 10)
    assert options.get("lms_order", 4) == (settings["order"] if noted is None else 4)
  notes = _notes(found)
  if noted is not None:
    assert noted in notes
  if settings.get("eta", 1.0) > 1 and node != "SamplerER_SDE":
    assert f"eta {settings['eta']}" in notes
  if node == "SamplerSASolver":  # its settings: sa_solver's options
    for key, default in (("predictor_order", 3), ("sde_end_percent", 0.8)):
      assert options.get(key, default) == settings.get(key, default)
  if node == "SamplerDPMAdaptative":  # its settings: dpm_adaptive's options, or its defaults
    want = {"adaptive_order": 2, "rtol": 0.1, "pcoeff": 0.2} if noted is None else {}
    assert {k: v for k, v in options.items() if k in ("adaptive_order", *SETTINGS)} == want
    if noted is not None:
      assert "rtol and atol must be >= 0, not both 0" in notes
  if node == "SamplerER_SDE":
    kind = {"ODE": "ode", "Reverse-time SDE": "reverse_time_sde"}[settings["solver_type"]]
    assert options["er_sde_type"] == kind and options.get("max_stage", 3) == settings["max_stage"]
  assert found.flags.get("brownian") == ("nv" if settings.get("noise_device") == "gpu" else
                                         "torch_cpu" if "noise_device" in settings else None)


def _ays_reference(levels, steps, denoise):
  """NVIDIA's log-linear interpolation of its levels (as its how-to and ComfyUI's node), the last
  round(steps * denoise) + 1, the final 0, as torch.FloatTensor keeps them."""
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415

  if len(levels) != steps + 1:
    xs, new = np.linspace(0, 1, len(levels)), np.linspace(0, 1, steps + 1)
    levels = np.exp(np.interp(new, xs, np.log(levels[::-1])))[::-1].copy()
  total = steps if denoise >= 1 else round(steps * denoise)
  levels = list(levels[-(total + 1):])
  levels[-1] = 0
  return torch.FloatTensor(levels).tolist()


@pytest.mark.parametrize(("model_type", "steps", "denoise"), [("SD1", 10, 1.0), ("SDXL", 14, 1.0),
                                                             ("SD1", 8, 0.6)])
def test_align_your_steps_node(model_type, steps, denoise):
  """An AlignYourStepsScheduler's levels (ComfyUI's table, more digits than A1111's Align Your
  Steps) become the run's --sigmas, steps as many as they make; an SVD one is a note."""
  levels = {"SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177,
                    1.3943805092, 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662,
                    0.0291671582],
            "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
                     0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177,
                     0.0291671582]}[model_type]
  graph = _custom_graph(sigmas=("AlignYourStepsScheduler", {
      "model_type": model_type, "steps": steps, "denoise": denoise}))
  found = comfyui.reproduce(graph)
  want = _ays_reference(levels, steps, denoise)
  assert [float(v) for v in found.flags["sigmas"]] == want
  assert found.flags["steps"] == str(len(want) - 1) and "schedule_type" not in found.flags
  assert json.loads(found.flags["scheduler_options"])["comfyui"] is True
  graph["21"]["inputs"]["model_type"] = "SVD"
  found = comfyui.reproduce(graph)
  assert "sigmas" not in found.flags and "AlignYourStepsScheduler (SVD)" in _notes(found)


def _comfyui_table(zsnr: bool):
  """ComfyUI's float32 table of SD's noise levels (its ModelSamplingDiscrete: float64 betas and
  products; zsnr rescaled to zero terminal SNR in sqrt(alphas_cumprod)), written in torch."""
  import torch  # noqa: PLC0415

  betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
  cumprod = torch.cumprod(1.0 - betas, dim=0)
  sigmas = ((1 - cumprod) / cumprod) ** 0.5
  if zsnr:  # from the sigmas, in float64
    root = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    cumprod = root**2
    cumprod[-1] = 4.8973451890853435e-08  # ComfyUI's stand-in for the zero it leaves
    sigmas = ((1 - cumprod) / cumprod) ** 0.5
  return sigmas.float()


@pytest.mark.parametrize(("scheduler", "steps", "zsnr"), [
    ("ddim_uniform", 20, False), ("ddim_uniform", 30, False), ("ddim_uniform", 1, False),
    ("ddim_uniform", 7, True), ("linear_quadratic", 20, False), ("linear_quadratic", 9, True),
    ("linear_quadratic", 1, False)])
def test_table_schedulers_become_sigmas(scheduler, steps, zsnr):
  """ddim_uniform and linear_quadratic, which no schedule type places: their levels over
  ComfyUI's table become the run's --sigmas (ddim_uniform's every (1000 // steps)-th level from
  the second, as many steps as that makes: 31 for 30), from a KSampler or a BasicScheduler."""
  table = _comfyui_table(zsnr).tolist()
  if scheduler == "ddim_uniform":
    want = [table[x] for x in range(1, 1000, 1000 // steps)][::-1] + [0.0]
  else:
    half = steps // 2
    if steps == 1:
      ramp = [0.0, 1.0]
    else:
      excess = half - 0.025 * steps
      a = excess / (half * (steps - half) ** 2)
      b = 0.025 / half - 2 * excess / (steps - half) ** 2
      ramp = [i * 0.025 / half for i in range(half)] + [
          a * i * i + b * i + a * half * half for i in range(half, steps)] + [1.0]
    want = [float(np.float32(1.0 - r) * np.float32(table[-1])) for r in ramp]
  graph = default_graph(sampler_name="euler", scheduler=scheduler, steps=steps)
  if zsnr:
    graph["30"] = {"class_type": "ModelSamplingDiscrete",
                   "inputs": {"model": ["4", 0], "sampling": "eps", "zsnr": True}}
    graph["3"]["inputs"]["model"] = ["30", 0]
  custom = _custom_graph(sigmas=("BasicScheduler", {"scheduler": scheduler, "steps": steps,
                                                     "denoise": 1.0}))
  for found in [comfyui.reproduce(graph)] + [comfyui.reproduce(custom)] * (not zsnr):
    assert json.loads(found.flags["scheduler_options"]).get("rescale_betas_zero_snr", False) is (
      zsnr)
    assert [float(v) for v in found.flags["sigmas"]] == want
    assert found.flags["steps"] == str(len(want) - 1) and "schedule_type" not in found.flags
    assert json.loads(found.flags["scheduler_options"])["comfyui"] is True
    assert f"scheduler {scheduler}" not in _notes(found)


def test_custom_sampling_keeps_every_level():
  """Its custom sampling nodes run uni_pc over the scheduler's own levels (only its KSampler
  drops the next-to-last): no discard_penultimate_sigma."""
  graph = _custom_graph()
  graph["20"]["inputs"]["sampler_name"] = "uni_pc"
  options = json.loads(comfyui.reproduce(graph).flags["scheduler_options"])
  assert options["comfyui"] is True and "discard_penultimate_sigma" not in options


def test_sdxl_text_encoder_micro_conditioning():
  """CLIPTextEncodeSDXL's width / height, crop and target size: SDXL's original size, crop
  (top, left) and target size; the negative conditioning's where the negative's differ (a
  plain CLIPTextEncode's: ComfyUI's defaults)."""
  graph = default_graph()
  for node, text in (("6", "a cat"), ("7", "blurry")):
    graph[node] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "width": 4096, "height": 2048, "crop_w": 8, "crop_h": 16, "target_width": 1024,
        "target_height": 768, "text_g": text, "text_l": text, "clip": ["4", 1]}}
  found = comfyui.reproduce(graph)
  assert (found.flags["original_size"], found.flags["crops_coords_top_left"],
          found.flags["target_size"]) == (["2048", "4096"], ["16", "8"], ["768", "1024"])
  assert "negative_original_size" not in found.flags  # the positive's: as given
  graph["7"]["inputs"]["target_width"] = 2048  # its own: the negative conditioning's
  flags = comfyui.reproduce(graph).flags
  assert (flags["negative_original_size"], flags["negative_crops_coords_top_left"],
          flags["negative_target_size"]) == (["2048", "4096"], ["16", "8"], ["768", "2048"])
  # a plain text encoder's: ComfyUI's defaults, the image's size (512x768), no crop
  graph["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}}
  flags = comfyui.reproduce(graph).flags
  assert (flags["negative_original_size"], flags["negative_crops_coords_top_left"],
          flags["negative_target_size"]) == (["768", "512"], ["0", "0"], ["768", "512"])


@pytest.mark.parametrize(("steps", "denoise"), [(1, 1.0), (4, 0.5), (3, 0.95)])
def test_sd_turbo_scheduler(steps, denoise):
  """SDTurboScheduler (SD-Turbo / SDXL-Turbo workflows): the levels of timesteps 999, 899, ...
  from the 10 - int(10 * denoise)-th, as its ModelSamplingDiscrete reads them (the float64
  levels' logs in float32, then exp), become --sigmas (to an ulp: torch's exp's)."""
  import torch  # noqa: PLC0415

  betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
  cumprod = torch.cumprod(1.0 - betas, dim=0)
  log_sigmas = (((1 - cumprod) / cumprod) ** 0.5).log().float()
  start = 10 - int(10 * denoise)
  timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + steps]
  want = [*log_sigmas[timesteps].exp().tolist(), 0.0]
  graph = _custom_graph(sigmas=("SDTurboScheduler", {"steps": steps, "denoise": denoise}))
  found = comfyui.reproduce(graph)
  # sdjax's float32 exp is correctly rounded; torch's vector exp may be an ulp off it
  np.testing.assert_array_max_ulp(np.asarray(found.flags["sigmas"], np.float32),
                                  np.asarray(want, np.float32), maxulp=1)
  assert found.flags["steps"] == str(len(want) - 1)
  assert json.loads(found.flags["scheduler_options"])["comfyui"] is True
  assert "SDTurboScheduler" not in _notes(found)


def test_sdxl_text_l_is_the_first_encoders_prompt(tmp_path):
  """CLIPTextEncodeSDXL's text_l (CLIP-L's) where it differs from text_g (CLIP-G's): the prompt
  (diffusers' `prompt`, to text_encoder) with text_g its prompt_2; a string node's text too. A
  hires pass on the same conditioning takes the first pass's pair (no note); one with a text_l
  of its own is a note (sdjax's hires prompt is both encoders')."""
  graph = default_graph()
  for node, (text_g, text_l) in (("6", ("a cat, photo", ["20", 0])), ("7", ("blurry", "lowres"))):
    graph[node] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
        "target_height": 1024, "text_g": text_g, "text_l": text_l, "clip": ["4", 1]}}
  graph["20"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a cat"}}
  found = comfyui.reproduce(graph)
  assert (found.flags["prompt"], found.flags["prompt_2"]) == (["a cat"], "a cat, photo")
  assert (found.flags["negative_prompt"], found.flags["negative_prompt_2"]) == (
      "lowres", "blurry")
  assert "text_l" not in _notes(found)
  (tmp_path / "comfy.png").write_bytes(comfy_png(graph))  # a jsonl line's "parameters"
  (tmp_path / "p.jsonl").write_text('{"parameters": "comfy.png"}\n')
  (line,) = plan.read_prompts_file(str(tmp_path / "p.jsonl"))
  assert (line.prompt, line.prompt_2, line.negative_prompt, line.negative_prompt_2) == (
      "a cat", "a cat, photo", "lowres", "blurry")
  graph["7"]["inputs"]["text_l"] = "blurry"  # the same text: one prompt for both
  found = comfyui.reproduce(graph)
  assert found.flags["negative_prompt"] == "blurry" and "negative_prompt_2" not in found.flags
  hires = _hires_graph(("LatentUpscaleBy", {"upscale_method": "bilinear", "scale_by": 2.0}))
  hires.update({k: graph[k] for k in ("6", "7", "20")})
  found = comfyui.reproduce(hires)
  assert "hires_prompt" not in found.flags and "text_l" not in _notes(found)
  assert found.flags["prompt_2"] == "a cat, photo"
  hires["12"] = {**graph["6"], "inputs": {**graph["6"]["inputs"], "text_l": "a dog"}}
  hires["11"]["inputs"]["positive"] = ["12", 0]
  assert "has a text_l of its own" in _notes(comfyui.reproduce(hires))


def _refiner_graph(**refiner):
  """ComfyUI's SDXL base + refiner example: a base KSamplerAdvanced over steps 0-20 of 25 keeping
  its leftover noise, the refiner's (its own checkpoint and text encoders) over 20-25 without
  adding noise, and the decode of that."""
  graph = default_graph()
  base = graph["3"]["inputs"]
  graph["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
      "add_noise": "enable", "noise_seed": 721897303308196, "steps": 25, "cfg": 8.0,
      "sampler_name": "euler", "scheduler": "normal", "start_at_step": 0, "end_at_step": 20,
      "return_with_leftover_noise": "enable", **{k: base[k] for k in (
          "model", "positive", "negative", "latent_image")}}}
  graph["4"]["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"
  graph["5"]["inputs"].update(width=1024, height=1024)
  graph["12"] = {"class_type": "CheckpointLoaderSimple",
                 "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}}
  for node, source in (("15", "6"), ("16", "7")):
    graph[node] = {"class_type": "CLIPTextEncode", "inputs": {
        "text": graph[source]["inputs"]["text"], "clip": ["12", 1]}}
  graph["11"] = {"class_type": "KSamplerAdvanced", "inputs": {
      **graph["3"]["inputs"], "add_noise": "disable", "noise_seed": 0, "start_at_step": 20,
      "end_at_step": 10000, "return_with_leftover_noise": "disable", "model": ["12", 0],
      "positive": ["15", 0], "negative": ["16", 0], "latent_image": ["3", 0], **refiner}}
  graph["8"]["inputs"].update(samples=["11", 0], vae=["12", 2])
  return graph


def test_sdxl_base_and_refiner_pair():
  """The base + refiner pair of KSamplerAdvanced: the refiner after step 20 (--refiner_start 20,
  a number of steps), the refiner checkpoint a note settled by --refiner, ComfyUI's default
  aesthetic scores (a plain text encoder's) or a CLIPTextEncodeSDXLRefiner's ascore; what
  sdjax's refiner does not do (its own CFG, text, fresh step noise; a size of its own) notes."""
  graph = _refiner_graph()
  found = comfyui.reproduce(graph)
  flags, notes = found.flags, _notes(found)
  assert (flags["refiner_start"], flags["steps"], flags["aesthetic_score"],
          flags["negative_aesthetic_score"]) == ("20", "25", "6.0", "2.5")
  assert "sd_xl_refiner_1.0.safetensors: give it with --refiner" in notes
  assert ("refiner", "Refiner: sd_xl_refiner_1.0.safetensors: give it with --refiner") in (
      found.notes)
  for text in ("runs steps", "more sampler pass", "the refiner"):
    assert text not in notes, notes
  graph["15"] = {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {
      "ascore": 7.5, "width": 2048, "height": 2048, "text": "a castle", "clip": ["12", 1]}}
  graph["11"]["inputs"].update(cfg=5.0, sampler_name="euler_ancestral")
  found = comfyui.reproduce(graph)
  notes = _notes(found)
  assert found.flags["aesthetic_score"] == "7.5"
  for text in ("runs cfg 5.0, the base 8.0", "runs sampler_name euler_ancestral",
               "draws its steps' noise afresh", "has a positive text of its own",
               "conditioned on size 2048x2048"):
    assert text in notes, (text, notes)
  assert "negative text of its own" not in notes
  # not a handoff sdjax makes: the second pass adds noise, or starts elsewhere
  for change in ({"add_noise": "enable"}, {"start_at_step": 18}):
    found = comfyui.reproduce(_refiner_graph(**change))
    assert "refiner_start" not in found.flags and "not reproduced" in _notes(found)
  graph = _refiner_graph(sampler_name="dpm_fast")  # a plan between its run's ends: no handoff
  graph["3"]["inputs"]["sampler_name"] = "dpm_fast"
  found = comfyui.reproduce(graph)
  assert "refiner_start" not in found.flags and "plans its steps" in _notes(found)


@pytest.mark.parametrize(("node", "inputs"), [
    ("VPScheduler", {"steps": 12, "beta_d": 19.9, "beta_min": 0.1, "eps_s": 0.001}),
    ("VPScheduler", {"steps": 7, "beta_d": 10.0, "beta_min": 0.3, "eps_s": 0.01}),
    ("LaplaceScheduler", {"steps": 12, "sigma_max": 14.614642, "sigma_min": 0.0291675,
                          "mu": 0.0, "beta": 0.5}),
    ("LaplaceScheduler", {"steps": 9, "sigma_max": 10.0, "sigma_min": 0.05, "mu": -0.3,
                          "beta": 1.2}),  # an odd count: the middle point's sign 0
])
def test_vp_and_laplace_scheduler_nodes(node, inputs):
  """ComfyUI's VPScheduler (sqrt(expm1(beta_d t^2 / 2 + beta_min t)), t from 1 to eps_s, then 0)
  and LaplaceScheduler (exp(mu - beta sign(1/2 - x) log(1 - 2|1/2 - x| + 1e-5)), clamped, no 0
  after) become --sigmas: their float32 torch formulas within an ulp (torch's vector exp, log
  and expm1). Levels ending above 0 run on Euler; a sampler that steps to 0 only: a note."""
  import torch  # noqa: PLC0415

  x = torch.linspace(*((1.0, inputs["eps_s"]) if node == "VPScheduler" else (0.0, 1.0)),
                     inputs["steps"])
  if node == "VPScheduler":
    want = torch.cat([torch.sqrt(torch.special.expm1(
        inputs["beta_d"] * x ** 2 / 2 + inputs["beta_min"] * x)), torch.zeros(1)])
  else:
    lmb = inputs["mu"] - inputs["beta"] * torch.sign(0.5 - x) * torch.log(
        1 - 2 * torch.abs(0.5 - x) + 1e-5)
    want = torch.clamp(torch.exp(lmb), min=inputs["sigma_min"], max=inputs["sigma_max"])
  graph = _custom_graph(sigmas=(node, inputs))
  graph["20"]["inputs"]["sampler_name"] = "euler"
  found = comfyui.reproduce(graph)
  np.testing.assert_array_max_ulp(np.asarray(found.flags["sigmas"], np.float32), want.numpy(),
                                  maxulp=1)
  assert found.flags["steps"] == str(len(want) - 1) and "schedule_type" not in found.flags
  assert "not 0" not in _notes(found) and node not in _notes(found)
  graph["20"]["inputs"]["sampler_name"] = "dpmpp_2m"
  assert ("sdjax's dpmpp_2m runs only to 0" in _notes(comfyui.reproduce(graph))) == (
      node == "LaplaceScheduler")
  graph["21"]["inputs"]["steps"] = ["30", 0]  # from another node: a note
  assert f"{node} has inputs from other nodes" in _notes(comfyui.reproduce(graph))


def test_sdxl_refiner_pair_of_custom_samplers():
  """The custom-sampling form of the base + refiner pair: SamplerCustomAdvanced over a
  SplitSigmas' high levels, a second one (DisableNoise, the refiner's guider) over its low ones
  from the first's output: --refiner_start at the split's step (a SplitSigmasDenoise's: before
  the last round(steps * denoise)); its denoised_output, or another SplitSigmas, is no
  handoff."""
  graph = _custom_graph()
  graph["24"] = graph["21"]
  graph["21"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["24", 0], "step": 15}}
  graph["12"] = {"class_type": "CheckpointLoaderSimple",
                 "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}}
  graph["25"] = {"class_type": "DisableNoise", "inputs": {}}
  graph["26"] = {"class_type": "CFGGuider", "inputs": {**graph["23"]["inputs"],
                                                       "model": ["12", 0]}}
  graph["11"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
      "noise": ["25", 0], "guider": ["26", 0], "sampler": ["20", 0], "sigmas": ["21", 1],
      "latent_image": ["3", 0]}}
  graph["8"]["inputs"]["samples"] = ["11", 0]
  found = comfyui.reproduce(graph)
  notes = _notes(found)
  assert (found.flags["refiner_start"], found.flags["steps"]) == ("15", "20")
  assert "give it with --refiner" in notes
  for text in ("runs steps", "more sampler pass", "not reproduced", "adds no noise"):
    assert text not in notes, notes
  graph["26"] = {"class_type": "BasicGuider", "inputs": {"model": ["12", 0],
                                                         "conditioning": ["6", 0]}}
  assert "the refiner) runs without guidance" in _notes(comfyui.reproduce(graph))
  graph["26"] = {"class_type": "CFGGuider", "inputs": {**graph["23"]["inputs"],
                                                       "model": ["12", 0]}}
  graph["21"] = {"class_type": "SplitSigmasDenoise", "inputs": {"sigmas": ["24", 0],
                                                              "denoise": 0.3}}
  found = comfyui.reproduce(graph)  # the last round(20 * 0.3) = 6 steps the refiner's
  assert (found.flags["refiner_start"], found.flags["steps"]) == ("14", "20")
  graph["21"]["inputs"]["denoise"] = 0.0  # nothing left to the refiner: not a handoff
  assert "refiner_start" not in comfyui.reproduce(graph).flags
  graph["21"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["24", 0], "step": 15}}
  graph["11"]["inputs"]["latent_image"] = ["3", 1]  # the denoised output: not the handoff
  found = comfyui.reproduce(graph)
  assert "refiner_start" not in found.flags and "runs steps 0 to 15 only" in _notes(found)
  graph["11"]["inputs"]["latent_image"] = ["3", 0]
  graph["27"] = {**graph["21"]}  # low levels of another split
  graph["11"]["inputs"]["sigmas"] = ["27", 1]
  found = comfyui.reproduce(graph)
  assert "refiner_start" not in found.flags and "not reproduced" in _notes(found)
