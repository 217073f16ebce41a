"""Generates images for many prompts on every device and host; reproducible and resumable.

  python main.py --prompt "a red circle in the center on a blue background"
  python main.py --config configs/sd15.py --model path/to/sd15 --prompts_file prompts.jsonl \
      --batch_size 4 --output_dir outputs/run1

Flags override what `--parameters_file` reads from an image, which overrides the `--config`
preset, which overrides the defaults (the built-in model's preset when --model is not given).
See README.md for multi-device and multi-host runs.

  python main.py --parameters_file image.png --model path/to/its/model   # make it again
"""

import dataclasses
import json
import os
import shlex
import signal
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import infotext, masks, outputs, run, sampling, schedulers, upscaling
from sdjax.conditioning import MicroConditioning

_OVERRIDABLE = ("model", "steps", "guidance_scale", "scheduler", "height", "width",
                "batch_size", "dtype", "eta", "refiner", "refiner_start", "guidance_rescale")

flags.DEFINE_string("model", None, "diffusers folder, hub id, or single checkpoint file "
                    "(.safetensors/.ckpt; default: the built-in model)")
flags.DEFINE_string("model_config", None, "single-file --model: diffusers folder or hub id whose "
                    "configs, tokenizer and scheduler to use (default: built-in standard configs)")
flags.DEFINE_string("vae", None, "replacement VAE: diffusers folder, hub id or VAE file")
flags.DEFINE_enum("prediction_type", None, ["epsilon", "v_prediction"],
                  "override the scheduler's prediction type (SD2 single files: 512-base is "
                  "epsilon, 768-v is v_prediction, the default)")
flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)")
flags.DEFINE_string("prompts_file", None, ".txt (one prompt per line), .jsonl (objects with "
                    "prompt and optional negative_prompt, seed, num_images, ...) or .csv / .tsv "
                    "(a header row naming a prompt column and optional jsonl-named ones)")
flags.DEFINE_string("parameters_file", None, "make an image again: an image with A1111 "
                    "parameters (A1111's PNG Info: a PNG, JPEG or WebP from A1111 or sdjax), a "
                    "ComfyUI PNG (its workflow) or a text file holding them (a path or fsspec "
                    "URL) gives the prompts and every setting no flag gives")
flags.DEFINE_string("negative_prompt", "", "negative prompt for every image")
flags.DEFINE_string("prompt_2", "", "SDXL: the second text encoder's prompt for every image "
                    "(diffusers' prompt_2; empty: each image's prompt; a jsonl line's prompt_2 "
                    "wins)")
flags.DEFINE_string("negative_prompt_2", "", "SDXL: the second text encoder's negative prompt "
                    "(empty: each image's negative prompt; a jsonl line's negative_prompt_2 wins)")
flags.DEFINE_enum("prompt_syntax", "a1111", ["a1111", "plain"], "a1111: AUTOMATIC1111's (x:1.2) "
                  "weights, long prompts, BREAK, [from:to:when] and [a|b]; plain: diffusers' "
                  "(truncated at the text encoder's length, 77 tokens)")
flags.DEFINE_enum("emphasis", "Original", ["Original", "No norm", "Ignore", "None", "ComfyUI"],
                  "a1111: A1111's emphasis mode: Original (weights, then each chunk's mean "
                  "restored), No norm (weights only), Ignore (weights not applied), None "
                  "(brackets and BREAK read as plain text); or ComfyUI's weighting (a weighted "
                  "token's output moved away from the empty prompt's)", case_sensitive=False)
flags.DEFINE_enum("dynamic_prompts", "off", ["off", "random", "combinatorial"],
                  "read prompts as templates of A1111's sd-dynamic-prompts extension ({a|b}, "
                  "{2$$a|b|c}, __wildcard__; needs the dynamicprompts package): random picks "
                  "each image's text by its seed, combinatorial makes every text a template "
                  "makes a prompt of its own")
flags.DEFINE_string("wildcards_dir", None, "--dynamic_prompts: the folder where __name__ reads "
                    "name.txt (one option per line; __dir/*__ any file under dir/)")
flags.DEFINE_integer("max_generations", 0, "--dynamic_prompts combinatorial: at most this many "
                     "prompts per template (0: all)")
flags.DEFINE_string("init_image", None, "--prompt's image to start from (img2img; with an "
                    "instruct-pix2pix model the image each prompt edits, with the x4 upscaler "
                    "the low-res image it enlarges): a path or fsspec URL; a prompts file's "
                    "lines give their own (jsonl init_image)")
flags.DEFINE_string("mask_image", None, "with --init_image, what --prompt repaints (inpainting: "
                    "white repaints; an RGBA file with transparency: its alpha, as A1111's, or "
                    "under --inpaint_blend comfyui or --image_encode mode its transparent "
                    "pixels, as ComfyUI's LoadImage)")
flags.DEFINE_string("depth_image", None, "with --init_image and a depth-to-image model, its depth "
                    "map (grey levels, 8 or 16 bits, larger nearer)")
flags.DEFINE_float("strength", 0.75, "img2img and inpainting (jsonl lines with an init_image): "
                   "how much of the schedule to run, A1111's denoising strength (1.0 ignores "
                   "the image)")
flags.DEFINE_float("noise_multiplier", 1.0, "img2img and inpainting: the initial noise times "
                   "this before it noises the init image, A1111's Noise multiplier for img2img")
flags.DEFINE_float("extra_noise", 0.0, "img2img and the hires fix: their start's noise again, "
                   "times this, A1111's Extra noise multiplier for img2img and hires fix (0: off)")
flags.DEFINE_float("image_guidance_scale", None, "an instruct-pix2pix model (its jsonl lines' "
                   "init_image is the image each prompt edits): how closely the edit keeps to "
                   "the image, A1111's Image CFG Scale (default 1.5)")
flags.DEFINE_integer("noise_level", None, "an x4 upscaler model (its lines' init_image is "
                     "enlarged 4 times, read at a quarter of the image size): the noise level of "
                     "the low-res image, 0 to the model's max_noise_level (default 20)")
flags.DEFINE_enum("resize_mode", "just", ["just", "crop", "fill"], "img2img and inpainting: "
                  "how an init_image of another aspect meets the image size, A1111's Just "
                  "resize (stretched), Crop and resize (covered, the excess cut) or Resize and "
                  "fill (fitted, the bands filled with its edges stretched)")
