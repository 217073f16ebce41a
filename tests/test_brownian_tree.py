"""k-diffusion's Brownian-tree noise on device (`sdjax.brownian_tree`, generate(brownian=...)).

The SeedSequence words against numpy's; the tree's answers against torchsde's own
`BrownianTree` (with torch's CPU generator, and with A1111's NV arithmetic standing in for CUDA's
generator) over the query patterns the SDE samplers make; generate() against diffusers'
DPMSolverSDEScheduler (its own torchsde tree, seeded per image) and its DPM-Solver++ SDE given
the tree's answers, text-to-image and img2img.
"""

from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
import torchsde
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from parity import reference_pipelines
from test_nv_rng import a1111_nv

from sdjax import brownian_tree

torch.set_num_threads(1)
SHAPE = (3, 2, 4)  # h, w, C: 24 values a draw (torch's vectorised randn takes >= 16)
PROMPTS = ["a red circle", "a cat"]


def rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("entropy", [0, 1, 31337, 2**32 - 1, 2**32 + 5, 2**63 + 12345])
@pytest.mark.parametrize("spawn_key", [None, (0, 0), (1, 1), (5, 3), (2**23 + 77, 24)])
def test_seed_sequence_is_numpys(entropy, spawn_key):
  want = np.random.SeedSequence(entropy, spawn_key=spawn_key or (), pool_size=24)
  got = brownian_tree.seed_sequence_words(
      np.uint32(entropy & 0xFFFFFFFF), np.uint32(entropy >> 32),
      None if spawn_key is None else np.asarray(spawn_key, np.uint32), 4)
  np.testing.assert_array_equal(np.asarray(got), want.generate_state(4))


def _karras(n, sigma_min=0.0292, sigma_max=14.6146, rho=7.0):
  ramp = np.linspace(0, 1, n)
  hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
  return ((hi + ramp * (lo - hi)) ** rho).astype(np.float32)


def _dpmpp_sde_queries(sigmas):
  """(sigma, sigma_mid) and (sigma, sigma_next) per step, as k-diffusion's DPM++ SDE asks."""
  t = -np.log(sigmas)
  mid = np.exp(-(t[:-1] + (t[1:] - t[:-1]) * np.float32(0.5))).astype(np.float32)
  queries = []
  for i in range(len(sigmas) - 1):
    queries += [(sigmas[i], mid[i]), (sigmas[i], sigmas[i + 1])]
  return queries


QUERIES = {
    "2m_sde": lambda s: [(s[i], s[i + 1]) for i in range(len(s) - 1)],
    "sde": _dpmpp_sde_queries,
    # past the ends (clamped), ascending, empty (0 / 0: NaN, as k-diffusion's), reversed, the
    # whole range
    "odd": lambda s: [(s[0] * 1.01, s[2]), (s[3], s[1]), (s[2], s[2]), (s[1], s[3]),
                      (s[-1], s[0]), (s[-1] * 0.5, s[4])],
}


def _torchsde_answers(sigmas, queries, seed, randn=None):
  """k-diffusion's noise sampler over torchsde's tree (its `_randn` replaced by `randn`)."""
  x = torch.zeros(SHAPE[2], SHAPE[0], SHAPE[1])  # C, h, w
  module = "torchsde._brownian.brownian_interval._randn"
  with mock.patch(module, randn) if randn else mock.MagicMock():
    sampler = BrownianTreeNoiseSampler(x, float(sigmas.min()), float(sigmas.max()), seed=seed)
    out = [sampler(torch.tensor(a), torch.tensor(b)).numpy() for a, b in queries]
  return np.stack(out).transpose(0, 2, 3, 1)  # queries, h, w, C


def _nv_randn(size, dtype, device, seed):
  del dtype, device
  return torch.from_numpy(a1111_nv(int(seed), 1, int(np.prod(size)))[0].reshape(size))


