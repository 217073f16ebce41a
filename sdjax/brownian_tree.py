"""The Brownian noise of A1111's, ComfyUI's and diffusers' SDE samplers, made on device.

k-diffusion's `BrownianTreeNoiseSampler` (A1111's "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE";
ComfyUI's dpmpp_*sde; diffusers' `DPMSolverSDEScheduler`) hands a step from sigma to sigma_next
the increment of a Brownian motion W over [sigma_next, sigma], divided by its standard deviation.
W is torchsde's `BrownianTree` (a `BrownianInterval` with tol 1e-6, pool_size 24 and the
"halfway" dyadic tree), one per image, seeded (`entropy`) by the image's seed:

- The tree's range [sigma_min, sigma_max] (the run's smallest nonzero and largest sigma, its ends
  rounded to 6 decimals) is its root node, whose W is `randn * sqrt(t1 - t0)`.
- A query [ta, tb] (rounded too) is cut into nodes: a node that must end at a query point splits
  at its rounded midpoint, and again, until some split lands on the point (about 24 levels). A
  node's children take W_left = (l / h) W + sqrt(l r / h) z, W_right = W - W_left (l, r: the
  children's lengths, h the node's; z a fresh normal), the bridge of W at the midpoint.
- Each random draw is a fresh `torch.randn` from a generator seeded with a word from numpy's
  `SeedSequence(entropy, spawn_key=(key, depth), pool_size=24)` (key: the node's path in the
  tree, depth: its level; the root's from `SeedSequence(entropy, pool_size=24)`), on the tree's
  device: torch's CPU generator (`torch_rng`; ComfyUI's non-_gpu samplers, diffusers on CPU) or
  CUDA's (`nv_rng`, the same values as A1111's NV source: A1111 and diffusers on an NVIDIA GPU).
- A query's answer is the sum of its nodes' W, left to right, in float32.

Which nodes exist depends only on the query points, which are known before a run: `plan`
replays torchsde's bookkeeping on the host, in Python floats as it does, and lays the work out
as a static program (`TreePlan`): splits in depth-first order, each writing its children into
a few reusable slots, sums of a query's nodes, and each query's scaled answer. `increments`
runs that program (a `lax.scan`) for a batch of seeds, with the SeedSequence words computed on
device from the seeds (numpy's hash, restated in uint32 arithmetic), so a run's noise is a pure
function of its seeds, as every other noise here. Values match torch's to float32 rounding:
every product and sum is rounded as torch rounds it.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import nv_rng, torch_rng
from sdjax.schedulers.common import rounded, true_divide

# torchsde.BrownianTree's defaults, which k-diffusion and diffusers keep.
TOL = 1e-6
POOL_SIZE = 24
GENERATORS = ("torch_cpu", "nv")  # the tree's device: torch's CPU generator, or CUDA's

_DIGITS = -int(math.log10(TOL))  # torchsde's rounding of every time to the tolerance

# numpy's SeedSequence hash (numpy/random/bit_generator.pyx).
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_XSHIFT = 16


def _powers(init: int, mult: int, count: int) -> np.ndarray:
  out, value = [], init
  for _ in range(count):
    out.append(value)
    value = value * mult & 0xFFFFFFFF
  return np.asarray(out, np.uint32)


# The hash constant before each of a SeedSequence's hashmix calls (it advances by one
# multiplication per call, whatever the data): 24 for the pool, 24 * 23 mixing it, 24 per extra
# entropy word (at most 2: the spawn key and depth).
_HASH_A = _powers(_INIT_A, _MULT_A, POOL_SIZE * POOL_SIZE + 2 * POOL_SIZE + 1)
_HASH_B = _powers(_INIT_B, _MULT_B, 8)


def _u32(value) -> jax.Array:
  return jnp.asarray(value, jnp.uint32)


def _hashmix(value, call: np.ndarray | int) -> jax.Array:
  """numpy's hashmix at call number(s) `call` (their hash constants are fixed)."""
  value = value ^ _u32(_HASH_A[call])
  value = value * _u32(_HASH_A[np.asarray(call) + 1])
  return value ^ (value >> _XSHIFT)