flags.DEFINE_float("mask_blur", 4.0, "inpainting (jsonl lines with a mask_image): the mask's "
                   "Gaussian blur radius in pixels (A1111's Mask blur; soft edges blend the "
                   "original back in)")
flags.DEFINE_bool("inpaint_full_res", False, "inpainting: A1111's 'Only masked': the masked box, "
                  "padded and widened to the output's aspect, is generated at the full output "
                  "size and pasted back into the original, which keeps its size")
flags.DEFINE_bool("inpainting_mask_invert", False, "inpainting: repaint what the mask leaves "
                  "black (A1111's Inpaint not masked)")
flags.DEFINE_float("inpainting_mask_weight", 1.0, "inpainting with an inpainting model: A1111's "
                   "Conditional mask weight (how much of the masked area its masked image "
                   "hides; below 1 the original shows through, faded)")
flags.DEFINE_enum("inpaint_blend", "diffusers", ["diffusers", "a1111", "comfyui"],
                  "inpainting: how the image outside the mask is kept while sampling: diffusers' "
                  "way, A1111's (its latent mask blends the image into each step's denoised "
                  "prediction; --parameters_file of an A1111 inpainted image sets it), or "
                  "ComfyUI's (a latent noise mask: the noised image into each model input, the "
                  "image into each denoised prediction; an inpainting model's inputs as its "
                  "InpaintModelConditioning; nothing pasted back after: see --comfyui_composite)")
flags.DEFINE_integer("grow_mask_by", None, "inpainting with --inpaint_blend comfyui: ComfyUI's "
                     "VAEEncodeForInpaint (its grow_mask_by, 0-64): the image's latents those of "
                     "the image greyed under the mask, the mask grown by this many pixels")
flags.DEFINE_list("soft_inpainting", None, "inpainting with --inpaint_blend a1111: A1111's Soft "
                  "inpainting (for blurred masks: the mask's grey edge blends the original in, "
                  "and the original is pasted back where the result changed little): 'on' (its "
                  "defaults) or its six settings BIAS,PRESERVATION,CONTRAST_BOOST,"
                  "MASK_INFLUENCE,THRESHOLD,CONTRAST (default 1,0.5,4,0,0.5,2)")
flags.DEFINE_float("differential_diffusion", None, "inpainting with --inpaint_blend comfyui: "
                   "ComfyUI's DifferentialDiffusion node, its strength (0-1, its default 1): a "
                   "grey mask's lighter parts join the repainting at later steps")
flags.DEFINE_bool("comfyui_composite", False, "inpainting with --inpaint_blend comfyui: "
                  "ComfyUI's ImageCompositeMasked after the decode, as its inpainting workflows "
                  "paste the image back: the decoded image where the mask repaints, the image "
                  "elsewhere, blended by a grey mask (in float, before the 8-bit levels)")
flags.DEFINE_enum("image_encode", "sample", ["sample", "mode"],
                  "img2img, inpainting and a hires pixel upscaler: how images become latents: a "
                  "sample of the VAE's posterior (diffusers', A1111's) or its mode (ComfyUI's "
                  "VAEEncode; with --rng torch_cpu the initial noise is then the seed's first "
                  "draw, as ComfyUI's)")
flags.DEFINE_enum("inpainting_fill", "original", ["original", "fill", "latent_noise",
                                                  "latent_nothing"],
                  "inpainting: what the masked area starts from, A1111's Masked content: the "
                  "image, the colours around it, or (filled, then in latent space) the image's "
                  "noise or zeros; matters at --strength < 1")
flags.DEFINE_integer("inpaint_full_res_padding", 32, "inpainting with --inpaint_full_res: "
                     "pixels of context around the mask")
flags.DEFINE_string("embeddings_dir", None, "load every textual-inversion file in this folder "
                    "(.pt, .safetensors, .bin), its trigger word the file's name")
flags.DEFINE_string("styles_file", None, "A1111's styles.csv (name, prompt, negative_prompt): "
                    "the styles --style and a jsonl line's \"styles\" name")
flags.DEFINE_multi_string("style", [], "apply this saved style (of --styles_file) to every "
                          "prompt, as A1111's Styles: in place of its {prompt}, else after it; "
                          "repeatable, in order")
flags.DEFINE_string("lora_dir", None, "a1111: folder where <lora:name:w> tags in prompts find "
                    "name.safetensors (or .ckpt/.pt/.bin); each LoRA set is merged once")
flags.DEFINE_integer("num_images_per_prompt", 1, "images per prompt")
flags.DEFINE_integer("steps", None, "denoising steps")
flags.DEFINE_float("guidance_scale", None, "classifier-free guidance scale")
flags.DEFINE_float("guidance_rescale", 0.0, "rescale the guided prediction's spread towards the "
                   "conditional one's (diffusers' guidance_rescale, arXiv:2305.08891; 0.7 for "
                   "v-prediction models trained with zero terminal SNR; 0: off)")
flags.DEFINE_enum("guidance_rescale_form", "diffusers", ["diffusers", "comfyui"],
                  "--guidance_rescale on the model's output (diffusers'), or as ComfyUI's "
                  "RescaleCFG node (its multiplier): on the v it builds from the denoised "
                  "predictions (the same for a v-prediction model; k-diffusion samplers)")
flags.DEFINE_integer("clip_skip", 1, "A1111's Clip skip (SD1/SD2): condition on the text "
                     "encoder's layer this far from the end: 1 the last (default), 2 the "
                     "penultimate, as NovelAI-descended anime models want")
flags.DEFINE_string("scheduler", None, f"one of {', '.join(schedulers.SCHEDULERS)}, or A1111's "
                    "sampler name of one ('DPM++ 2M', 'Euler a'; default: the checkpoint's own)")
flags.DEFINE_string("scheduler_options", None, "a JSON object of scheduler config options to "
                    "override, as diffusers' from_config(config, **options), e.g. "
                    "'{\"timestep_spacing\": \"trailing\"}' (SDXL Lightning / Turbo) or "
                    "'{\"use_karras_sigmas\": true}'")
