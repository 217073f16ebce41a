"""Helpers for parity tests: layout changes at the edge, weight transfer, the error measure."""

from __future__ import annotations

import jax
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


def transfer(torch_module, flax_module, *example_inputs, method=None):
  """Converts a PyTorch module's weights into params for `flax_module` (strictly)."""
  expected = jax.eval_shape(
      lambda: flax_module.init(jax.random.key(0), *example_inputs, method=method)
  )["params"]
  return torch_to_flax(state_dict(torch_module), expected, type(flax_module).__name__)


def randn(*shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