def _mix(x, y) -> jax.Array:
  result = _u32(_MIX_MULT_L) * x - _u32(_MIX_MULT_R) * y
  return result ^ (result >> _XSHIFT)


def seed_sequence_words(entropy_lo, entropy_hi, spawn_key=None, n_words: int = 1) -> jax.Array:
  """uint32 [..., n_words]: numpy's `SeedSequence(entropy, spawn_key=spawn_key,
  pool_size=24).generate_state(n_words)` for entropy = entropy_hi * 2**32 + entropy_lo (uint32
  arrays, one entry per sequence). `spawn_key`: None, or (key, depth) words (uint32 [..., 2],
  both < 2**32), broadcast against the entropy.

  numpy pads the entropy with zeros to the pool size when there is a spawn key, and hashes
  missing pool words as zeros otherwise: either way a one-word entropy reads as (lo, 0).
  """
  lo, hi = _u32(entropy_lo), _u32(entropy_hi)
  if spawn_key is not None:
    spawn_key = _u32(spawn_key)
    lo, hi = (jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, spawn_key.shape[:-1]))
              for x in (lo, hi))
  words = jnp.zeros((*lo.shape, POOL_SIZE), jnp.uint32).at[..., 0].set(lo).at[..., 1].set(hi)
  pool = _hashmix(words, np.arange(POOL_SIZE))
  call = POOL_SIZE
  for src in range(POOL_SIZE):  # mix every word into every other, in numpy's order
    dst = np.array([d for d in range(POOL_SIZE) if d != src])
    calls = np.full(POOL_SIZE, call)
    calls[dst] = call + np.arange(POOL_SIZE - 1)
    mixed = _mix(pool, _hashmix(pool[..., src:src + 1], calls))
    pool = jnp.where(np.arange(POOL_SIZE) == src, pool, mixed)
    call += POOL_SIZE - 1
  for i in range(0 if spawn_key is None else spawn_key.shape[-1]):
    extra = spawn_key[..., i:i + 1]
    pool = _mix(pool, _hashmix(extra, call + np.arange(POOL_SIZE)))
    call += POOL_SIZE
  out = []
  for k in range(n_words):
    value = pool[..., k % POOL_SIZE] ^ _u32(_HASH_B[k])
    value = value * _u32(_HASH_B[k + 1])
    out.append(value ^ (value >> _XSHIFT))
  return jnp.stack(out, axis=-1)


class _Node:
  """A node of torchsde's interval tree: [start, end], split at `midway` once it has children."""

  __slots__ = ("start", "end", "parent", "is_left", "midway", "left", "right", "key", "depth")

  def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool):
    self.start, self.end = round(start, _DIGITS), round(end, _DIGITS)
    self.parent, self.is_left = parent, is_left
    self.midway = self.left = self.right = None
    self.key = self.depth = 0

  def split(self, point: float) -> None:
    """torchsde's `_split` of a halfway tree: at the midpoint, then the child holding `point`,
    until a midpoint is `point`."""
    node = self
    while True:
      node.midway = round(0.5 * (node.end + node.start), _DIGITS)
      if node.parent is not None:
        node.key = 2 * node.parent.key + (0 if node.is_left else 1)
        node.depth = node.parent.depth + 1
      node.left = _Node(node.start, node.midway, node, True)
      node.right = _Node(node.midway, node.end, node, False)
      if point > node.midway:
        node = node.right
      elif point < node.midway:
        node = node.left
      else:
        return

  def locate(self, ta: float, tb: float, out: list[_Node]) -> None:
    """torchsde's `_loc_inner`: the nodes that make up [ta, tb] (within this node), in order."""
    node = self
    while True:
      if ta == node.start and tb == node.end:
        out.append(node)
        return
      if node.midway is None:
        node.split(tb if ta == node.start else ta)
      if tb <= node.midway:
        node = node.left
      elif ta >= node.midway:
        node = node.right
      else:
        node.left.locate(ta, node.midway, out)
        ta, node = node.midway, node.right