flags.DEFINE_string("schedule_type", None, "where the steps' noise levels lie, as A1111's "
                    "Schedule type: 'Align Your Steps' (SD1.5's or SDXL's by the model), 'SGM "
                    "Uniform', 'Normal', 'Uniform', 'Simple', 'KL Optimal' (euler only), "
                    "'Karras', 'Exponential', 'Beta', Forge's 'Align Your Steps GITS', 'Align "
                    "Your Steps 32', 'Turbo' (or align_your_steps, sgm_uniform, ...); "
                    "for the sigma schedulers (euler, euler_ancestral, heun, lms, kdpm2, "
                    "dpmpp_*, unipc)")
flags.DEFINE_list("sigmas", None, "the steps' noise levels themselves, as diffusers' "
                  "pipe(sigmas=...): n + 1 descending numbers for n steps (--steps may be left "
                  "out), the last where the final step lands, e.g. 14.6,4.1,1.3,0.3,0")
flags.DEFINE_list("timesteps", None, "the steps' training timesteps themselves, as diffusers' "
                  "pipe(timesteps=...): n descending numbers for n steps (--steps may be left "
                  "out), e.g. diffusers' Align Your Steps 999,850,736,645,545,455,343,233,124,24; "
                  "for euler, euler_ancestral, heun, dpmpp_*, ddpm, lcm, tcd")
flags.DEFINE_float("eta", None, "DDIM's eta: 0 deterministic (default), 1 DDPM-like; step noise "
                   "from each image's seed (--scheduler ddim; tcd: its gamma, in [0, 1])")
flags.DEFINE_integer("height", None, "image height in pixels (default: the model's native size)")
flags.DEFINE_integer("width", None, "image width in pixels (default: the model's native size)")
flags.DEFINE_integer("seed", 0, "image k of the run gets seed + k")
flags.DEFINE_integer("subseed", None, "A1111's variation seed: image k's noise is moved towards "
                     "seed subseed + k's by --subseed_strength")
flags.DEFINE_float("subseed_strength", 0.0, "A1111's variation strength, in [0, 1] (0: off)")
flags.DEFINE_integer("seed_resize_from_w", 0, "A1111's Resize seed from: width in pixels whose "
                     "noise is pasted at the centre (with --seed_resize_from_h; 0: off)")
flags.DEFINE_integer("seed_resize_from_h", 0, "A1111's Resize seed from: height in pixels")
flags.DEFINE_integer("ensd", 0, "A1111's Eta noise seed delta (ENSD, e.g. 31337): ancestral and "
                     "SDE samplers' step noise from seed + ensd (0: off)")
flags.DEFINE_float("s_min_uncond", 0.0, "A1111's Negative Guidance minimum sigma (NGMS): at every "
                   "other UNet call whose noise level is below this (DDIM, PLMS, UniPC: whose "
                   "timestep), the negative prompt's rows are skipped: faster, guidance scale 1 "
                   "there (0: off)")
flags.DEFINE_bool("s_min_uncond_all", False, "NGMS skips the negative prompt at every call below "
                  "--s_min_uncond, not every other")
flags.DEFINE_float("skip_early_cond", 0.0, "A1111's Ignore negative prompt during early sampling "
                   "(Skip Early CFG): the fraction of the run's first UNet calls without the "
                   "negative prompt, in [0, 1] (0: off)")
flags.DEFINE_bool("pad_cond_uncond", False, "A1111's Pad prompt/negative prompt (Pad conds; with "
                  "--prompt_syntax a1111): a prompt and negative prompt of different lengths, the "
                  "shorter goes on with empty-prompt chunks (else it attends to its own length)")
flags.DEFINE_bool("pad_cond_uncond_v0", False, "A1111's Pad conds v0 (its padding before 1.6): "
                  "the negative prompt fitted to the prompt's length, its last vector repeated, or "
                  "cut")
flags.DEFINE_bool("old_prompt_editing_timelines", False, "A1111's Old prompt editing timelines "
                  "(its counting before 1.6; --prompt_syntax a1111): in [a:b:when] a number below "
                  "1 is a fraction of the steps, any other a step; the hires pass schedules as "
                  "the first")
flags.DEFINE_enum("rng", "jax", list(sampling.RNGS), "where each image's noise comes from: "
                  "jax (its seed's JAX key), torch_cpu (its seed's torch CPU generator: the "
                  "images diffusers makes with generator=torch.Generator().manual_seed(seed), "
                  "and A1111's 'RNG: CPU' noise) or nv (A1111's 'RNG: NV' noise, which is "
                  "torch's CUDA generator's: A1111's default on NVIDIA GPUs)")
flags.DEFINE_enum("brownian", "off", ["off", "nv", "torch_cpu"], "the SDE samplers' (dpmpp_sde, "
                  "dpmpp_2m_sde, dpmpp_3m_sde...) step noise from k-diffusion's Brownian tree "
                  "seeded by each image's seed, as A1111, ComfyUI and diffusers make it, grown "
                  "with nv (a CUDA generator: A1111's on NVIDIA GPUs, ComfyUI's *_gpu samplers) or "
                  "torch_cpu (ComfyUI's other SDE samplers); off: fresh draws from --rng")
flags.DEFINE_enum("step_rng", "rng", ["rng", "nv", "torch_cpu"], "where the steps' fresh noise "
                  "(ancestral and SDE samplers') comes from: rng (--rng's), or a generator of its "
                  "own seeded by the image's seed, drawn from its first draw: nv (CUDA's, as "
                  "ComfyUI's ancestral samplers draw on an NVIDIA GPU) or torch_cpu")
flags.DEFINE_integer("noise_batch", 1, "ComfyUI's batches (with --rng torch_cpu): the images "
                     "in batches of this many from consecutive seeds, image k of a batch the "
                     "k-th slice of its seed's noise drawn for the whole batch at once, as "
                     "ComfyUI's batch_size; 1: one seed per image")
flags.DEFINE_integer("seed_high", 0, "the high 32 bits of the seeds (--seed gives the low ones; "
                     "ComfyUI's are 64-bit), for what takes a seed whole: the Brownian tree, "
                     "CUDA's generator (nv)")
flags.DEFINE_integer("batch_size", None, "images per device per step")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "network dtype")
flags.DEFINE_string("output_dir", "outputs", "where images, manifest.jsonl and grid.png go: a "
                    "folder or any fsspec URL (gs://bucket/run, s3://..., memory://...)")
flags.DEFINE_float("hires_scale", 0.0, "A1111's hires fix: enlarge the latents this many times "
                   "and denoise again (0: off)")
