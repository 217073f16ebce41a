"""LoRA merging: kohya / LoCon / PEFT vs diffusers' fuse_lora, LyCORIS kinds and OFT vs formulas."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
from parity import assert_close, nchw, nhwc, randn, reference_pipelines, rel_err
from safetensors.torch import save_file

import sdjax
from sdjax import testing
from sdjax.checkpoints import hub, lora
from sdjax.checkpoints.lora import LoraError

torch.set_num_threads(1)
DIM = 32  # the tiny SD1 text encoder's width

PROMPTS = ["a red circle in the center", "a photo of a cat"]
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
UNET_MODULES = [  # linear, 1x1 conv (SD1 proj_in), 3x3 conv (LoCon), every kind of layer
    f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_k", f"{ATTN}.attn1.to_out.0",
    "down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", "up_blocks.1.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv_shortcut", "mid_block.resnets.1.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv", "conv_in", "time_embedding.linear_1",
]
TEXT_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1",
                "encoder.layers.2.self_attn.out_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return reference_pipelines(tmp_path_factory, "lora", seed=5)


def _weights(model):
  """Module name (without transformers' `text_model.`) -> weight, of every linear and conv."""
  return {n.removeprefix("text_model."): m.weight for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}


def _factors(shape, rank, gen, locon=True):
  """Random (down, up) in kohya layout for a layer of PyTorch weight shape `shape`."""
  out, inn = shape[:2]
  if len(shape) == 4:
    k = shape[2] if locon else 1
    return (torch.randn(rank, inn, k, k, generator=gen) * 0.2,
            torch.randn(out, rank, 1, 1, generator=gen) * 0.2)
  return torch.randn(rank, inn, generator=gen) * 0.2, torch.randn(out, rank, generator=gen) * 0.2


def _kohya_file(path, ref, alpha=1.0, rank=2, seed=0):
  """A kohya LoRA (LoCon on 3x3 convs), every module with `alpha` (None: no alpha keys).

  diffusers reads per-module alphas of kohya files under names that miss most layers (attention
  processors, transformers v5 text encoders) and falls back to the file's first alpha, and it
  reads a missing alpha as that first alpha too, so against diffusers the alpha is uniform.
  Per-module alphas and absent alpha = rank (as kohya and A1111 read it) are tested against the
  merge formula in `test_vs_formula`.
  """
  gen = torch.Generator().manual_seed(seed)
  sd = {}
  for prefix, model, names in (("lora_unet_", ref.unet, UNET_MODULES),
                               ("lora_te_text_model_", ref.text_encoder, TEXT_MODULES)):
    weights = _weights(model)
    for name in names:
      key = prefix + name.replace(".", "_")
      sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _factors(
          weights[name].shape, rank, gen)
      if alpha is not None:
        sd[f"{key}.alpha"] = torch.tensor(alpha)
  save_file(sd, path)
  return path


def _peft_file(path, ref, metadata=True, rank=3, seed=1):
  gen = torch.Generator().manual_seed(seed)
  sd = {}
  for prefix, model, names in (("unet.", ref.unet, UNET_MODULES[:6]),
                               ("text_encoder.text_model.", ref.text_encoder, TEXT_MODULES)):
    weights = _weights(model)
    for name in names:
      down, up = _factors(weights[name].shape, rank, gen, locon=False)
      sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = down, up
  meta = {"format": "pt"}
  if metadata:
    meta["lora_adapter_metadata"] = json.dumps({
        "unet.r": rank, "unet.lora_alpha": 5, "unet.target_modules": UNET_MODULES[:6],
        "unet.alpha_pattern": {"ff.net.2": 1.5},
        "text_encoder.r": rank, "text_encoder.lora_alpha": 2, "text_encoder.target_modules":
        TEXT_MODULES,
    })
  save_file(sd, path, metadata=meta)
  return path


def _outputs_torch(ref):
  d = ref.unet.config.cross_attention_dim
  x, ctx, t = randn(2, 8, 8, 4), randn(2, 77, d, seed=1), np.array([3, 700], np.int32)
  ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
  with torch.no_grad():
    eps = nhwc(ref.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    text = ref.text_encoder(ids).last_hidden_state.numpy()
  return eps, text


def _outputs_ours(pipe, params):
  pipe = dataclasses.replace(pipe, params=params)
  d = pipe.unet.config.cross_attention_dim
  x, ctx, t = randn(2, 8, 8, 4), randn(2, 77, d, seed=1), np.array([3, 700], np.int32)
  return (np.asarray(pipe.predict_noise(x, t, ctx)),
          np.asarray(pipe.encode_text(pipe.tokenize(PROMPTS))))


def _diffusers_fused(ref, source, scale):
  """Outputs of the reference pipeline with the LoRA fused by diffusers (then restored)."""
  unet, text = ({k: v.clone() for k, v in m.state_dict().items()}
                for m in (ref.unet, ref.text_encoder))
  ref.load_lora_weights(source)
  ref.fuse_lora(lora_scale=scale)
  out = _outputs_torch(ref)
  ref.unfuse_lora()
  ref.unload_lora_weights()
  ref.unet.load_state_dict(unet)
  ref.text_encoder.load_state_dict(text)
  return out


def _check_vs_diffusers(models, path, scale, ref_source=None):
  ref, pipe, _ = models
  eps, text = _diffusers_fused(ref, path if ref_source is None else ref_source, scale)
  base_eps, base_text = _outputs_torch(ref)
  ours_eps, ours_text = _outputs_ours(pipe, lora.apply_loras(pipe, [(path, scale)]))
  errs = assert_close(ours_eps, eps), assert_close(ours_text, text)
  # The change the LoRA makes, alone: large, and the same in both.
  for ours, fused, base in ((ours_eps, eps, base_eps), (ours_text, text, base_text)):
    change = np.linalg.norm(fused - base) / np.linalg.norm(base)
    print(f"  LoRA changes the output by {change:.2f}; rel err of the change "
          f"{assert_close(ours - base, fused - base):.2g}")
    assert change > 0.05
  return errs


@pytest.mark.parametrize("alpha", [1.0, None])
def test_kohya_and_locon_vs_diffusers(models, tmp_path, alpha):
  path = _kohya_file(str(tmp_path / "kohya.safetensors"), models[0], alpha)
  errs = _check_vs_diffusers(models, path, 0.7)
  print(f"kohya/LoCon (alpha {alpha}) rel err unet {errs[0]:.2g} text {errs[1]:.2g}")


# kohya's SDXL files name UNet modules as the original (SGM/LDM) UNet does. diffusers maps them
# in `lora_state_dict(..., unet_config=)` (its SD pipeline does not ask for that by itself);
# these are the modules its mapping gets right on this UNet.
SGM_MODULES = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": f"{ATTN}.attn1.to_q",
    "input_blocks_2_1_proj_in": "down_blocks.0.attentions.1.proj_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    "output_blocks_4_0_out_layers_3": "up_blocks.1.resnets.1.conv2",
    "output_blocks_5_1_transformer_blocks_0_attn2_to_k": "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
    "input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding.linear_1",
}


def test_sgm_names_vs_diffusers(models, tmp_path):
  ref = models[0]
  weights, gen, sd = _weights(ref.unet), torch.Generator().manual_seed(3), {}
  for sgm, name in SGM_MODULES.items():
    sd[f"lora_unet_{sgm}.lora_down.weight"], sd[f"lora_unet_{sgm}.lora_up.weight"] = _factors(
        weights[name].shape, 2, gen)
  for name in (TEXT_MODULES[0], TEXT_MODULES[2]):  # diffusers needs an out_proj to read the te
    te = f"lora_te_text_model_{name.replace('.', '_')}"
    sd[f"{te}.lora_down.weight"], sd[f"{te}.lora_up.weight"] = _factors((DIM, DIM), 2, gen)
  path = str(tmp_path / "sgm.safetensors")
  save_file(sd, path)
  converted, alphas = ref.lora_state_dict(path, unet_config=ref.unet.config)
  assert not alphas and not any("input_blocks" in k for k in converted)
  errs = _check_vs_diffusers(models, path, 0.9, ref_source=converted)
  print(f"kohya SGM names rel err unet {errs[0]:.2g} text {errs[1]:.2g}")


@pytest.mark.parametrize("metadata", [True, False])
def test_peft_vs_diffusers(models, tmp_path, metadata):
  path = _peft_file(str(tmp_path / "pytorch_lora_weights.safetensors"), models[0], metadata)
  errs = _check_vs_diffusers(models, path, 1.3)
  print(f"PEFT (metadata={metadata}) rel err unet {errs[0]:.2g} text {errs[1]:.2g}")


def test_merge_does_not_mutate_and_scales_split(models, tmp_path):
  ref, pipe, _ = models
  path = _kohya_file(str(tmp_path / "k.safetensors"), ref)
  before = np.asarray(pipe.params["unet"]["conv_in"]["kernel"]).copy()
  base_eps, base_text = _outputs_ours(pipe, pipe.params)
  unet_only = lora.apply_loras(pipe, [(path, 0.5, 0.0)])
  np.testing.assert_array_equal(np.asarray(pipe.params["unet"]["conv_in"]["kernel"]), before)
  eps, text = _outputs_ours(pipe, unet_only)
  np.testing.assert_array_equal(text, base_text)
  assert np.abs(eps - base_eps).max() > 1e-3
  # Two LoRAs add: a + b at once equals a then b; the te scale alone moves only the text.
  both = lora.apply_loras(pipe, [(path, 0.5, 0.0), (path, 0.0, 2.0)])
  once = lora.apply_loras(pipe, [(path, 0.5, 2.0)])
  parsed = lora.read_lora(path, pipe.params)  # parsed once, merged at any scales
  again = lora.apply_loras(pipe, [(parsed, 0.5, 2.0)])
  for a, b, c in zip(*(_outputs_ours(pipe, p) for p in (both, once, again)), strict=True):
    assert_close(a, b, tol=1e-6)
    assert_close(c, b, tol=0)


# -- LoRA, LoHa and LoKr against the merge formula, applied to the torch reference ---------------
def _lycoris_modules(ref):
  return {"unet": (ref.unet, ["lora_unet_", [f"{ATTN}.attn1.to_q", "up_blocks.1.resnets.0.conv1",
                                             "mid_block.resnets.1.conv2", "conv_in"]]),
          "text_encoder": (ref.text_encoder, ["lora_te_text_model_", TEXT_MODULES[:2]])}


def _lora(shape, gen, mid):
  down, up = _factors(shape, 2, gen)
  if mid and len(shape) == 4:  # LoCon with a Tucker core: down 1x1, mid kxk, up 1x1
    w = {"lora_down.weight": torch.randn(2, shape[1], 1, 1, generator=gen) * 0.3,
         "lora_mid.weight": torch.randn(2, 2, *shape[2:], generator=gen) * 0.3,
         "lora_up.weight": up}
    delta = torch.einsum("nmkl,in,mj->ijkl", w["lora_mid.weight"], up[:, :, 0, 0],
                         w["lora_down.weight"][:, :, 0, 0])
    return w, delta
  delta = (up.reshape(up.shape[0], -1) @ down.reshape(2, -1)).reshape(shape)
  return {"lora_down.weight": down, "lora_up.weight": up}, delta


def _loha(shape, gen, tucker):
  out, inn = shape[:2]
  r = 2
  w = {f"hada_w{i}_a": torch.randn(out, r, generator=gen) * 0.3 for i in (1, 2)}
  if tucker:
    k = shape[2]
    w.update({f"hada_w{i}_a": torch.randn(r, out, generator=gen) * 0.3 for i in (1, 2)})
    w.update({f"hada_w{i}_b": torch.randn(r, inn, generator=gen) * 0.3 for i in (1, 2)})
    w.update({f"hada_t{i}": torch.randn(r, r, k, k, generator=gen) * 0.3 for i in (1, 2)})
    w1 = torch.einsum("ijkl,jr,ip->prkl", w["hada_t1"], w["hada_w1_b"], w["hada_w1_a"])
    w2 = torch.einsum("ijkl,jr,ip->prkl", w["hada_t2"], w["hada_w2_b"], w["hada_w2_a"])
    return w, w1 * w2
  flat_in = int(np.prod(shape[1:]))
  w.update({f"hada_w{i}_b": torch.randn(r, flat_in, generator=gen) * 0.3 for i in (1, 2)})
  delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
  return w, delta.reshape(shape)


def _lokr(shape, gen, variant):
  out, inn = shape[:2]
  a = 2 if out % 2 == 0 else 1
  b = 2 if inn % 2 == 0 else 1
  c = out // a
  d = inn // b
  if variant == 0:  # full w1, factorized w2 (rank 3)
    w = {"lokr_w1": torch.randn(a, b, generator=gen),
         "lokr_w2_a": torch.randn(c, 3, generator=gen) * 0.3,
         "lokr_w2_b": torch.randn(3, d * int(np.prod(shape[2:])), generator=gen) * 0.3}
    w1, w2 = w["lokr_w1"], w["lokr_w2_a"] @ w["lokr_w2_b"]
  elif variant == 1:  # factorized w1 (rank 1), full w2
    w = {"lokr_w1_a": torch.randn(a, 1, generator=gen),
         "lokr_w1_b": torch.randn(1, b, generator=gen), "lokr_w2": torch.randn(c, d, *shape[2:], generator=gen) * 0.3}
    w1, w2 = w["lokr_w1_a"] @ w["lokr_w1_b"], w["lokr_w2"]
  else:  # conv with a Tucker core on w2
    k = shape[2]
    w = {"lokr_w1": torch.randn(a, b, generator=gen),
         "lokr_t2": torch.randn(3, 3, k, k, generator=gen),
         "lokr_w2_a": torch.randn(3, c, generator=gen) * 0.3,
         "lokr_w2_b": torch.randn(3, d, generator=gen) * 0.3}
    w1 = w["lokr_w1"]
    w2 = torch.einsum("ijkl,jr,ip->prkl", w["lokr_t2"], w["lokr_w2_b"], w["lokr_w2_a"])
  if w2.dim() == 4:
    w1 = w1[:, :, None, None]
  return w, torch.kron(w1, w2).reshape(shape)


def _rank(w):
  for key in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
    if key in w:
      return w[key].shape[0]
  return None


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_vs_formula(models, tmp_path, kind):
  """Per-module alphas (some absent: alpha = rank) and every factorization, vs the formula."""
  ref = models[0]
  gen = torch.Generator().manual_seed(7)
  scale, sd, expected = 0.6, {}, {}
  for component, (model, (prefix, names)) in _lycoris_modules(ref).items():
    weights = _weights(model)
    for i, name in enumerate(names):
      shape = tuple(weights[name].shape)
      if kind == "lora":
        w, delta = _lora(shape, gen, mid=i % 2 == 0)
      elif kind == "loha":
        w, delta = _loha(shape, gen, tucker=len(shape) == 4 and shape[2] == 3 and i % 2 == 0)
      else:
        variant = 2 if len(shape) == 4 and shape[2] == 3 and i % 2 == 0 else i % 2
        w, delta = _lokr(shape, gen, variant)
      alpha = (1.5, None, 4.0)[i % 3]
      if alpha is not None:
        w["alpha"] = torch.tensor(alpha)
      factor = alpha / _rank(w) if alpha is not None and _rank(w) else 1.0
      expected[(component, name)] = scale * factor * delta
      sd.update({f"{prefix}{name.replace('.', '_')}.{k}": v for k, v in w.items()})
  path = str(tmp_path / f"{kind}.safetensors")
  save_file(sd, path)
  _check_formula(models, path, scale, expected, kind)


def _check_formula(models, path, scale, changes, label):
  """Our outputs with the LoRA at `path` merged at `scale` vs the reference's with `changes`
  added; the changes must move both outputs."""
  ref, pipe, _ = models
  eps, text = _outputs_changed(ref, changes)
  ours = _outputs_ours(pipe, lora.apply_loras(pipe, [(path, scale)]))
  errs = assert_close(ours[0], eps), assert_close(ours[1], text)
  for base, changed in zip(_outputs_torch(ref), (eps, text), strict=True):
    assert rel_err(changed, base) > 0.01
  print(f"{label} rel err unet {errs[0]:.2g} text {errs[1]:.2g}")
  return eps


def _params(model):
  """Param name (without transformers' `text_model.`) -> parameter."""
  return {n.removeprefix("text_model."): p for n, p in model.named_parameters()}


def _outputs_changed(ref, changes):
  """The reference's outputs with {(component, name): change} added (then restored).

  A name ending in `.weight` or `.bias` names that param; else it is a module, whose weight.
  """
  unet, text = ({k: v.clone() for k, v in m.state_dict().items()}
                for m in (ref.unet, ref.text_encoder))
  try:
    with torch.no_grad():
      for (component, name), delta in changes.items():
        param = name if name.endswith((".weight", ".bias")) else f"{name}.weight"
        _params(getattr(ref, component))[param].add_(delta)
    return _outputs_torch(ref)
  finally:
    ref.unet.load_state_dict(unet)
    ref.text_encoder.load_state_dict(text)


def test_full_and_norm_vs_formula(models, tmp_path):
  """LyCORIS full modules (`diff`, `diff_b`) and norm modules (`w_norm`, `b_norm`: GroupNorm,
  LayerNorm) vs A1111's rule: each param + scale * its change (a `scale` key scales w_norm)."""
  ref = models[0]
  gen = torch.Generator().manual_seed(17)
  scale, sd, expected = 0.7, {}, {}
  spec = [  # component, module, keys
      ("unet", f"{ATTN}.attn1.to_q", ("diff",)),
      ("unet", "up_blocks.1.resnets.0.conv1", ("diff", "diff_b")),
      ("unet", "down_blocks.0.resnets.0.norm1", ("w_norm", "b_norm", "scale")),
      ("unet", f"{ATTN}.norm2", ("w_norm", "b_norm")),
      ("unet", "conv_norm_out", ("b_norm",)),
      ("text_encoder", "encoder.layers.1.mlp.fc1", ("diff", "diff_b")),
      ("text_encoder", "encoder.layers.0.layer_norm1", ("w_norm", "b_norm")),
      ("text_encoder", "final_layer_norm", ("w_norm",)),
  ]
  for component, module, keys in spec:
    params = _params(getattr(ref, component))
    prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
    factor = 2.0 if "scale" in keys else 1.0
    for key in keys:
      name = f"{prefix}{module.replace('.', '_')}.{key}"
      if key == "scale":
        sd[name] = torch.tensor(factor)
        continue
      param = f"{module}.{'bias' if key in ('diff_b', 'b_norm') else 'weight'}"
      sd[name] = change = torch.randn(params[param].shape, generator=gen) * 0.1
      expected[(component, param)] = scale * change * (factor if key == "w_norm" else 1.0)
  path = str(tmp_path / "full.safetensors")
  save_file(sd, path)
  _check_formula(models, path, scale, expected, "LyCORIS full and norm")


def test_ia3_vs_formula(models, tmp_path):
  """LyCORIS IA3 (`weight`, `on_input`) vs A1111's rule: W + scale * W * w, per output channel
  or per input; a convolution's IA3 is a one-line error."""
  ref = models[0]
  gen = torch.Generator().manual_seed(19)
  scale, sd, expected = 0.6, {}, {}
  for component, model, prefix, names in (
      ("unet", ref.unet, "lora_unet_", [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_v",
                                         "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]),
      ("text_encoder", ref.text_encoder, "lora_te_text_model_", TEXT_MODULES[:2])):
    weights = _weights(model)
    for i, name in enumerate(names):
      w0 = weights[name].detach()
      on_input = i % 2 == 1
      vector = torch.randn(w0.shape[1 if on_input else 0], generator=gen) * 2.0
      key = f"{prefix}{name.replace('.', '_')}"
      sd[f"{key}.weight"], sd[f"{key}.on_input"] = vector, torch.tensor(on_input)
      expected[(component, name)] = scale * (w0 * (vector if on_input else vector[:, None]))
  path = str(tmp_path / "ia3.safetensors")
  save_file(sd, path)
  _check_formula(models, path, scale, expected, "LyCORIS IA3")
  conv = _write(tmp_path, {"lora_unet_conv_in.weight": torch.ones(32),
                           "lora_unet_conv_in.on_input": torch.tensor(False)}, "conv.safetensors")
  with pytest.raises(LoraError, match="IA3 weights for a convolution"):
    lora.apply_loras(models[1], [conv])


# -- OFT / BOFT: rotations of the output channels -------------------------------------------------
def _cayley(blocks, alpha, out):
  """kohya's and LyCORIS' rotation from `oft_blocks` (A1111's rule), by matrix inverse."""
  q = blocks - blocks.transpose(-1, -2)
  if alpha:
    norm = q.norm()
    q = q * (torch.clamp(norm, max=alpha * out) + 1e-8) / (norm + 1e-8)
  eye = torch.eye(blocks.shape[-1])
  return (eye + q) @ torch.linalg.inv(eye - q)


def _boft_matrix(rotations, out):
  """BOFT's whole rotation as one [out, out] matrix: per stage, the block-diagonal R between a
  permutation matrix and its transpose; stage 0 first."""
  n = rotations.shape[-1]
  total = torch.eye(out)
  for i, stage in enumerate(rotations):
    group = 2**i * (n // 2)  # channels c * 2g + j and c * 2g + g + j meet in one block
    position = torch.arange(out).reshape(-1, 2, group).permute(0, 2, 1).reshape(-1)
    permute = torch.eye(out)[position]  # (permute @ x)[p] = x[position[p]]
    total = permute.T @ torch.block_diag(*stage) @ permute @ total
  return total


def test_oft_and_boft_vs_formula(models, tmp_path):
  """kohya / LyCORIS OFT (`oft_blocks` by Cayley's map, the clip by `alpha` on or off), older
  LyCORIS `oft_diag` (the rotation itself), BOFT (4-D blocks, butterfly stages) with LyCORIS'
  `rescale`, on linear and conv layers, vs A1111's rule: W + scale * (W' - W), W' = R^T W for
  OFT (block-diagonal R over the output channels), the stages' product for BOFT."""
  ref = models[0]
  gen = torch.Generator().manual_seed(23)
  scale, sd, expected = 0.7, {}, {}
  modules = _lycoris_modules(ref)
  modules["text_encoder"][1][1] = [TEXT_MODULES[0], TEXT_MODULES[2]]  # fc1's 37 outputs: prime
  for component, (model, (prefix, names)) in modules.items():
    weights = _weights(model)
    for i, name in enumerate(names):
      w0 = weights[name].detach()
      out, key = w0.shape[0], f"{prefix}{name.replace('.', '_')}"
      rows = w0.flatten(1)
      variant = (i + (component == "text_encoder")) % 4
      if variant == 0:  # kohya OFT, no clip
        blocks = torch.randn(out // 8, 8, 8, generator=gen) * 0.2
        sd[f"{key}.oft_blocks"] = blocks
        rotated = torch.block_diag(*_cayley(blocks, 0.0, out)).T @ rows
      elif variant == 1:  # the clip on: alpha * out below Q's norm
        blocks = torch.randn(out // 4, 4, 4, generator=gen) * 0.2
        alpha = 0.5 * float((blocks - blocks.transpose(1, 2)).norm()) / out
        sd[f"{key}.oft_blocks"], sd[f"{key}.alpha"] = blocks, torch.tensor(alpha)
        rotated = torch.block_diag(*_cayley(blocks, alpha, out)).T @ rows
      elif variant == 2:  # older LyCORIS: the rotation blocks themselves
        blocks = torch.eye(4) + torch.randn(out // 4, 4, 4, generator=gen) * 0.1
        sd[f"{key}.oft_diag"] = blocks
        rotated = torch.block_diag(*blocks).T @ rows
      else:  # BOFT, two stages, rescaled
        blocks = torch.randn(2, out // 4, 4, 4, generator=gen) * 0.2
        rescale = 1 + 0.2 * torch.randn(out, *[1] * (w0.dim() - 1), generator=gen)
        sd[f"{key}.oft_blocks"], sd[f"{key}.rescale"] = blocks, rescale
        sd[f"{key}.alpha"] = torch.tensor(0.0)  # alpha 0: no clip
        rotated = _boft_matrix(_cayley(blocks, 0.0, out), out) @ rows
        rotated = rescale.reshape(-1, 1) * rotated
      expected[(component, name)] = scale * (rotated.reshape(w0.shape) - w0)
  assert {k.rsplit(".", 1)[1] for k in sd} == {"oft_blocks", "oft_diag", "alpha", "rescale"}
  path = str(tmp_path / "oft.safetensors")
  save_file(sd, path)
  _check_formula(models, path, scale, expected, "OFT / BOFT")
  # Cayley's R is orthogonal: each input's column of the rotated W keeps its norm (to_q: OFT
  # without rescale).
  from flax import traverse_util

  from sdjax.checkpoints.weights import torch_key

  merged, original = (traverse_util.flatten_dict(p["unet"]) for p in (
      lora.apply_loras(models[1], [(path, 1.0)]), models[1].params))
  to_q = next(p for p in original if torch_key(p) == f"{ATTN}.attn1.to_q.weight")
  np.testing.assert_allclose(np.linalg.norm(merged[to_q], axis=-1),
                             np.linalg.norm(original[to_q], axis=-1), rtol=1e-5)
  assert rel_err(merged[to_q], original[to_q]) > 0.05


# -- DoRA: PEFT files vs diffusers, LyCORIS files vs A1111's rule ---------------------------------
def _norms(w, per_output):
  """Per-channel norms of a PyTorch-layout weight, shaped to broadcast against it."""
  if per_output:
    return w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
  return w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))


def _magnitudes(w, per_output, gen):
  """Realistic DoRA magnitudes: the weight's own norms, each changed by up to 30%."""
  norms = _norms(w, per_output)
  return norms * (0.7 + 0.6 * torch.rand(norms.shape, generator=gen))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_dora_peft_vs_diffusers(models, tmp_path, scale):
  """diffusers' DoRA files (`lora_magnitude_vector`, as `save_lora_weights` writes them) vs
  diffusers + PEFT fusing them: the scale acts inside the norm, as PEFT applies it."""
  ref = models[0]
  gen, sd = torch.Generator().manual_seed(11), {}
  rank, unet_modules = 2, [*UNET_MODULES[:6], "up_blocks.1.resnets.0.conv1"]
  for prefix, model, names in (("unet.", ref.unet, unet_modules),
                               ("text_encoder.text_model.", ref.text_encoder, TEXT_MODULES)):
    weights = _weights(model)
    for name in names:
      w = weights[name].detach()
      down, up = _factors(w.shape, rank, gen)
      m = _magnitudes(w, True, gen)
      sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = down, up
      # diffusers reads the text encoders' magnitudes only with transformers' `.weight` suffix.
      key = f"{prefix}{name}.lora_magnitude_vector" + (".weight" if model is not ref.unet else "")
      sd[key] = m.reshape(1, -1, 1, 1) if w.dim() == 4 else m.reshape(-1)
  meta = {"format": "pt", "lora_adapter_metadata": json.dumps({
      "unet.r": rank, "unet.lora_alpha": 3, "unet.use_dora": True,
      "unet.target_modules": unet_modules, "text_encoder.r": rank, "text_encoder.lora_alpha": 1,
      "text_encoder.use_dora": True, "text_encoder.target_modules": TEXT_MODULES})}
  path = str(tmp_path / "pytorch_lora_weights.safetensors")
  save_file(sd, path, metadata=meta)
  errs = _check_vs_diffusers(models, path, scale)
  print(f"PEFT DoRA (scale {scale}) rel err unet {errs[0]:.2g} text {errs[1]:.2g}")


def test_dora_lycoris_vs_formula(models, tmp_path):
  """LyCORIS DoRA (`dora_scale` on LoRA, LoHa and LoKr modules, per output [out, 1, ...] and
  per input [1, in, ...]) vs A1111's rule: W + k * (m * V / ||V|| - W), V = W + alpha/rank * delta.
  """
  ref, pipe, _ = models
  gen = torch.Generator().manual_seed(13)
  scale, sd, expected = 0.6, {}, {}
  makers = (lambda shape: _lora(shape, gen, mid=False), lambda shape: _loha(shape, gen, False),
            lambda shape: _lokr(shape, gen, 0))
  count = 0
  for component, (model, (prefix, names)) in _lycoris_modules(ref).items():
    weights = _weights(model)
    for name in names:
      w0 = weights[name].detach()
      w, delta = makers[count % 3](tuple(w0.shape))
      per_output = count % 2 == 0
      w["dora_scale"] = m = _magnitudes(w0, per_output, gen)
      w["alpha"] = torch.tensor(1.5)
      v = w0 + 1.5 / _rank(w) * delta if _rank(w) else w0 + delta
      expected[(component, name)] = scale * (m / _norms(v, per_output) * v - w0)
      sd.update({f"{prefix}{name.replace('.', '_')}.{k}": v for k, v in w.items()})
      count += 1
  path = str(tmp_path / "dora.safetensors")
  save_file(sd, path)
  eps = _check_formula(models, path, scale, expected, "LyCORIS DoRA")
  # The rule is not the plain LoRA's: without dora_scale the same file merges to other outputs.
  plain = {k: v for k, v in sd.items() if not k.endswith("dora_scale")}
  other = _outputs_ours(pipe, lora.apply_loras(pipe, [(_write(tmp_path, plain), scale)]))
  assert rel_err(other[0], eps) > 1e-2


# -- loading, flags, hub ---------------------------------------------------------------------------
def test_load_pipeline_with_loras(models, tmp_path):
  ref, pipe, folder = models
  path = _kohya_file(str(tmp_path / "k.safetensors"), ref)
  loaded = sdjax.load_pipeline(folder, loras=[(path, 0.8), path])
  expected = lora.apply_loras(pipe, [(path, 1.8)])
  for a, b in zip(_outputs_ours(pipe, loaded.params), _outputs_ours(pipe, expected), strict=True):
    assert_close(a, b, tol=1e-6)
  # bfloat16 params: merged in float32, stored back in bfloat16.
  half = sdjax.load_pipeline(folder, dtype="bfloat16", loras=[(path, 1.8)])
  kernel = half.params["unet"]["conv_in"]["kernel"]
  assert str(kernel.dtype) == "bfloat16"
  assert_close(np.asarray(kernel, np.float32), np.asarray(expected["unet"]["conv_in"]["kernel"]),
               tol=1e-2)


def test_merged_lora_exports_as_single_file(models, tmp_path):
  """save_single_file writes the merged weights: the file loads back to them exactly."""
  ref, pipe, folder = models
  path = _kohya_file(str(tmp_path / "k.safetensors"), ref)
  merged = sdjax.load_pipeline(folder, loras=[(path, 0.7)])
  out = str(tmp_path / "merged.safetensors")
  merged.save_single_file(out)
  back = sdjax.load_pipeline(out, config=folder)
  for name in ("unet", "text_encoder"):
    for a, b in zip(jax.tree.leaves(back.params[name]), jax.tree.leaves(merged.params[name]),
                    strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(back.params["unet"]["conv_in"]["kernel"],
                            pipe.params["unet"]["conv_in"]["kernel"])


def test_parse_lora_flag():
  from sdjax.run import parse_path_arg

  assert parse_path_arg("a/b.safetensors", float, 1.0) == ("a/b.safetensors", 1.0)
  assert parse_path_arg("a/b.safetensors:0.5", float, 1.0) == ("a/b.safetensors", 0.5)
  assert parse_path_arg("C:/x/b.safetensors:-1", float, 1.0) == ("C:/x/b.safetensors", -1.0)
  with pytest.raises(ValueError, match="scale"):
    parse_path_arg("b.safetensors:much", float, 1.0)


def test_hub_file_selection():
  assert hub.split_hub_file("owner/loras") == ("owner/loras", None)
  assert hub.split_hub_file("owner/loras/sub/x.safetensors") == ("owner/loras", "sub/x.safetensors")
  assert hub.split_hub_file("./owner/loras") is None
  assert hub.split_hub_file("loras/sub/folder") is None
  files = ["README.md", "pytorch_lora_weights.safetensors", "other.safetensors", "x.bin"]
  assert hub.select_file(files, "LoRA", ("pytorch_lora_weights.safetensors",)) == (
      "pytorch_lora_weights.safetensors")
  assert hub.select_file(["a.md", "x.bin", "style.safetensors"], "LoRA") == "style.safetensors"
  assert hub.select_file(["a.md", "emb.pt"], "embedding") == "emb.pt"
  with pytest.raises(hub.HubError, match="several LoRA files.*owner/name/file"):
    hub.select_file(["a.safetensors", "b.safetensors"], "LoRA")
  with pytest.raises(hub.HubError, match="no LoRA file"):
    hub.select_file(["README.md"], "LoRA")
  with pytest.raises(hub.HubError, match="does not exist"):
    hub.resolve_file("./missing.safetensors", "LoRA")


# -- bad input: one line naming the problem --------------------------------------------------------
def _write(tmp_path, sd, name="bad.safetensors"):
  path = str(tmp_path / name)
  save_file({k: torch.as_tensor(v).contiguous() for k, v in sd.items()}, path)
  return path


@pytest.mark.parametrize("sd, message", [
    ({"lora_unet_down_blocks_0_nothing_here.lora_down.weight": torch.ones(2, 32),
      "lora_unet_down_blocks_0_nothing_here.lora_up.weight": torch.ones(32, 2)},
     "unet module 'down_blocks_0_nothing_here' matches no layer"),
    ({f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q.lora_down.weight": torch.ones(2, 320),
      f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q.lora_up.weight": torch.ones(320, 2)},
     r"shape \(320, 320\) for a layer of shape \(32, 32\).*another model family"),
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2)},
     "has text_encoder_2 weights but this model has no text_encoder_2"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.ones(2, 32),
      "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.ones(32, 2)},
     "SGM/LDM-named UNet module 'lora_unet_input_blocks_4_1_proj_in' matches no layer"),
    ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)},
     "module 'conv_in' has an incomplete or unsupported set of weights"),
    ({"lora_unet_conv_in.dora_scale": torch.ones(4)},
     r"module 'conv_in' has an incomplete or unsupported set of weights \(dora_scale\)"),
    ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1),
      "lora_unet_conv_in.dora_scale": torch.ones(1, 32, 1, 1)},
     r"unet module 'conv_in' has DoRA magnitudes of shape \(1, 32, 1, 1\) for a layer with "
     "32 outputs and 4 inputs"),
    ({"unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3),
      "unet.conv_in.lora_B.weight": torch.ones(32, 2, 1, 1),
      "unet.conv_in.lora_magnitude_vector": torch.ones(1, 4, 1, 1)},
     r"DoRA magnitudes of shape \(1, 4, 1, 1\) for a layer with 32 outputs"),
    ({"lora_unet_conv_in.oft_blocks": torch.ones(4)},
     r"unet module 'conv_in' has OFT blocks of shape \(4,\) for a layer with 32 output"),
    ({"lora_unet_conv_in.oft_blocks": torch.ones(3, 8, 8)}, r"OFT blocks of shape \(3, 8, 8\)"),
    ({"lora_unet_conv_in.oft_blocks": torch.ones(4, 4, 8, 8)},  # 4 stages need 8 * 8 | channels
     r"OFT blocks of shape \(4, 4, 8, 8\) for a layer with 32"),
    ({"lora_unet_conv_in.oft_diag": torch.ones(4, 8, 8), "lora_unet_conv_in.rescale":
      torch.ones(16)}, "OFT rescale of size 16 for a layer with 32 output channels"),
    ({"lora_unet_conv_in.oft_blocks": torch.ones(4, 8, 8),
      "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)},
     "mixes OFT blocks with lora_down.weight"),
    ({"lora_unet_conv_in.w_norm": torch.ones(32)},
     r"unet module 'conv_in' changes a norm weight \(w_norm\) this layer does not have"),
    ({f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q.diff": torch.ones(32, 32),
      f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q.diff_b": torch.ones(32)},
     r"changes a bias \(diff_b\) this layer does not have"),
    ({"lora_unet_conv_norm_out.lora_down.weight": torch.ones(2, 32),
      "lora_unet_conv_norm_out.lora_up.weight": torch.ones(32, 2)},
     "unet module 'conv_norm_out' is a norm layer, which only w_norm / b_norm change"),
    ({"lora_unet_conv_norm_out.b_norm": torch.ones(16)},
     r"b_norm of shape \(16,\) for a param of shape \(32,\)"),
    ({"something.else": torch.ones(4)}, "key 'something.else' is not a LoRA weight"),
])
def test_bad_lora(models, tmp_path, sd, message):
  _, pipe, _ = models
  with pytest.raises(LoraError, match=message) as e:
    lora.apply_loras(pipe, [_write(tmp_path, sd)])
  assert "\n" not in str(e.value)


def test_bfloat16_and_float8_files(models, tmp_path):
  """A LoRA saved in bfloat16 or float8 (kohya's --save_precision, fp8 saves) reads as float32
  of its values, its metadata kept, and merges as the float32 file of those values does."""
  from safetensors.numpy import load_file

  ref, pipe, _ = models
  path = _kohya_file(str(tmp_path / "kohya.safetensors"), ref, 1.0)
  metadata = {"ss_network_dim": "2"}
  for dtype in (torch.bfloat16, torch.float8_e4m3fn):
    rounded = {k: torch.from_numpy(v).to(dtype) for k, v in load_file(path).items()}
    low, high = str(tmp_path / "low.safetensors"), str(tmp_path / "high.safetensors")
    save_file(rounded, low, metadata=metadata)
    save_file({k: v.float() for k, v in rounded.items()}, high, metadata=metadata)
    tensors, meta = lora.read_tensors(low)
    assert meta == metadata and sorted(tensors) == sorted(rounded)
    for key, value in rounded.items():
      assert tensors[key].dtype == np.float32
      np.testing.assert_array_equal(tensors[key], value.float().numpy(), err_msg=key)
    for got, want in zip(jax.tree_util.tree_leaves(lora.apply_loras(pipe, [(low, 0.7)])),
                         jax.tree_util.tree_leaves(lora.apply_loras(pipe, [(high, 0.7)])),
                         strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_files(models, tmp_path):
  _, pipe, _ = models
  with pytest.raises(LoraError, match="does not exist"):
    lora.apply_loras(pipe, [str(tmp_path / "missing.safetensors")])
  path = tmp_path / "truncated.safetensors"
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
  with pytest.raises(LoraError, match="cannot read"):
    lora.apply_loras(pipe, [str(path)])
  with pytest.raises(LoraError, match="path, .path, scale."):
    lora.apply_loras(pipe, [("x", 1, 2, 3)])
  assert not os.path.exists(str(tmp_path / "missing.safetensors"))


def test_key_spellings_agree(models):
  """The same factors under every naming sdjax reads give the same deltas."""
  _, pipe, _ = models
  rng = np.random.default_rng(0)
  down, up = rng.standard_normal((2, 32), np.float32), rng.standard_normal((32, 2), np.float32)
  module = f"{ATTN}.attn1.to_q"
  spellings = [
      {f"lora_unet_{module.replace('.', '_')}.lora_down.weight": down,
       f"lora_unet_{module.replace('.', '_')}.lora_up.weight": up},
      {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up},
      {f"base_model.model.{module}.lora_A.default.weight": down,
       f"base_model.model.{module}.lora_B.default.weight": up},
      {f"unet.{module}.lora.down.weight": down, f"unet.{module}.lora.up.weight": up},
      {f"unet.{ATTN}.attn1.processor.to_q_lora.down.weight": down,
       f"unet.{ATTN}.attn1.processor.to_q_lora.up.weight": up},
  ]
  deltas = [lora.resolve_lora(sd, {}, pipe.params).deltas for sd in spellings]
  path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
  for d in deltas:
    assert list(d) == ["unet"] and list(d["unet"]) == [path]
    np.testing.assert_array_equal(d["unet"][path], (up @ down).T)


# -- SDXL: two text encoders (lora_te1_ / lora_te2_) and SGM-named UNet keys, as kohya writes them --
SDXL_SGM = {  # kohya (SGM) name -> diffusers module, for testing.UNET_SDXL
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_q":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k":
        "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k",
    "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.1.conv_shortcut",
    "output_blocks_2_1_transformer_blocks_0_ff_net_0_proj":
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "label_emb_0_0": "add_embedding.linear_1", "time_embed_2": "time_embedding.linear_2",
}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sdxl") / "pipes")
  ref, _ = testing.write_torch_sdxl(folder, seed=12)
  return ref, sdjax.load_pipeline(os.path.join(folder, "base"))


def _sdxl_outputs_torch(ref):
  x, ctx = randn(2, 8, 8, 4), randn(2, 77, 64, seed=1)
  added = {"text_embeds": torch.from_numpy(randn(2, 20, seed=2)),
           "time_ids": torch.tensor([[32.0, 40, 0, 8, 24, 16]] * 2)}
  with torch.no_grad():
    eps = nhwc(ref.unet(nchw(x), torch.tensor([3, 700]), torch.from_numpy(ctx),
                        added_cond_kwargs=added).sample)
    text, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
  return eps, text.numpy(), pooled.numpy()


def _sdxl_outputs_ours(pipe, params):
  pipe = dataclasses.replace(pipe, params=params)
  x, ctx = randn(2, 8, 8, 4), randn(2, 77, 64, seed=1)
  time_ids = np.array([[32.0, 40, 0, 8, 24, 16]] * 2, np.float32)
  eps = pipe.predict_noise(x, np.array([3, 700]), ctx, randn(2, 20, seed=2), time_ids)
  text, _, pooled, _ = pipe.encode_prompt(PROMPTS)
  return np.asarray(eps), np.asarray(text), np.asarray(pooled)


def test_sdxl_kohya_vs_diffusers(sdxl, tmp_path):
  ref, pipe = sdxl
  gen, sd = torch.Generator().manual_seed(4), {}
  weights = _weights(ref.unet)
  for sgm, name in SDXL_SGM.items():
    sd[f"lora_unet_{sgm}.lora_down.weight"], sd[f"lora_unet_{sgm}.lora_up.weight"] = _factors(
        weights[name].shape, 2, gen)
  for prefix, model in (("lora_te1_", ref.text_encoder), ("lora_te2_", ref.text_encoder_2)):
    te_weights = _weights(model)
    for name in TEXT_MODULES:
      key = f"{prefix}text_model_{name.replace('.', '_')}"
      sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _factors(
          te_weights[name].shape, 2, gen)
  path = str(tmp_path / "sdxl.safetensors")
  save_file(sd, path)
  models = [ref.unet, ref.text_encoder, ref.text_encoder_2]
  saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
  base = _sdxl_outputs_torch(ref)
  ref.load_lora_weights(path)
  ref.fuse_lora(lora_scale=0.8)
  expected = _sdxl_outputs_torch(ref)
  ref.unfuse_lora()
  ref.unload_lora_weights()
  for m, state in zip(models, saved, strict=True):
    m.load_state_dict(state)
  ours = _sdxl_outputs_ours(pipe, lora.apply_loras(pipe, [(path, 0.8)]))
  for what, a, b, b0 in zip(("unet", "text", "pooled"), ours, expected, base, strict=True):
    assert np.linalg.norm(b - b0) / np.linalg.norm(b0) > 0.05  # the LoRA changes each output
    print(f"SDXL kohya {what}: rel err {assert_close(a, b):.2g}, "
          f"of the change {assert_close(a - b0, b - b0):.2g}")