@pytest.mark.parametrize("pattern", list(QUERIES))
@pytest.mark.parametrize("generator", brownian_tree.GENERATORS)
def test_answers_are_torchsdes(pattern, generator):
  """Three images' trees (seeds 7, 2**32 - 3 and a 64-bit one, as ComfyUI's) answer as
  torchsde's, to float32 rounding (torch's and XLA's log / sin / cos differ by an ulp at most)."""
  sigmas = _karras(8)
  queries = QUERIES[pattern](sigmas)
  tree = brownian_tree.plan(sigmas.min(), sigmas.max(), queries)
  seeds = [7, 2**32 - 3, (5 << 32) + 9]
  low, high = (np.asarray([s & 0xFFFFFFFF for s in seeds], np.uint32),
               np.asarray([s >> 32 for s in seeds], np.uint32))
  got = np.asarray(brownian_tree.increments(tree, generator, low, SHAPE, high))
  assert got.shape == (3, len(queries), *SHAPE)
  for image, seed in enumerate(seeds):
    want = _torchsde_answers(sigmas, queries, seed, _nv_randn if generator == "nv" else None)
    np.testing.assert_allclose(got[image], want, rtol=0, atol=2e-6)
    assert np.nanmax(np.abs(want)) > 1
  if pattern == "odd":
    assert np.isnan(got[:, 2]).all() and np.abs(got[:, 1] + got[:, 3]).max() == 0


def test_levels_closer_than_the_resolution_are_refused():
  """torchsde recurses without end on a call whose ends differ but round alike."""
  a = np.float32(2.5)
  with pytest.raises(ValueError, match="closer than the Brownian tree's resolution"):
    brownian_tree.plan(0.03, 14.6, [(a, np.nextafter(a, np.float32(9)))])


def test_plan_reuses_slots():
  """A 30-step DPM++ SDE run: some 2,000 tree ops in a few dozen value slots."""
  tree = brownian_tree.plan(*_karras(30)[[-1, 0]], _dpmpp_sde_queries(_karras(30)))
  assert len(tree.ops) > 1000 and tree.slots < 80
  assert tree.queries == 58 and len(tree.spawn) == len(set(tree.spawn))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  ref, pipe, _ = reference_pipelines(tmp_path_factory, "brownian", seed=8)
  return ref, pipe


def _generators(seeds):
  return [torch.Generator().manual_seed(s) for s in seeds]


def test_dpmpp_sde_is_diffusers_with_its_tree(sd):
  """dpmpp_sde with brownian="torch_cpu" (and rng="torch_cpu" for the initial noise): diffusers'
  DPMSolverSDEScheduler whose noise sampler is seeded by the images' seeds (a list: one tree
  each, as A1111 seeds them), text-to-image and img2img (whose tree spans the whole schedule and
  answers from the first step run), also for seeds past 32 bits; sdjax's own noise differs."""
  ref, pipe = sd
  seeds = [40, 41]
  ref.scheduler = diffusers.DPMSolverSDEScheduler.from_config(
      pipe.scheduler_config, use_karras_sigmas=True, noise_sampler_seed=seeds)
  common = dict(guidance_scale=3.0, height=32, width=32)
  expected = ref(PROMPTS, num_inference_steps=4, generator=_generators(seeds),
                 output_type="np", **common).images
  ours = dict(steps=4, scheduler="dpmpp_sde_karras", seed=40, rng="torch_cpu", **common)
  got = pipe.generate(PROMPTS, brownian="torch_cpu", **ours)
  err = rel(got, expected)
  print(f"\ndpmpp_sde, Brownian tree: rel err {err:.2e}")
  assert err <= 1e-5
  assert rel(pipe.generate(PROMPTS, **ours), expected) > 1e-2
  assert rel(pipe.generate(PROMPTS, brownian="nv", **ours), expected) > 1e-2

  img_pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
  img_pipe.set_progress_bar_config(disable=True)
  images = np.random.default_rng(3).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  expected = img_pipe(PROMPTS, image=images, strength=0.6, num_inference_steps=5,
                      generator=_generators(seeds), output_type="np", **common).images
  got = pipe.generate(PROMPTS, init_images=images, strength=0.6, brownian="torch_cpu",
                      **{**ours, "steps": 5})
  err = rel(got, expected)
  print(f"img2img dpmpp_sde, Brownian tree: rel err {err:.2e}")
  assert err <= 1e-5
  # ComfyUI's 64-bit seeds: the generators take the low words, the trees the whole seeds
  ref.scheduler = diffusers.DPMSolverSDEScheduler.from_config(
      pipe.scheduler_config, use_karras_sigmas=True,
      noise_sampler_seed=[(3 << 32) + s for s in seeds])
  expected = ref(PROMPTS, num_inference_steps=4, generator=_generators(seeds),
                 output_type="np", **common).images
  got = pipe.generate(PROMPTS, brownian="torch_cpu", seed_high=3, **ours)
  assert rel(got, expected) <= 1e-5