flags.DEFINE_integer("hires_steps", 0, "hires fix: steps of the second pass (0: --steps)")
flags.DEFINE_float("hires_strength", 0.7, "hires fix: the second pass's denoising strength")
flags.DEFINE_string("hires_upscaler", "latent",
                    "hires fix: A1111's latent upscalers (latent = Latent, bilinear; "
                    "latent-bicubic-antialiased = Latent (bicubic antialiased), ...), its pixel "
                    "ones lanczos, nearest and none (the decoded images resized as PIL does; "
                    "A1111's names, 'Lanczos', 'Latent (bicubic)', are taken too), or "
                    "an ESRGAN / Real-ESRGAN model: a .pth / .safetensors file, or its name in "
                    "--upscaler_dir ('R-ESRGAN 4x+', '4x-UltraSharp': A1111's names)")
flags.DEFINE_string("upscaler_dir", None, "folder of ESRGAN / Real-ESRGAN upscaler files "
                    "(A1111's models/ESRGAN, models/RealESRGAN) for --hires_upscaler names")
flags.DEFINE_integer("upscaler_tile", upscaling.DEFAULT_TILE, "model upscalers run in tiles of "
                     "this many pixels (A1111's 'Tile size for ESRGAN upscalers'; 0: whole)")
flags.DEFINE_integer("upscaler_tile_overlap", upscaling.DEFAULT_OVERLAP, "... overlapping by at "
                     "least this many (A1111's 'Tile overlap for ESRGAN upscalers')")
flags.DEFINE_integer("hires_resize_width", 0, "hires fix: enlarge to this width instead of "
                     "--hires_scale (A1111's Resize width to; 0: from the aspect)")
flags.DEFINE_integer("hires_resize_height", 0, "hires fix: enlarge to this height instead of "
                     "--hires_scale (both given at another aspect: cover, then cut)")
flags.DEFINE_string("hires_scheduler", None, "hires fix: the second pass's scheduler, one of "
                    "--scheduler's (A1111's Hires sampler; default: each image's)")
flags.DEFINE_string("hires_schedule_type", None, "hires fix: the second pass's schedule type, "
                    "as --schedule_type's, or 'Automatic' (the scheduler's own placement; A1111's "
                    "Hires schedule type; default: the first pass's)")
flags.DEFINE_float("hires_guidance_scale", 0.0, "hires fix: the second pass's guidance scale "
                   "(Forge's Hires CFG Scale; 0: each image's)")
flags.DEFINE_string("hires_prompt", "", "hires fix: the second pass's prompt (A1111's Hires "
                    "prompt; empty: each image's own; a jsonl line's hires_prompt wins)")
flags.DEFINE_string("hires_negative_prompt", "", "hires fix: the second pass's negative prompt "
                    "(empty: each image's own; a jsonl line's hires_negative_prompt wins)")
flags.DEFINE_string("hires_model", None, "hires fix: another model (folder, file or hub id, of "
                    "the same latents) for the second pass (A1111's Hires checkpoint); --vae, "
                    "--lora, --embedding and the ControlNets and IP-Adapters apply to it too")
flags.DEFINE_enum("output_format", "png", ["png", "webdataset"], "png: image files in folders, "
                  "or WebDataset tar shards (<key>.png + <key>.json)")
flags.DEFINE_integer("images_per_folder", 10000, "png: images per subfolder")
flags.DEFINE_enum("image_format", "png", ["png", "jpg", "webp"], "the image files (in folders "
                  "or tars); jpg and webp carry the A1111 parameters in EXIF, as A1111 saves them")
flags.DEFINE_enum("pixel_levels", "round", ["round", "floor"], "how pixels become 8-bit levels: "
                  "round (diffusers') or floor (A1111's and ComfyUI's: --parameters_file of "
                  "their images sets it)")
flags.DEFINE_integer("image_quality", 80, "jpg and lossy webp quality, 1-100 (A1111's default)")
flags.DEFINE_bool("webp_lossless", False, "webp: lossless (same pixels as png, smaller)")
flags.DEFINE_integer("shard_size", 1000, "images per shard: a webdataset tar; for png, the unit "
                     "of resume and of work split between processes and jobs")
flags.DEFINE_integer("num_shards", 1, "split the run into this many independent jobs (e.g. a "
                     "SLURM array) that share --output_dir")
flags.DEFINE_integer("shard_index", 0, "which of the --num_shards jobs this is: it makes the "
                     "shards s with s % num_shards == shard_index")
flags.DEFINE_integer("writer_threads", 8, "threads that encode and write images")
flags.DEFINE_string("safety_checker", None, "diffusers' safety checker: an SD1.x folder or hub "
                    "id with safety_checker/ (e.g. the --model's own), or a checker's folder or "
                    "hub id (CompVis/stable-diffusion-safety-checker); each record says nsfw")
flags.DEFINE_enum("nsfw_action", "black", ["black", "keep"], "what becomes of an image the "
                  "--safety_checker flags: black (written black, as diffusers returns it) or "
                  "keep (written as made; only its record says nsfw)")
flags.DEFINE_bool("overwrite", False, "replace a previous run with other settings in output_dir")
flags.DEFINE_bool("allow_pickle", True, "ignored (pickles are read without running code)")
flags.DEFINE_multi_string("controlnet", [], "a ControlNet or T2I-Adapter (diffusers folder or "
                          "hub id, or a single .safetensors/.pth file) steering each jsonl line "
                          "by its control_image (else --control_image); repeatable: the "
                          "residuals are summed, and a line's control_image lists one per "
                          "ControlNet")
flags.DEFINE_multi_string("controlnet_config", [], "per --controlnet, a single file's diffusers "
                          "config (folder or hub id; '' for none; default: the standard "
                          "SD1/SD2/SDXL one its weights show)")
flags.DEFINE_multi_string("control_type", [], "per --controlnet, a ControlNet union's control "
                          "type ('' for other ControlNets): openpose, depth, softedge, canny, "
                          "lineart, normal, segment, tile, repaint, ... or its index")
flags.DEFINE_multi_string("control_image", [], "per --controlnet, its image for lines without "
                          "their own (resized to the image size by --resize_mode)")
flags.DEFINE_multi_float("controlnet_scale", [1.0], "the weight of the ControlNet's residuals "
                         "(one for all, or one per --controlnet)")
flags.DEFINE_multi_float("control_guidance_start", [0.0], "the share of the steps after which "
                         "the ControlNet acts (one for all, or one per --controlnet)")
