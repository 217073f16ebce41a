"""Token merging (ToMe SD as A1111 applies it: tomesd's apply_patch with use_rand=False, only the
self-attention merged, 2 x 2 strides, full resolution) against tomesd's algorithm written out in
torch here (tomesd is not a dependency) and hooked into diffusers' UNet: the UNet (SD1 and SD2
layouts; the matching alone on grids with a row or column past the last full 2 x 2 cell),
generate() against
StableDiffusionPipeline so hooked, main.py's --token_merging_ratio and A1111's field."""

import contextlib
import dataclasses
import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from parity import assert_close, nchw, nhwc, one_image_run, randn, transfer

from sdjax import infotext, outputs, run, testing
from sdjax.models.token_merging import bipartite_matching
from sdjax.models.unet import UNet2DConditionModel, UNetConfig

torch.set_num_threads(1)


def _matching(metric: torch.Tensor, w: int, h: int, r: int):
  """tomesd's bipartite soft matching without randomness, in torch: destinations the top-left
  token of each full 2 x 2 cell (found by argsort of a -1/0 grid, as tomesd finds them), the r
  sources most similar to a destination averaged into it (scatter_reduce "mean")."""
  n = metric.shape[1]
  grid = torch.zeros(h, w, dtype=torch.int64)
  grid[:(h // 2) * 2:2, :(w // 2) * 2:2] = -1
  order = grid.reshape(1, -1, 1).argsort(dim=1)
  n_dst = (h // 2) * (w // 2)
  a_idx, b_idx = order[:, n_dst:, :], order[:, :n_dst, :]

  def split(x):
    c = x.shape[-1]
    return (x.gather(1, a_idx.expand(x.shape[0], n - n_dst, c)),
            x.gather(1, b_idx.expand(x.shape[0], n_dst, c)))

  a, b = split(metric / metric.norm(dim=-1, keepdim=True))
  r = min(a.shape[1], r)
  node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
  edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
  unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
  dst_idx = node_idx[..., None].gather(-2, src_idx)

  def merge(x):
    src, dst = split(x)
    bb, t1, c = src.shape
    unm = src.gather(-2, unm_idx.expand(bb, t1 - r, c))
    moved = src.gather(-2, src_idx.expand(bb, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(bb, r, c), moved, reduce="mean")
    return torch.cat([unm, dst], dim=1)

  def unmerge(y):
    bb, kept, c = y.shape[0], unm_idx.shape[1], y.shape[-1]
    unm, dst = y[..., :kept, :], y[..., kept:, :]
    moved = dst.gather(-2, dst_idx.expand(bb, r, c))
    out = torch.zeros(bb, n, c, dtype=y.dtype)
    out.scatter_(-2, b_idx.expand(bb, n_dst, c), dst)
    for which, values in ((unm_idx, unm), (src_idx, moved)):
      where = a_idx.expand(bb, a_idx.shape[1], 1).gather(1, which)
      out.scatter_(-2, where.expand(bb, which.shape[1], c), values)
    return out

  return merge, unmerge


@contextlib.contextmanager
def tome_hooked(unet: torch.nn.Module, ratio: float):
  """diffusers' `unet` with ToMe as tomesd's diffusers patch applies it (merge before attn1,
  unmerge after, the metric the block's input), from the UNet input's size."""
  size, handles, originals = {}, [], []

  def record(_, args, kwargs):
    size["hw"] = tuple((args[0] if args else kwargs["sample"]).shape[2:])

  handles.append(unet.register_forward_pre_hook(record, with_kwargs=True))
  for block in unet.modules():
    if not isinstance(block, BasicTransformerBlock):
      continue
    fns = {}

    def compute(_, args, kwargs, fns=fns):
      x = args[0] if args else kwargs["hidden_states"]
      (height, width), n = size["hw"], x.shape[1]
      down = int(math.ceil(math.sqrt((height * width) // n)))
      r = int(n * ratio)
      fns["m"] = None if down > 1 or r <= 0 else _matching(
          x, int(math.ceil(width / down)), int(math.ceil(height / down)), r)

    handles.append(block.register_forward_pre_hook(compute, with_kwargs=True))
    attn, forward = block.attn1, block.attn1.forward
    originals.append((attn, forward))

    def merged(h, *args, forward=forward, fns=fns, **kwargs):
      if fns["m"] is None:
        return forward(h, *args, **kwargs)
      merge, unmerge = fns["m"]
      return unmerge(forward(merge(h), *args, **kwargs))

    attn.forward = merged
  try:
    yield unet
  finally:
    for handle in handles:
      handle.remove()
    for attn, forward in originals:
      attn.forward = forward


@pytest.mark.parametrize("h,w,r", [(5, 7, 11), (6, 4, 23), (3, 3, 2)])
def test_matching_matches_tomesd(h, w, r):
  """merge and unmerge on their own: a grid with a row and a column past its last full 2 x 2
  cell (all sources), more merges than sources (tomesd takes them all), a 3 x 3 grid."""
  metric, x = randn(2, h * w, 6, seed=h), randn(2, h * w, 5, seed=w)
  merge, unmerge = bipartite_matching(metric, w, h, r)
  ref_merge, ref_unmerge = _matching(torch.from_numpy(metric), w, h, r)
  merged, want = merge(x), ref_merge(torch.from_numpy(x))
  assert merged.shape == want.shape
  # Between them a per-token map (what the attention is, up to its mixing of tokens): the
  # merged tokens' order, which torch's argsort of tied values sets, does not matter.
  assert_close(unmerge(merged * 2 + merged**2), ref_unmerge(want * 2 + want**2).numpy())
  assert np.abs(np.asarray(unmerge(merged)) - x).max() > 1e-2  # merged tokens moved


@pytest.mark.parametrize("name,hw,ratio", [("sd1", (8, 12), 0.5), ("sd2", (8, 12), 0.3),
                                           ("sd1", (6, 6), 0.7)])
def test_unet_matches_tomesd(name, hw, ratio):
  """The UNet with token merging against diffusers' with the torch ToMe hooked in: only the
  full-resolution blocks merge (an SD2 layout's second level keeps its tokens)."""
  config = {"sd1": testing.UNET_SD1, "sd2": testing.UNET_SD2}[name]
  tm = testing.torch_unet(config, seed=3)
  fm = UNet2DConditionModel(UNetConfig.from_dict(dict(tm.config)), token_merging=ratio)
  x, ctx = randn(2, *hw, 4), randn(2, 77, config["cross_attention_dim"], seed=1)
  t = np.array([3.0, 801.0], np.float32)
  params = transfer(tm, fm, x, t, ctx)
  with tome_hooked(tm, ratio), torch.no_grad():
    ref = nhwc(tm(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  err = assert_close(fm.apply({"params": params}, x, t, ctx), ref)
  plain = fm.clone(token_merging=0.0).apply({"params": params}, x, t, ctx)
  assert np.abs(np.asarray(plain) - ref).max() > 1e-3
  print(f"\ntoken merging UNet {name} {hw} ratio {ratio}: {err:.2e}")


def test_generate_matches_tomesd(sd1):
  """generate(token_merging_ratio=) against StableDiffusionPipeline with ToMe hooked in; a ratio
  outside [0, 1) is a one-line error."""
  base, pipe = sd1
  ref = diffusers.StableDiffusionPipeline.from_pipe(
      base, scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler_config))
  ref.set_progress_bar_config(disable=True)
  latents = randn(2, 8, 8, 4, seed=6)
  prompts = ["a red circle in the center", "a photo of a cat"]
  with tome_hooked(ref.unet, 0.5), torch.no_grad():
    expected = ref(prompts, latents=nchw(latents), output_type="np", num_inference_steps=3,
                   guidance_scale=3.0, height=16, width=16).images
  common = dict(steps=3, guidance_scale=3.0, height=16, width=16, scheduler="euler",
                latents=latents)
  ours = pipe.generate(prompts, token_merging_ratio=0.5, **common)
  err = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
  print(f"\ntoken merging generate: {err:.2e}")
  assert err <= 1e-4
  assert np.abs(pipe.generate(prompts, **common) - ours).max() > 1e-3
  for bad in (1.0, -0.1, "x"):
    with pytest.raises(ValueError, match="token_merging_ratio must be a number from 0"):
      pipe.generate(prompts, token_merging_ratio=bad, **common)


def test_run_with_token_merging(sd1, tmp_path):
  """main.py --token_merging_ratio: generate()'s image; the PNG says A1111's `Token merging
  ratio`, which reads back as the flag; a bad value is a one-line error."""
  _, pipe = sd1
  cfg, record, png, kw = one_image_run(pipe, tmp_path / "out", token_merging_ratio=0.4)
  expected = pipe.generate("a cat", token_merging_ratio=0.4, **kw)
  assert np.abs(np.asarray(png, np.float32) - expected[0] * 255).max() <= 1.0
  assert record["token_merging_ratio"] == 0.4
  params = outputs.parse_a1111_parameters(png.text["parameters"])
  assert params["Token merging ratio"] == "0.4"
  assert infotext.reproduce(png.text["parameters"]).flags["token_merging_ratio"] == "0.4"
  with pytest.raises(run.RunError, match="--token_merging_ratio must be a number from 0"):
    run.generate_run(dataclasses.replace(cfg, token_merging_ratio=1.5,
                                         output_dir=str(tmp_path / "bad")))


def test_a1111_fields():
  """A1111's `Token merging ratio` and, with the hires fix, `Token merging ratio hr` (written
  where not 0: absent beside a first pass's ratio, the hires pass merged none)."""
  base = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, "
  flags = infotext.reproduce(base + "Token merging ratio: 0.5").flags
  assert flags["token_merging_ratio"] == "0.5" and "hires_token_merging_ratio" not in flags
  hires = "Denoising strength: 0.5, Hires upscale: 2, "
  flags = infotext.reproduce(base + hires + "Token merging ratio: 0.5").flags
  assert (flags["token_merging_ratio"], flags["hires_token_merging_ratio"]) == ("0.5", "0")
  flags = infotext.reproduce(base + hires + "Token merging ratio hr: 0.3").flags
  assert flags["hires_token_merging_ratio"] == "0.3" and "token_merging_ratio" not in flags
  assert "Token merging" not in str(infotext.reproduce(base + hires + "Token merging ratio hr: "
                                                      "0.3, Token merging ratio: 0.5").notes)