def test_dpmpp_2m_sde_takes_the_trees_answers(sd):
  """dpmpp_2m_sde (diffusers' form) with brownian="nv": diffusers' DPM-Solver++ SDE given, at
  each step, k-diffusion's noise sampler's answer for (sigma_i, sigma_i+1) over one tree per
  image drawing A1111's NV (CUDA's) normals; the last step (to 0) adds none."""
  ref, pipe = sd
  seeds = [7, 8]
  ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
      pipe.scheduler_config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
  common = dict(guidance_scale=3.0, height=32, width=32)
  steps = 4
  ref.scheduler.set_timesteps(steps)
  sigmas = ref.scheduler.sigmas.numpy()
  with mock.patch("torchsde._brownian.brownian_interval._randn", _nv_randn):
    latents = torch.zeros(2, 4, 32 // pipe.vae_scale, 32 // pipe.vae_scale)
    sampler = BrownianTreeNoiseSampler(latents, float(sigmas[sigmas > 0].min()),
                                       float(sigmas.max()), seed=seeds)
    answers = [sampler(torch.tensor(sigmas[i]), torch.tensor(sigmas[i + 1]))
               for i in range(steps - 1)] + [torch.zeros_like(latents)]
  calls = iter(answers)
  module = "diffusers.schedulers.scheduling_dpmsolver_multistep"
  with mock.patch(f"{module}.randn_tensor", lambda *a, **k: next(calls)), torch.no_grad():
    expected = ref(PROMPTS, num_inference_steps=steps, generator=_generators(seeds),
                   output_type="np", **common).images
  got = pipe.generate(PROMPTS, steps=steps, scheduler="dpmpp_2m_sde_karras", seed=7,
                      rng="torch_cpu", brownian="nv", **common)
  err = rel(got, expected)
  print(f"\ndpmpp_2m_sde, NV Brownian tree: rel err {err:.2e}")
  assert err <= 1e-5


def test_each_image_has_its_own_tree(sd):
  _, pipe = sd
  common = dict(steps=3, scheduler="dpmpp_2m_sde", guidance_scale=3.0, height=32, width=32,
                brownian="torch_cpu")
  batch = pipe.generate(PROMPTS, seed=50, **common)
  alone = pipe.generate(PROMPTS[1], seed=51, **common)
  np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"scheduler": "euler_ancestral", "brownian": "nv"}, "'euler_ancestral' adds no Brownian"),
    ({"scheduler": "dpmpp_2m", "brownian": "nv"}, "'dpmpp_2m' adds no Brownian"),
    ({"scheduler": "dpmpp_sde", "brownian": "cuda"}, "unknown Brownian tree generator 'cuda'"),
])
def test_bad_brownian(sd, kwargs, match):
  _, pipe = sd
  with pytest.raises(ValueError, match=match):
    pipe.generate(PROMPTS[:1], steps=2, height=32, width=32, **kwargs)


def test_torchsde_is_the_reference():
  """The reference's tree is torchsde's, with tol 1e-6 and pool size 24 (what this module
  restates)."""
  sampler = BrownianTreeNoiseSampler(torch.zeros(4), 0.1, 10.0, seed=3)
  interval = sampler.tree.trees[0]
  assert isinstance(interval, torchsde.BrownianInterval) and interval.halfway_tree
  assert (interval.tol, interval.pool_size) == (brownian_tree.TOL, brownian_tree.POOL_SIZE)


def test_run_with_brownian(sd, tmp_path):
  """main.py --brownian: generate()'s image; run.json, the manifest and the PNG (sdjax's
  `Brownian noise` field, in A1111's RNG words) name it and the PNG's text gives it back; a
  --scheduler without Brownian noise is a one-line error."""
  import dataclasses  # noqa: PLC0415
  import json  # noqa: PLC0415

  from parity import one_image_run  # noqa: PLC0415

  from sdjax import infotext, outputs, run  # noqa: PLC0415

  _, pipe = sd
  cfg, record, png, kw = one_image_run(pipe, tmp_path / "out", scheduler="dpmpp_2m_sde_karras",
                                       height=32, width=32, brownian="nv")
  expected = pipe.generate("a cat", brownian="nv", **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  assert record["brownian"] == "nv"
  assert json.load(open(tmp_path / "out" / "run.json"))["brownian"] == "nv"
  assert outputs.parse_a1111_parameters(png.text["parameters"])["Brownian noise"] == "NV"
  assert infotext.reproduce(png.text["parameters"]).flags["brownian"] == "nv"
  with pytest.raises(run.RunError, match="--brownian: scheduler 'euler' adds no Brownian"):
    run.generate_run(dataclasses.replace(cfg, scheduler="euler",
                                         output_dir=str(tmp_path / "bad")))