flags.DEFINE_multi_float("control_guidance_end", [1.0], "the share of the steps until which "
                         "the ControlNet acts (one for all, or one per --controlnet)")
flags.DEFINE_bool("controlnet_guess_mode", False, "diffusers' guess mode: the ControlNets act "
                  "on the conditional half of guidance only, residuals scaled 0.1 to 1")
flags.DEFINE_multi_string("control_mode", ["balanced"], "A1111's Control Mode (one for all, or "
                          "one per --controlnet): balanced, prompt ('My prompt is more "
                          "important') or controlnet ('ControlNet is more important')")
flags.DEFINE_float("pag_scale", 0.0, "perturbed-attention guidance (Forge's PAG, diffusers' PAG "
                   "pipelines): a third UNet pass per step with identity self-attention in "
                   "--pag_applied_layers, guided away from by this much; 0: off")
flags.DEFINE_float("pag_adaptive_scale", 0.0, "lower the PAG scale by this much per timestep "
                   "below 1000 (diffusers' pag_adaptive_scale; 0: constant)")
flags.DEFINE_multi_string("pag_applied_layers", ["mid"], "self-attention layers PAG perturbs: "
                          "regular expressions searched in their diffusers names (mid, "
                          "down_blocks.2, up_blocks.0.attentions.1, ...); repeatable")
flags.DEFINE_enum("tiling_axes", "xy", ["xy", "x", "y"], "with --tiling, the axes that wrap "
                  "(x alone: 360-degree panoramas)")
flags.DEFINE_bool("tiling", False, "A1111's Tiling: seamless images (the UNet's and the VAE's "
                  "convolutions pad circularly)")
flags.DEFINE_list("freeu", None, "FreeU as diffusers' enable_freeu: S1,S2,B1,B2 (SD1.5: "
                  "0.9,0.2,1.5,1.6; SDXL: 0.6,0.4,1.1,1.2)")
flags.DEFINE_enum("freeu_form", "diffusers", ["diffusers", "comfyui", "comfyui_v2"],
                  "--freeu as diffusers' enable_freeu (the first two up blocks), or as ComfyUI's "
                  "FreeU or FreeU_V2 node (every up-block layer whose input has 4 or 2 times the "
                  "UNet's first channels; V2 scaled by the channels' mean)")
flags.DEFINE_float("token_merging_ratio", 0.0, "A1111's Token merging ratio (ToMe SD): the "
                   "share of the full-resolution blocks' tokens their self-attention merges, "
                   "faster at large sizes, a slightly different image (0: off; below 1)")
flags.DEFINE_float("hires_token_merging_ratio", None, "hires fix: the second pass's token "
                   "merging ratio (A1111's Token merging ratio hr; default: "
                   "--token_merging_ratio)")
flags.DEFINE_multi_string("ip_adapter", [], "an IP-Adapter file (.bin/.safetensors, or hub "
                          "file) conditioning each jsonl line on its ip_adapter_image (else "
                          "--ip_adapter_image); repeatable, and a line's ip_adapter_image then "
                          "lists one per IP-Adapter")
flags.DEFINE_multi_string("ip_adapter_encoder", [], "per --ip_adapter, its CLIP image encoder "
                          "(folder, hub id or file; '' or default: the image_encoder/ folder "
                          "beside the file or above it)")
flags.DEFINE_multi_string("ip_adapter_image", [], "per --ip_adapter, its image for lines "
                          "without their own")
flags.DEFINE_multi_string("ip_adapter_mask", [], "per --ip_adapter, a mask image ('': none): "
                          "its image acts where the mask is white (diffusers' "
                          "ip_adapter_masks; resized to each image's size, cut at 0.5)")
flags.DEFINE_multi_string("ip_adapter_scale", ["1"], "the weight of the IP-Adapter's attention "
                          "(one for all, or one per --ip_adapter): a number, or InstantStyle's "
                          "per-layer weights as JSON, e.g. '{\"up\": {\"block_0\": [0, 1, "
                          "0]}}' (layers it leaves out: 0)")
flags.DEFINE_multi_string("lora", [], "LoRA file or hub file merged into the weights, "
                          "path[:scale] (repeatable; scale default 1)")
flags.DEFINE_multi_string("embedding", [], "textual-inversion file or hub file, path[:token] "
                          "(repeatable; token default: the file's stem)")
flags.DEFINE_string("compilation_cache", None, "persistent compilation cache folder "
                    "(default: ~/.cache/sdjax/jax; empty to disable)")
flags.DEFINE_integer("cpu_devices", None, "CPU-only hosts: split the CPU into this many devices "
                     "that each make their own images (0: one per core); faster for runs of "
                     "many images (default: one device)")
flags.DEFINE_bool("cfg_parallel", False, "each image's two guidance calls (uncond, cond) on two "
                  "devices: halves an image's time per step when images are fewer than devices "
                  "(pixels differ from the default's by float rounding)")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.DEFINE_string("refiner", None, "SDXL: refiner folder or hub id to finish each image")
flags.DEFINE_float("refiner_start", None, "SDXL: fraction of the schedule after which the "
                   "refiner takes over (default 0.8; diffusers' denoising_end), or a whole number "
                   "of steps (20: after the base's 20th step, as ComfyUI's KSamplerAdvanced pair)")
flags.DEFINE_enum("refiner_switch", "diffusers", ["diffusers", "a1111"], "SDXL: diffusers: the "
                  "base stops at --refiner_start's timestep cutoff and the refiner's sampler "
                  "starts afresh; a1111: AUTOMATIC1111's switch inside its sampler loop (from the "
                  "first call past the cutoff, the sampler's history and Brownian tree running "
                  "on)")
flags.DEFINE_string("hires_refiner", "second pass", "SDXL with the hires fix: which pass "
                    "--refiner finishes, as A1111's Hires refiner: 'second pass' (the hires pass), "
                    "'first pass' (the first, as without the hires fix; the base runs the hires "
                    "pass alone) or 'both passes' (or first / second / both)")
flags.DEFINE_list("original_size", None, "SDXL micro-conditioning: HEIGHT,WIDTH "
                  "(default: the output size)")
flags.DEFINE_list("crops_coords_top_left", ["0", "0"], "SDXL micro-conditioning: TOP,LEFT")
flags.DEFINE_list("target_size", None, "SDXL micro-conditioning: HEIGHT,WIDTH "
                  "(default: the output size)")