# Program ops (`TreePlan.ops` rows: kind, a, b, d, k), each writing one slot d: the left child
# of the node in slot a (with draw k); the right child (slot a less the left child in slot b);
# slots a + b; slot a scaled as query k's answer (d: its row after the slots). One write an op
# keeps XLA's updates of the slots in place.
LEFT, RIGHT, ADD, EMIT = 0, 1, 2, 3
# A slot never written (zeros), one written but never read, and the root's.
_ZERO, _TRASH, _ROOT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TreePlan:
  """The static program that makes a set of queries' Brownian increments (`plan`).

  t0, t1: the tree's range as torch has it (unrounded), root_scale: float32 sqrt(t1 - t0).
  spawn: (key, depth) of the node each split draws for, in draw order.
  ops: (kind, a, b, d, k) rows; coefficients: (c1, c2, c3) float32 per op (left child: l, 1 / h,
    sqrt(l r / h); emit: the sign and the float32 sqrt(|sigma_next - sigma|) dividing it).
  slots: how many value slots the program needs; queries: how many answers it emits.
  """

  t0: float
  t1: float
  root_scale: float
  spawn: tuple[tuple[int, int], ...]
  ops: tuple[tuple[int, int, int, int, int], ...]
  coefficients: tuple[tuple[float, float, float], ...]
  slots: int
  queries: int


def plan(sigma_min: float, sigma_max: float, queries) -> TreePlan:
  """The program for a noise sampler over [sigma_min, sigma_max] (float32 values, as the sampler
  gets them) called with `queries`: (sigma, sigma_next) float32 pairs, in call order. A call
  whose ends are equal answers 0 / 0 (NaN), as k-diffusion's."""
  f32 = np.float32
  t0, t1, tree_sign = float(f32(sigma_min)), float(f32(sigma_max)), 1
  if t1 < t0:  # k-diffusion's BatchedBrownianTree sorts its ends and remembers the order
    t0, t1, tree_sign = t1, t0, -1
  root = _Node(t0, t1, None, False)
  pieces, emits = [], []
  for sigma, sigma_next in queries:
    a, b = f32(sigma), f32(sigma_next)
    ta, tb, sign = (float(a), float(b), 1) if a < b else (float(b), float(a), -1)
    ta, tb = min(max(ta, root.start), root.end), min(max(tb, root.start), root.end)
    out: list[_Node] = []
    if ta != tb:
      if round(ta, _DIGITS) == round(tb, _DIGITS):  # torchsde recurses without end there
        raise ValueError(f"noise levels {a} and {b} are closer than the Brownian tree's "
                         f"resolution ({TOL}): torchsde cannot answer that step")
      root.locate(round(ta, _DIGITS), round(tb, _DIGITS), out)
    pieces.append(out)
    emits.append((float(tree_sign * sign), float(np.sqrt(np.abs(b - a)))))
  return _program(root, pieces, emits, t0, t1)


