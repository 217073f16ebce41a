"""tools/flops.py: the model FLOPs behind tools/benchmark.py's TFLOP/s and MFU."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from sdjax.models import attention

_SPEC = importlib.util.spec_from_file_location(
    "flops", os.path.join(os.path.dirname(__file__), "..", "tools", "flops.py"))
flops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(flops)


def count(fn, *args):
  return flops.jaxpr_flops(jax.make_jaxpr(fn)(*args))


def test_matmul_and_convolution():
  a, b = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  assert count(jnp.matmul, a, b) == 2 * 2 * 3 * 5 * 4
  x = jnp.ones((2, 9, 7, 6))  # NHWC
  kernel = jnp.ones((3, 3, 3, 10))  # HWIO, 2 groups of 3 input channels
  conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  out = jax.eval_shape(conv, x, kernel).shape
  assert out == (2, 5, 7, 10)
  assert count(conv, x, kernel) == 2 * (2 * 5 * 7 * 10) * (3 * 3 * 3)
  # Where nothing loops (and no padding enters the window: XLA skips padded taps), XLA's cost
  # analysis counts the same.
  valid = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (2, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  for fn, args in ((jnp.matmul, (a, b)), (valid, (x, kernel))):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] == pytest.approx(count(fn, *args), rel=0.02)


def test_loops_count_every_trip():
  w = jnp.ones((8, 8))

  def scanned(x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=7)[0]

  def branches(x, p):
    return jax.lax.cond(p, lambda x: x @ w @ w, lambda x: x @ w, x)

  x = jnp.ones((4, 8))
  one = 2 * 4 * 8 * 8
  assert count(scanned, x) == 7 * one
  assert count(jax.jit(scanned), x) == 7 * one  # through a nested jit
  assert count(branches, x, True) == 2 * one  # the costlier branch
  while_loop = lambda x: jax.lax.while_loop(lambda c: c.sum() < 9, lambda c: c @ w, x)  # noqa: E731
  with pytest.raises(ValueError, match="trip count"):
    count(while_loop, x)


@pytest.mark.parametrize("kernel", ["blocked", "chunked"])
def test_looped_attention_counts_as_the_einsum(kernel):
  """The CPU attention kernels loop over query blocks: the same FLOPs as one einsum."""
  q = jnp.ones((2, 1024, 3, 16))
  k = v = jnp.ones((2, 616, 3, 16))
  attend = lambda kernel: lambda q, k, v: attention.dot_product_attention(  # noqa: E731
      q, k, v, kernel=kernel)
  dense = count(attend("einsum"), q, k, v)
  assert dense == 2 * (2 * 2 * 3 * 1024 * 616 * 16)  # QK^T and PV
  assert count(attend(kernel), q, k, v) == dense
