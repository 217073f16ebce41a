"""Times sdjax's attention kernels against PyTorch's SDPA, interleaved in one process.

  python tools/attention_bench.py --tokens 4096 --heads 8 --head_dim 40 --repeats 5
  python tools/attention_bench.py --tokens 4096 --keys 77 --kernels blocked,einsum,torch

Each round calls every kernel once, in turn, so machine load hits all of them alike; reports the
best wall time and the best process CPU time (all threads) of the rounds. On a shared machine the
CPU time is the steadier measure of work; the wall time is what a user waits on an idle one.
`flash` is a flash-style kernel kept here for the record (online softmax over key blocks of
`--key_block`, heads and query blocks batched): it measured slower than `blocked` on CPU.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

_TOKENS = flags.DEFINE_integer("tokens", 4096, "queries N")
_KEYS = flags.DEFINE_integer("keys", None, "keys M (default: N, self-attention)")
_HEADS = flags.DEFINE_integer("heads", 8, "heads H")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 40, "head dim D")
_BATCH = flags.DEFINE_integer("batch", 2, "batch B")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "jax dtype")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed rounds after one warm-up")
_KERNELS = flags.DEFINE_list("kernels", "torch,einsum,chunked,blocked", "kernels to time: "
                             "torch, einsum, chunked, blocked, blocked:<queries>, xla, flash")
_KEY_BLOCK = flags.DEFINE_integer("key_block", 512, "flash: keys per block")


def _flash(q, k, v, key_block):
  """Online softmax over key blocks (running max and sum), all queries and heads at once."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  b, n, h, d = q.shape
  m = k.shape[1]
  q = (q * d**-0.5).transpose(0, 2, 1, 3)  # B, H, N, D
  kb = k.transpose(0, 2, 1, 3).reshape(b, h, m // key_block, key_block, d)  # B, H, S, kb, D
  vb = v.transpose(0, 2, 1, 3).reshape(b, h, m // key_block, key_block, d)  # B, H, S, kb, D

  def body(carry, kv):
    top, total, acc = carry
    scores = jnp.einsum("bhnd,bhmd->bhnm", q, kv[0])  # B, H, N, kb
    new_top = jnp.maximum(top, scores.max(-1))
    probs = jnp.exp(scores - new_top[..., None])
    fix = jnp.exp(top - new_top)
    acc = acc * fix[..., None] + jnp.einsum("bhnm,bhmd->bhnd", probs, kv[1])
    return (new_top, total * fix + probs.sum(-1), acc), None

  init = (jnp.full((b, h, n), -jnp.inf), jnp.zeros((b, h, n)), jnp.zeros((b, h, n, d)))
  xs = (kb.transpose(2, 0, 1, 3, 4), vb.transpose(2, 0, 1, 3, 4))  # S, B, H, kb, D
  (_, total, acc), _ = jax.lax.scan(body, init, xs)
  return (acc / total[..., None]).transpose(0, 2, 1, 3)  # B, N, H, D


def _jax_fn(name, q, k, v):
  import jax  # noqa: PLC0415

  from sdjax.models import attention  # noqa: PLC0415

  if name == "flash":
    fn = jax.jit(lambda q, k, v: _flash(q, k, v, _KEY_BLOCK.value))
  else:
    kernel, _, block = name.partition(":")
    block = int(block or attention.QUERY_BLOCK)
    fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, kernel=kernel,
                                                                  block=block))
  compiled = fn.lower(q, k, v).compile()
  return lambda: jax.block_until_ready(compiled(q, k, v))


def main(argv):
  del argv
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415

  b, n, h, d = _BATCH.value, _TOKENS.value, _HEADS.value, _HEAD_DIM.value
  m = _KEYS.value or n
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((b, t, h, d), np.float32) for t in (n, m, m))
  fns = {}
  for name in _KERNELS.value:
    if name == "torch":
      tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
      fns[name] = lambda tq=tq, tk=tk, tv=tv: torch.nn.functional.scaled_dot_product_attention(
          tq, tk, tv)
    else:
      dtype = jnp.dtype(_DTYPE.value)
      fns[name] = _jax_fn(name, *(jnp.asarray(x, dtype) for x in (q, k, v)))
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  with torch.no_grad():
    for fn in fns.values():
      fn()
    for _ in range(_REPEATS.value):
      for name, fn in fns.items():
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall[name].append(time.perf_counter() - w)
        cpu[name].append(time.process_time() - c)
  for name in fns:
    print(json.dumps(dict(
        what="attention", kernel=name, batch=b, tokens=n, keys=m, heads=h, head_dim=d,
        dtype="float32" if name == "torch" else _DTYPE.value, best_ms=round(min(wall[name]) * 1e3,
                                                                          1),
        best_cpu_ms=round(min(cpu[name]) * 1e3, 1), wall_ms=[round(t * 1e3) for t in wall[name]],
        torch_threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M"))))


if __name__ == "__main__":
  sys.exit(app.run(main))