flags.DEFINE_list("negative_original_size", None, "SDXL micro-conditioning of the negative "
                  "prompt: HEIGHT,WIDTH (text-to-image: with --negative_target_size; default: "
                  "the positive's)")
flags.DEFINE_list("negative_crops_coords_top_left", ["0", "0"],
                  "SDXL micro-conditioning of the negative prompt: TOP,LEFT")
flags.DEFINE_list("negative_target_size", None, "SDXL micro-conditioning of the negative prompt: "
                  "HEIGHT,WIDTH")
flags.DEFINE_float("aesthetic_score", 6.0, "SDXL refiner: aesthetic score conditioning")
flags.DEFINE_float("negative_aesthetic_score", 2.5, "SDXL refiner: negative aesthetic score")
_CONFIG = config_flags.DEFINE_config_file("config", None, "a preset from configs/")

FLAGS = flags.FLAGS


def _run_config() -> run.RunConfig:
  # steps, guidance_scale, scheduler: None leaves them to the model (run.RunConfig).
  values = dict(batch_size=1, dtype="float32", eta=0.0, refiner_start=0.8, guidance_rescale=0.0)
  preset = _CONFIG.value
  if preset is None and FLAGS.model is None:
    from configs import builtin  # noqa: PLC0415

    preset = builtin.get_config()
  if preset is not None:
    values.update({k: v for k, v in preset.items() if k in _OVERRIDABLE})
  values.update({k: FLAGS[k].value for k in _OVERRIDABLE if FLAGS[k].present})
  if values["refiner_start"] >= 1 and float(values["refiner_start"]).is_integer():
    values["refiner_start"] = int(values["refiner_start"])  # a number of steps
  options = _scheduler_options()
  values["scheduler"] = _scheduler_name(values.get("scheduler"), "--scheduler")
  if not FLAGS["steps"].present:  # a list of sigmas or timesteps says how many steps
    for key, extra in (("sigmas", 1), ("timesteps", 0)):
      if FLAGS[key].value is not None:
        values["steps"] = len(dict(options)[key]) - extra
  return run.RunConfig(
      prompts=_prompt_lines(), prompts_file=FLAGS.prompts_file,
      negative_prompt=FLAGS.negative_prompt, prompt_syntax=FLAGS.prompt_syntax,
      prompt_2=FLAGS.prompt_2, negative_prompt_2=FLAGS.negative_prompt_2,
      dynamic_prompts=FLAGS.dynamic_prompts, wildcards_dir=FLAGS.wildcards_dir,
      styles_file=FLAGS.styles_file, styles=tuple(FLAGS.style), clip_skip=FLAGS.clip_skip,
      max_generations=FLAGS.max_generations,
      lora_dir=FLAGS.lora_dir, emphasis=FLAGS.emphasis, strength=FLAGS.strength,
      noise_multiplier=FLAGS.noise_multiplier, extra_noise=FLAGS.extra_noise,
      image_guidance_scale=FLAGS.image_guidance_scale, noise_level=FLAGS.noise_level,
      resize_mode=FLAGS.resize_mode, mask_blur=FLAGS.mask_blur,
      inpaint_full_res=FLAGS.inpaint_full_res,
      inpaint_full_res_padding=FLAGS.inpaint_full_res_padding,
      inpainting_mask_invert=FLAGS.inpainting_mask_invert,
      inpainting_fill=FLAGS.inpainting_fill.replace("_", " "),
      inpainting_mask_weight=FLAGS.inpainting_mask_weight, inpaint_blend=FLAGS.inpaint_blend,
      image_encode=FLAGS.image_encode, grow_mask_by=FLAGS.grow_mask_by,
      soft_inpainting=_soft_inpainting(), differential_diffusion=FLAGS.differential_diffusion,
      comfyui_composite=FLAGS.comfyui_composite,
      controlnet=tuple(FLAGS.controlnet), controlnet_config=tuple(FLAGS.controlnet_config),
      control_image=tuple(FLAGS.control_image), control_type=tuple(FLAGS.control_type),
      pag_scale=FLAGS.pag_scale, pag_adaptive_scale=FLAGS.pag_adaptive_scale,
      pag_applied_layers=tuple(FLAGS.pag_applied_layers), freeu=_freeu(),
      freeu_form=FLAGS.freeu_form, guidance_rescale_form=FLAGS.guidance_rescale_form,
      token_merging_ratio=FLAGS.token_merging_ratio,
      hires_token_merging_ratio=FLAGS.hires_token_merging_ratio,
      tiling=FLAGS.tiling_axes if FLAGS.tiling else False,
      controlnet_scale=tuple(FLAGS.controlnet_scale), control_mode=tuple(FLAGS.control_mode),
      control_guidance_start=tuple(FLAGS.control_guidance_start),
      control_guidance_end=tuple(FLAGS.control_guidance_end),
      controlnet_guess_mode=FLAGS.controlnet_guess_mode,
      ip_adapter=tuple(FLAGS.ip_adapter), ip_adapter_encoder=tuple(FLAGS.ip_adapter_encoder),
      ip_adapter_image=tuple(FLAGS.ip_adapter_image),
      ip_adapter_mask=tuple(FLAGS.ip_adapter_mask),
      ip_adapter_scale=tuple(FLAGS.ip_adapter_scale),
      num_images_per_prompt=FLAGS.num_images_per_prompt, seed=FLAGS.seed, rng=FLAGS.rng,
      brownian=None if FLAGS.brownian == "off" else FLAGS.brownian,
      step_rng=None if FLAGS.step_rng == "rng" else FLAGS.step_rng, seed_high=FLAGS.seed_high,
      noise_batch=FLAGS.noise_batch, subseed=FLAGS.subseed,
      subseed_strength=FLAGS.subseed_strength, ensd=FLAGS.ensd,
      s_min_uncond=FLAGS.s_min_uncond, s_min_uncond_all=FLAGS.s_min_uncond_all,
      skip_early_cond=FLAGS.skip_early_cond, pad_cond_uncond=FLAGS.pad_cond_uncond,
      pad_cond_uncond_v0=FLAGS.pad_cond_uncond_v0,
      old_prompt_editing_timelines=FLAGS.old_prompt_editing_timelines,
      seed_resize_from_w=FLAGS.seed_resize_from_w, seed_resize_from_h=FLAGS.seed_resize_from_h,
      output_dir=FLAGS.output_dir, output_format=FLAGS.output_format,
      images_per_folder=FLAGS.images_per_folder, image_format=FLAGS.image_format,
      pixel_levels=FLAGS.pixel_levels,
      image_quality=FLAGS.image_quality, webp_lossless=FLAGS.webp_lossless,
      hires_scale=FLAGS.hires_scale, hires_steps=FLAGS.hires_steps,
      hires_strength=FLAGS.hires_strength,
      hires_upscaler=sampling.hires_upscaler_key(FLAGS.hires_upscaler),
      upscaler_dir=FLAGS.upscaler_dir, upscaler_tile=FLAGS.upscaler_tile,
      upscaler_tile_overlap=FLAGS.upscaler_tile_overlap,
      hires_resize_width=FLAGS.hires_resize_width,
      hires_resize_height=FLAGS.hires_resize_height,
      hires_scheduler=_scheduler_name(FLAGS.hires_scheduler, "--hires_scheduler"),
      hires_prompt=FLAGS.hires_prompt, hires_negative_prompt=FLAGS.hires_negative_prompt,
      hires_guidance_scale=FLAGS.hires_guidance_scale,
      hires_schedule_type=_hires_schedule_type(),
      hires_model=FLAGS.hires_model,
      shard_size=FLAGS.shard_size,
      num_shards=FLAGS.num_shards, shard_index=FLAGS.shard_index,
      writer_threads=FLAGS.writer_threads, overwrite=FLAGS.overwrite,
      safety_checker=FLAGS.safety_checker, nsfw_action=FLAGS.nsfw_action,
      model_config=FLAGS.model_config, vae=FLAGS.vae, prediction_type=FLAGS.prediction_type,
      compilation_cache=FLAGS.compilation_cache,
      coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id, cpu_devices=FLAGS.cpu_devices,
      cfg_parallel=FLAGS.cfg_parallel,
      loras=tuple(run.parse_path_arg(s, float, 1.0) for s in FLAGS.lora),
      embeddings=tuple(run.parse_path_arg(s, str, None, "--embedding", "token")
                       for s in FLAGS.embedding)
      + (run.embeddings_in_dir(FLAGS.embeddings_dir) if FLAGS.embeddings_dir else ()),
      micro=_micro_conditioning(), scheduler_options=options,
      refiner_switch=FLAGS.refiner_switch, hires_refiner=_hires_refiner(), **values)


