"""The allowlisting unpickler: torch files read bit-exactly without torch; hostile ones refused."""

import builtins
import os

import numpy as np
import pytest
import torch

from sdjax.checkpoints import safe_pickle
from sdjax.checkpoints.safe_pickle import UnsafePickleError


def _tensors():
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=gen)
  return {
      "f32": base,
      "f16": base.half(),
      "bf16": base.bfloat16(),
      "f64": base.double()[1:3],
      "int64": torch.arange(7),
      "int8": torch.arange(-3, 3, dtype=torch.int8),
      "uint8": torch.arange(5, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "transposed": base.T,  # non-contiguous strides
      "slice": base[1:, 2:5],  # storage offset into a shared storage
      "strided": base[::2, ::3],
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      "param": torch.nn.Parameter(base[:2].clone()),
      "conv": torch.randn(2, 3, 3, 3, generator=gen).permute(0, 2, 3, 1),  # channels-last
  }


def _as_numpy(t):
  t = t.detach()
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_read_back_bit_exact(tmp_path, legacy):
  tensors = _tensors()
  path = str(tmp_path / "model.ckpt")
  extras = {"global_step": 12, "epoch": 1, "name": "x", "nested": [1.5, (2, None)],
            "np_scalar": np.float64(0.25), "np_array": np.arange(6, dtype=np.int16).reshape(2, 3),
            "np_fortran": np.asfortranarray(np.ones((2, 3), np.float32) * 3), "tags": {"a", "b"}}
  torch.save({"state_dict": tensors, **extras}, path, _use_new_zipfile_serialization=not legacy)
  obj = safe_pickle.load(path)
  for key, value in extras.items():
    assert type(obj[key]) is type(value), key
    if key.startswith("np"):
      np.testing.assert_array_equal(obj[key], value)
    else:
      assert obj[key] == value, key
  state = safe_pickle.load_state_dict(path)
  assert sorted(state) == sorted(tensors)
  for name, t in tensors.items():
    want = _as_numpy(t)
    got = state[name]
    assert got.shape == want.shape, name
    if t.dtype == torch.bfloat16:
      assert got.dtype.name == "bfloat16"
      np.testing.assert_array_equal(got.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
    else:
      assert got.dtype == want.dtype, name
      np.testing.assert_array_equal(got, want, err_msg=name)


def test_module_state_dict(tmp_path):
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
  path = str(tmp_path / "pytorch_model.bin")
  torch.save(model.state_dict(), path)  # an OrderedDict with `_metadata`, as .bin files are
  state = safe_pickle.load_state_dict(path)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(state[k], v.numpy())


class _System:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f"touch {self.target}",)


class _Open:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return builtins.open, (self.target, "w")


class _Exec:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return builtins.exec, (f"open({self.target!r}, 'w').close()",)


@pytest.mark.parametrize("payload, global_name", [
    (_System, f"{os.system.__module__}.system"),
    (_Open, "(io|__builtin__|builtins).open"),
    (_Exec, "(__builtin__|builtins).exec"),  # protocol 2 spells builtins py2-style
])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hostile_pickle_refused_and_never_runs(tmp_path, payload, global_name, legacy):
  target = tmp_path / "pwned"
  path = str(tmp_path / "evil.ckpt")
  torch.save({"state_dict": {"w": torch.ones(2)}, "x": payload(str(target))}, path,
             _use_new_zipfile_serialization=not legacy)
  assert not target.exists()
  with pytest.raises(UnsafePickleError, match=f"global {global_name}") as e:
    safe_pickle.load(path)
  assert "\n" not in str(e.value)
  assert not target.exists()
  # The payload is real: torch's own unrestricted loader runs it.
  if not legacy:
    proof = str(tmp_path / "proof.pt")
    torch.save(payload(str(target)), proof)
    torch.load(proof, weights_only=False)  # noqa: S614
    assert target.exists()


def test_truncated_and_foreign_files(tmp_path):
  path = str(tmp_path / "model.ckpt")
  torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=False)
  data = open(path, "rb").read()
  cut = tmp_path / "cut.ckpt"
  cut.write_bytes(data[: len(data) - 1000])
  with pytest.raises(UnsafePickleError, match="cut.ckpt"):
    safe_pickle.load(str(cut))
  torch.save({"w": torch.randn(64, 64)}, path)
  data = open(path, "rb").read()
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(UnsafePickleError, match="cut.ckpt"):
    safe_pickle.load(str(cut))
  text = tmp_path / "notes.ckpt"
  text.write_text("hello")
  with pytest.raises(UnsafePickleError, match="notes.ckpt"):
    safe_pickle.load(str(text))
