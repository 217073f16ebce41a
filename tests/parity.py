"""Helpers for parity tests: layout changes at the edge, weight transfer, the error measure."""

from __future__ import annotations

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sdjax.checkpoints.weights import torch_to_flax

TOL = 1e-5  # relative error ||ours - ref|| / ||ref|| in float32


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_close(ours, ref, tol: float = TOL) -> float:
  assert np.shape(ours) == np.shape(ref), (np.shape(ours), np.shape(ref))
  err = rel_err(ours, ref)
  assert err <= tol, f"relative error {err:.3g} > {tol:.0e}"
  return err


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def transfer(torch_module, flax_module, *example_inputs, method=None, **example_kwargs):
  """Converts a PyTorch module's weights into params for `flax_module` (strictly)."""
  expected = jax.eval_shape(
      lambda: flax_module.init(jax.random.key(0), *example_inputs, method=method,
                               **example_kwargs)
  )["params"]
  return torch_to_flax(state_dict(torch_module), expected, type(flax_module).__name__)


def randn(*shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@contextlib.contextmanager
def img2img_draws(module: str, seed: int, latent_shape, noise, mode: bool = False):
  """diffusers' img2img pipeline in `module` given our draws: the VAE posterior sample from each
  image's key (as `generate(init_images=..., seed=seed)` draws it; `mode`: the posterior's mode,
  as generate(image_encode="mode")) and `noise` [B, h, w, 4]."""
  from sdjax import sampling  # noqa: PLC0415

  keys = sampling.image_keys(jnp.asarray(sampling.make_seeds(seed, len(noise))))
  post_eps = nchw(np.asarray(sampling._keyed_noise(keys, sampling._POSTERIOR, latent_shape)))  # noqa: SLF001

  def retrieve_latents(encoder_output, generator=None, sample_mode="sample"):
    dist = encoder_output.latent_dist
    return dist.mode() if mode else dist.mean + dist.std * post_eps

  with mock.patch(f"{module}.retrieve_latents", retrieve_latents), \
       mock.patch(f"{module}.randn_tensor", lambda *a, **k: nchw(noise)), torch.no_grad():
    yield


def reference_pipelines(tmp_path_factory, name: str, seed: int, family: str = "sd1"):
  """(diffusers pipeline, sdjax pipeline, folder) of one tiny random model written to disk."""
  import diffusers  # noqa: PLC0415

  import sdjax  # noqa: PLC0415
  from sdjax import testing  # noqa: PLC0415

  folder = str(tmp_path_factory.mktemp(name) / "pipe")
  testing.write_torch_pipeline(folder, family, seed=seed)
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  return ref, sdjax.load_pipeline(folder), folder


def single_file_round_trip(ref, pipe, folder: str, config: str, tmp_path, **components) -> None:
  """`pipe` (diffusers' `ref` of the same weights, saved in `folder`) written as one
  original-layout file loads with a text-to-image model's `config` (the weights say the UNet's
  input channels) with the same weights, as diffusers' `from_single_file` reads the file with
  the pipeline's own config; a folder sdjax writes loads as `ref`'s pipeline class (diffusers
  given `components`, e.g. None for a depth estimator)."""
  import diffusers  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  import sdjax  # noqa: PLC0415

  channels, cls = ref.unet.config.in_channels, type(ref)
  path = str(tmp_path / "model.safetensors")
  pipe.save_single_file(path)
  assert load_file(path)["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == channels
  loaded = sdjax.load_pipeline(path, config=config)
  assert loaded.unet.config.in_channels == channels
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(pipe.params), strict=True):
    np.testing.assert_array_equal(a, b)
  if hasattr(cls, "from_single_file"):  # (not the depth pipeline's)
    theirs = cls.from_single_file(path, config=folder, local_files_only=True,
                                  **(components or {"safety_checker": None}))
    for name, tensor in ref.unet.state_dict().items():
      assert torch.equal(theirs.unet.state_dict()[name], tensor), name
  out = str(tmp_path / "folder")
  pipe.save_pretrained(out)
  assert cls.from_pretrained(out, **components).unet.config.in_channels == channels
  assert type(diffusers.DiffusionPipeline.from_pretrained(out, **components)) is cls


def one_image_run(pipe, out, **options):
  """A run of one prompt, "a cat" (3 euler steps at guidance 3, 16x16, seed 2, unless
  `options` say otherwise), into folder `out`: (its RunConfig, its manifest record, its PNG,
  the generate() arguments that make the same image but for the feature under test)."""
  import json  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415

  from sdjax import outputs, run  # noqa: PLC0415

  settings = {"steps": 3, "guidance_scale": 3.0, "scheduler": "euler", "height": 16,
              "width": 16, "seed": 2, **{k: options.pop(k) for k in
                                          ("steps", "guidance_scale", "scheduler", "height",
                                           "width", "seed") if k in options}}
  cfg = run.RunConfig(model=pipe.name, prompts=(run.PromptLine("a cat"),), batch_size=1,
                      output_dir=str(out), compilation_cache="", show_progress=False,
                      **settings, **options)
  assert run.generate_run(cfg).images == 1
  record = json.loads(open(f"{out}/{outputs.MANIFEST_NAME}").readline())
  png = Image.open(f"{out}/{record['file']}")
  return cfg, record, png, {**settings, "seed": record["seed"]}