def _prompt_lines() -> tuple[run.PromptLine, ...]:
  """--prompt's lines, with --init_image, --mask_image and --depth_image (a local path made
  absolute)."""
  init, mask, depth = (None if path is None else path if "://" in path else
                       os.path.abspath(os.path.expanduser(path))
                       for path in (FLAGS.init_image, FLAGS.mask_image, FLAGS.depth_image))
  if mask is not None and init is None:
    raise run.RunError("--mask_image marks what to repaint in --init_image: give both")
  if depth is not None and init is None:
    raise run.RunError("--depth_image is the depth map of --init_image: give both")
  if init is not None and not FLAGS.prompt:
    raise run.RunError("--init_image, --mask_image and --depth_image are --prompt's: a prompts "
                       "file's lines give their own (jsonl init_image, mask_image, depth_image)")
  return tuple(run.PromptLine(p, init_image=init, mask_image=mask, depth_image=depth)
               for p in FLAGS.prompt)


def _apply_parameters_file() -> infotext.Reproduction | None:
  """Sets the flags not given on the command line as --parameters_file's text asks; says on
  stderr what they cannot reproduce. The prompts (and the hires fix's) are the file's only when
  neither --prompt nor --prompts_file is given; its model only when neither --model nor the
  --config preset names one."""
  path = FLAGS.parameters_file
  if path is None:
    return None
  try:
    text = infotext.read_parameters_file(path)
  except (OSError, ImportError, ValueError) as e:
    raise run.RunError(f"--parameters_file: cannot read {path} "
                       f"({getattr(e, 'strerror', None) or e})") from None
  if text is None:
    raise run.RunError(f"--parameters_file {path} holds no A1111 parameters and no ComfyUI "
                       "workflow (A1111, Forge and sdjax write them into PNG, JPEG and WebP "
                       "images, ComfyUI into its PNGs)")
  try:
    found = infotext.reproduce(text)
  except ValueError as e:
    raise run.RunError(f"--parameters_file {path}: {e}") from None
  given = {name for name in found.flags if FLAGS[name].present}
  if FLAGS["prompt"].present or FLAGS["prompts_file"].present:
    given |= {"prompt", "negative_prompt", "hires_prompt", "hires_negative_prompt", "prompt_2",
              "negative_prompt_2"}
  if _CONFIG.value is not None and _CONFIG.value.get("model") is not None:
    given.add("model")
  applied = {name: value for name, value in found.flags.items() if name not in given}
  for models, settings in (("controlnet", infotext.CONTROLNET_FLAGS),
                           ("ip_adapter", infotext.IP_ADAPTER_FLAGS)):
    if not FLAGS[models].present:  # their settings go with the models, which a note names
      applied = {name: value for name, value in applied.items() if name not in settings}
  settled = {flag for flag, _ in found.notes if flag is not None and FLAGS[flag].present}
  for name, value in applied.items():
    try:
      FLAGS[name].parse(value)
    except flags.Error as e:
      raise run.RunError(f"--parameters_file {path}: --{name}: {e}") from None
  logging.info("--parameters_file %s: %s", path, shlex.join(
      f"--{name}={v}" for name, value in applied.items()
      for v in (value if isinstance(value, list) else [value])))
  for flag, note in found.notes:  # the user's own flag settles what its note is about
    if flag not in settled:
      print(f"warning: {path}: {note}", file=sys.stderr)
  upscaler = applied.get("hires_upscaler")
  if upscaler is not None and sampling.hires_upscaler_key(upscaler) not in (
      sampling.HIRES_UPSCALER_NAMES) and (
      upscaling.find_upscaler_file(upscaler, FLAGS.upscaler_dir) is None):
    FLAGS["hires_upscaler"].parse("latent")
    where = f"in --upscaler_dir {FLAGS.upscaler_dir}" if FLAGS.upscaler_dir else (
        "(give --upscaler_dir, the folder of its file)")
    print(f"warning: {path}: Hires upscaler: {upscaler} is an upscaler model, not found "
          f"{where}: Latent is used", file=sys.stderr)
  if "hires_refiner" in applied and FLAGS.refiner is None:  # its refiner, a note: not given
    FLAGS["hires_refiner"].parse(run.RunConfig.hires_refiner)
    del applied["hires_refiner"]
  return dataclasses.replace(found, flags=applied)