def _program(root: _Node, pieces: list[list[_Node]], emits, t0: float, t1: float) -> TreePlan:
  """Lays the splits out depth first, with slots reused once their values are spent."""
  uses: dict[int, int] = {}  # id(node) -> reads left (its split, the sums it is a piece of)
  needed: set[int] = set()
  splitting: dict[int, _Node] = {}
  for out in pieces:
    for node in out:
      uses[id(node)] = uses.get(id(node), 0) + 1
      while node is not None and id(node) not in needed:
        needed.add(id(node))
        if node.parent is not None:
          splitting[id(node.parent)] = node.parent
        node = node.parent
  for key in splitting:  # a split reads its node once
    uses[key] = uses.get(key, 0) + 1
  waiting = {q: len(out) for q, out in enumerate(pieces)}
  by_node: dict[int, list[int]] = {}
  for q, out in enumerate(pieces):
    for node in out:
      by_node.setdefault(id(node), []).append(q)
  ops, coefficients, spawn = [], [], []
  slot_of: dict[int, int] = {}
  free: list[int] = []
  top = [2]  # the next unused slot

  def take() -> int:
    if free:
      return heapq.heappop(free)
    top[0] += 1
    return top[0] - 1

  def read(node: _Node) -> None:
    uses[id(node)] -= 1
    if not uses[id(node)]:
      heapq.heappush(free, slot_of.pop(id(node)))

  def emit(q: int) -> None:
    out, (sign, scale) = pieces[q], emits[q]
    acc = slot_of[id(out[0])] if out else _ZERO
    for i, node in enumerate(out[1:]):
      total = take()
      ops.append((ADD, acc, slot_of[id(node)], total, 0))
      coefficients.append((0.0, 0.0, 0.0))
      if i:
        heapq.heappush(free, acc)
      acc = total
    ops.append((EMIT, acc, 0, -1, q))
    coefficients.append((sign, scale, 0.0))
    if len(out) > 1:
      heapq.heappush(free, acc)
    for node in out:
      read(node)

  def arrived(node: _Node) -> None:
    for q in by_node.get(id(node), ()):
      waiting[q] -= 1
      if not waiting[q]:
        emit(q)

  for q, out in enumerate(pieces):
    if not out:
      emit(q)
  slot_of[id(root)] = take()  # _ROOT
  arrived(root)
  stack = [root]
  while stack:
    node = stack.pop()
    children = [c for c in (node.left, node.right) if c is not None and id(c) in needed]
    if not children:
      continue
    left, right = (take() if id(c) in needed else _TRASH for c in (node.left, node.right))
    length, l_len, r_len = node.end - node.start, node.midway - node.start, node.end - node.midway
    h_reciprocal = 1 / length
    ops.append((LEFT, slot_of[id(node)], 0, left, len(spawn)))
    coefficients.append((l_len, h_reciprocal, math.sqrt(l_len * r_len * h_reciprocal)))
    if right != _TRASH:  # the next op: before anything else writes the left child's slot
      ops.append((RIGHT, slot_of[id(node)], left, right, 0))
      coefficients.append((0.0, 0.0, 0.0))
    spawn.append((node.key, node.depth))
    read(node)
    for child, slot in ((node.left, left), (node.right, right)):
      if slot != _TRASH:
        slot_of[id(child)] = slot
        uses.setdefault(id(child), 0)
    for child in (node.left, node.right):
      if id(child) in needed:
        arrived(child)
    stack.extend(c for c in (node.right, node.left) if id(c) in needed)  # left first
  return TreePlan(t0=t0, t1=t1, root_scale=float(np.float32(math.sqrt(t1 - t0))),
                  spawn=tuple(spawn), ops=tuple(ops),
                  coefficients=tuple(tuple(float(np.float32(c)) for c in row)
                                     for row in coefficients),
                  slots=top[0], queries=len(pieces))


def _draws(generator: str, n: int):
  """A function from uint32 seeds [...] (flat) to each seed's fresh `torch.randn(n)` [..., n]."""
  if generator == "nv":
    zero = jnp.uint32(0)
    return jax.vmap(lambda s: nv_rng.randn(s, zero, 1, n)[0])
  if generator == "torch_cpu":
    return jax.vmap(lambda state: torch_rng.randn(None, 1, n, state)[0])
  raise ValueError(f"unknown Brownian tree generator {generator!r}; use one of "
                   f"{', '.join(GENERATORS)}")


