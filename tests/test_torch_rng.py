"""torch's CPU generator on device against torch itself (and numpy's Mersenne Twister)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import torch_rng

torch.set_num_threads(1)


def _numpy_mt19937(seed: int, count: int) -> np.ndarray:
  """numpy's MT19937 outputs after the standard 32-bit seeding (RandomState's)."""
  bits = np.random.MT19937()
  key = np.random.RandomState(seed).get_state()[1]
  bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
  return bits.random_raw(count).astype(np.uint32)


@pytest.mark.parametrize("seed", [0, 5, 123456789, 2**32 - 1])
def test_mt19937_is_the_standard_generator(seed):
  """Bit for bit over several state blocks (the twist's four pieces each matter)."""
  np.testing.assert_array_equal(np.asarray(torch_rng.mt19937(jnp.uint32(seed), 2000)),
                                _numpy_mt19937(seed, 2000))


@pytest.mark.parametrize("n", [16, 256, 324, 1000])  # whole blocks of 16, and a remade tail
def test_randn_is_torchs(n):
  """Successive torch.randn(n) of one seeded CPU generator: the same stream, each value within
  float32 rounding of torch's (its log, sin and cos round in the last bit now and then)."""
  for seed in (0, 42, 2**32 - 1):
    gen = torch.Generator().manual_seed(seed)
    expected = torch.stack([torch.randn(n, generator=gen) for _ in range(3)]).numpy()
    ours = np.asarray(torch_rng.randn(jnp.uint32(seed), 3, n))
    np.testing.assert_allclose(ours, expected, rtol=2.5e-7, atol=1e-7)


def test_latent_layout_and_batches():
  """[B, draws, h, w, C] from torch.randn(C, h, w) per image; vmapped seeds are independent."""
  seeds = np.array([7, 8], np.uint32)
  ours = np.asarray(jax.jit(torch_rng.randn_nchw, static_argnums=(1, 2))(seeds, 2, (4, 6, 3)))
  assert ours.shape == (2, 2, 4, 6, 3)
  for b, seed in enumerate(seeds):
    gen = torch.Generator().manual_seed(int(seed))
    for d in range(2):
      expected = torch.randn(3, 4, 6, generator=gen).numpy().transpose(1, 2, 0)
      np.testing.assert_allclose(ours[b, d], expected, rtol=2.5e-7, atol=1e-7)


def test_seed_takes_the_low_32_bits_and_small_draws_are_refused():
  a = torch.randn(32, generator=torch.Generator().manual_seed(2**32 + 5))
  b = torch.randn(32, generator=torch.Generator().manual_seed(5))
  assert torch.equal(a, b)  # what seeding with a uint32 relies on
  with pytest.raises(ValueError, match="randn of 15 < 16 values"):
    torch_rng.draw_size(15)
  assert torch_rng.draw_size(32) == 32 and torch_rng.draw_size(33) == 49