def _check_reproduction(cfg: run.RunConfig, found: infotext.Reproduction) -> run.RunConfig:
  """Warns when the model's short hash is not the image's; a Clip skip from the file is read
  as A1111 reads it (an SDXL model ignores it)."""
  # A model given as a path (not one the file names, nor the built-in one a note says it is not;
  # a hub id's weights are only found once it is loaded).
  if found.model_hash and cfg.model is not None and os.path.exists(os.path.expanduser(cfg.model)):
    name, short = run.model_identity(cfg.model)
    if short is not None and short != found.model_hash:
      print(f"warning: {FLAGS.parameters_file}: made with a model whose hash is "
            f"{found.model_hash}; {name}'s is {short}: expect other pixels", file=sys.stderr)
  if "clip_skip" in found.flags:
    cfg = dataclasses.replace(cfg, sdxl_ignores_clip_skip=True)
  return cfg


def _hires_schedule_type() -> str | None:
  """--hires_schedule_type as sdjax's name ("": A1111's Automatic, the scheduler's own)."""
  if FLAGS.hires_schedule_type is None:
    return None
  try:
    return outputs.schedule_type_options(FLAGS.hires_schedule_type).get("schedule_type", "")
  except ValueError as e:
    raise run.RunError(f"--hires_schedule_type: {e}") from None


def _hires_refiner() -> str:
  try:
    return sampling.hires_refiner_pass(FLAGS.hires_refiner)
  except ValueError as e:
    raise run.RunError(f"--hires_refiner: {e}") from None


def _scheduler_name(name: str | None, flag: str) -> str | None:
  """sdjax's name for a scheduler flag's value, which may be A1111's ("DPM++ 2M Karras")."""
  if name is None:
    return None
  try:
    return outputs.scheduler_name(name)
  except ValueError as e:
    raise run.RunError(f"{flag} {name!r} {e}") from None


def _scheduler_options() -> tuple[tuple[str, Any], ...]:
  """--scheduler_options, with what --schedule_type, --sigmas and --timesteps set."""
  options = {}
  if FLAGS.scheduler_options is not None:
    try:
      options = json.loads(FLAGS.scheduler_options)
    except json.JSONDecodeError as e:
      raise run.RunError(f"--scheduler_options is not JSON ({e}): "
                         f"{FLAGS.scheduler_options}") from None
    if not isinstance(options, dict):
      raise run.RunError(f"--scheduler_options must be a JSON object {{\"option\": value}}, "
                         f"got {FLAGS.scheduler_options}")
  extra = {}
  if FLAGS.schedule_type is not None:
    try:
      extra = outputs.schedule_type_options(FLAGS.schedule_type)
    except ValueError as e:
      raise run.RunError(f"--schedule_type: {e}") from None
  for key in ("sigmas", "timesteps"):
    if FLAGS[key].value is not None:
      try:
        extra[key] = [float(x) for x in FLAGS[key].value]
      except ValueError:
        raise run.RunError(f"--{key} must be numbers separated by commas, got "
                           f"{','.join(FLAGS[key].value)}") from None
  if clash := sorted(set(extra) & set(options)):
    raise run.RunError(f"--scheduler_options sets {', '.join(clash)}, which --schedule_type, "
                       "--sigmas or --timesteps sets too: give it once")
  return tuple(sorted({**options, **extra}.items()))


def _pair(name: str):
  value = FLAGS[name].value
  if value is None:
    return None
  try:
    pair = tuple(int(v) for v in value)
  except ValueError:
    pair = ()
  if len(pair) != 2:
    raise run.RunError(f"--{name} must be two integers A,B, got {','.join(value)}")
  return pair


def _soft_inpainting():
  try:
    soft = masks.soft_inpainting(FLAGS.soft_inpainting)
  except ValueError as e:
    raise run.RunError(f"--soft_inpainting: {e}") from None
  return None if soft is None else dataclasses.astuple(soft)


def _freeu():
  try:
    return sampling.freeu_factors(FLAGS.freeu)
  except ValueError as e:
    raise run.RunError(f"--freeu: {e}") from None


def _micro_conditioning() -> MicroConditioning:
  return MicroConditioning(
      original_size=_pair("original_size"), crops_coords_top_left=_pair("crops_coords_top_left"),
      target_size=_pair("target_size"), negative_original_size=_pair("negative_original_size"),
      negative_crops_coords_top_left=_pair("negative_crops_coords_top_left"),
      negative_target_size=_pair("negative_target_size"), aesthetic_score=FLAGS.aesthetic_score,
      negative_aesthetic_score=FLAGS.negative_aesthetic_score)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    # Warnings and errors only: no backend probing noise, one progress bar. -v 0 for info lines.
    logging.set_verbosity(logging.WARNING)
  try:
    from_file = _apply_parameters_file()
    cfg = _run_config()
    if from_file:
      cfg = _check_reproduction(cfg, from_file)
    summary = run.generate_run(cfg)
  except (ValueError, OSError) as e:  # every bad-input error sdjax raises is a ValueError
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("aborted: finished images are kept; rerun the same command to finish", file=sys.stderr)
    sys.exit(130)
  print(f"{summary.images} images in {summary.seconds:.1f} s ({summary.images_per_second:.2f} "
        f"images/s, compile {summary.compile_seconds:.1f} s); {summary.skipped} already done",
        file=sys.stderr)
  if not summary.merged and not summary.interrupted and FLAGS.num_shards > 1:
    print("other jobs' shards are not finished yet: the last job to finish writes "
          "manifest.jsonl, index.html and grid.png", file=sys.stderr)
  if summary.interrupted:  # 128 + the signal, as a shell reports it (another process's: 130)
    why = "" if summary.stop_signal else " (on another process of the run)"
    print(f"interrupted{why}: rerun the same command to finish", file=sys.stderr)
    sys.exit(128 + (summary.stop_signal or signal.SIGINT))


if __name__ == "__main__":
  app.run(main)