def _chunked(tree: TreePlan, chunk: int) -> tuple[np.ndarray, ...]:
  """The ops as [chunks, length] arrays, chunk c holding the ops from left child c * `chunk` up
  to the next chunk's first (padded with ops that write only the trash): (kind, a, b, d, draw
  within the chunk, coefficients [..., 3]); an emit's d is its answer's row after the slots."""
  ops = np.asarray(tree.ops, np.int32).reshape(-1, 5)
  coefficients = np.asarray(tree.coefficients, np.float32).reshape(-1, 3)
  kind = ops[:, 0]
  # an op goes with the last left child's draw (a right child right after it, in one chunk)
  owner = np.maximum(np.cumsum(kind == LEFT) - 1, 0) // chunk
  chunks = max(-(-len(tree.spawn) // chunk), 1)
  columns = (kind, ops[:, 1], ops[:, 2], np.where(kind == EMIT, tree.slots + ops[:, 4], ops[:, 3]),
             ops[:, 4] % chunk, coefficients)
  pads = (ADD, _ZERO, _ZERO, _TRASH, 0, 0.0)
  length = max(np.bincount(owner, minlength=chunks).max(), 1)
  out = []
  for column, pad in zip(columns, pads, strict=True):
    table = np.full((chunks, length, *column.shape[1:]), pad, column.dtype)
    for c in range(chunks):
      mine = column[owner == c]
      table[c, :len(mine)] = mine
    out.append(table)
  return tuple(out)


def increments(tree: TreePlan, generator: str, seeds, shape: tuple[int, int, int],
               seeds_hi=None, chunk: int = 32) -> jax.Array:
  """float32 [B, queries, h, w, C]: the noise sampler's answers to `tree`'s queries, one tree
  per image of latent `shape` [h, w, C] (drawn in torch's C, h, w order) seeded by `seeds` (their
  low uint32 words; `seeds_hi` their high ones, default 0). `generator`: `GENERATORS`.

  The ops run in chunks of `chunk` splits: each chunk's draws are made at once (the Mersenne
  Twister's sequential twists then run over many generators together), then its ops in turn.
  """
  h, w, channels = shape
  n = channels * h * w
  lo = _u32(seeds)
  hi = jnp.zeros_like(lo) if seeds_hi is None else _u32(seeds_hi)
  batch = lo.shape[0]
  draw = _draws(generator, n)
  kind, a, b, d, k, coefficients = _chunked(tree, chunk)
  splits = kind.shape[0] * chunk
  spawn = np.zeros((splits, 2), np.uint32)  # the last chunk padded with (0, 0)'s draws
  spawn[:len(tree.spawn)] = np.asarray(tree.spawn, np.uint32).reshape(-1, 2)
  split_seeds = seed_sequence_words(lo[None, :], hi[None, :], spawn[:, None, :])[..., 0]
  split_seeds = split_seeds.reshape(-1, chunk * batch)  # chunks, chunk * B
  root_seed = seed_sequence_words(lo, hi)[:, 0]  # B
  if generator == "torch_cpu":  # the generators' states, seeded at once
    split_seeds = jax.vmap(jax.vmap(torch_rng.seeded_state))(split_seeds)  # ..., 624
    root_seed = jax.vmap(torch_rng.seeded_state)(root_seed)
  root = rounded(draw(root_seed) * jnp.float32(tree.root_scale))  # B, n
  # the work slots, then one row per answer
  values = jnp.zeros((tree.slots + tree.queries, batch, n), jnp.float32).at[_ROOT].set(root)

  def op(carry, x):
    values, draws = carry
    kind, a, b, d, k, c = x
    node, other = values[a], values[b]
    left = rounded(rounded(node * c[0]) * c[1]) + rounded(c[2] * draws[k])
    answer = true_divide(rounded(node * c[0]), c[1])
    value = jnp.select([kind == LEFT, kind == RIGHT, kind == ADD],
                       [left, node - other, node + other], answer)
    return (values.at[d].set(value), draws), None

  def run_chunk(values, x):
    seeds, ops = x[0], x[1:]
    draws = draw(seeds).reshape(chunk, batch, n)
    (values, _), _ = jax.lax.scan(op, (values, draws), ops)
    return values, None

  values, _ = jax.lax.scan(run_chunk, values, (split_seeds, kind, a, b, d, k, coefficients))
  out = values[tree.slots:].reshape(tree.queries, batch, channels, h, w)
  return jnp.transpose(out, (1, 0, 3, 4, 2))  # B, queries, h, w, C
