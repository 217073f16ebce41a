"""Data parallelism over every device of every host: a mesh and a shard_map'ed sampler.

Each device runs exactly the single-device sampling program on its own `per_device` images, so
an image's pixels do not depend on how many devices or hosts made it (at the same per-device
batch). This is the per-device program `jax.pmap` gave, written with `jax.shard_map`, which
extends to multi-host meshes.

With CFG parallelism the mesh is 2-D, (data, cfg): the two devices of a cfg pair hold the same
images and each makes one of their guidance calls (uncond or cond), which halves an image's
time per step when there are fewer images than devices. The pixels equal those of the split
guidance program on one device (`SampleSpec.cfg_split`), however many pairs make them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax import sampling

DATA, CFG = "data", sampling.CFG_AXIS


def set_cpu_devices(count: int) -> None:
  """Splits the CPU into `count` devices (0: one per core) before JAX starts its backends.

  Each device runs its own images' program on one stream of work: on a CPU-only host that keeps
  every core busy where one program's small parallel operations leave cores waiting on each
  other (BENCHMARKS.md, "CPU IV"). Accelerators are unaffected.
  """
  count = count or len(os.sched_getaffinity(0))
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    if len(jax.devices("cpu")) != count:
      raise ValueError(f"--cpu_devices {count}: JAX has already started with "
                       f"{len(jax.devices('cpu'))} CPU devices in this process") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None) -> None:
  """Joins a multi-host run: explicitly with a coordinator, or automatically on TPU pods.

  `cpu_devices`: see `set_cpu_devices` (None: JAX's default, or XLA_FLAGS').
  """
  if cpu_devices is not None:
    set_cpu_devices(cpu_devices)
  if coordinator_address:
    # CPU devices need a collectives backend to join one mesh; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(cfg_parallel: bool = False) -> Mesh:
  """A mesh over all devices of all processes, each process's devices contiguous: 1-D (data),
  or with `cfg_parallel` and more than one device (data, cfg) of pairs within a process."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if not cfg_parallel or len(devices) == 1:
    return Mesh(np.asarray(devices), (DATA,))
  if jax.local_device_count() % 2:
    raise ValueError(f"CFG parallelism pairs devices, but this process has "
                     f"{jax.local_device_count()}: use an even number (or one device in all)")
  return Mesh(np.asarray(devices).reshape(-1, 2), (DATA, CFG))


def data_size(mesh: Mesh) -> int:
  """How many groups of devices hold different images (the mesh's data axis)."""
  return mesh.shape[DATA]


def local_data_size(mesh: Mesh) -> int:
  """How many of those groups this process's devices make."""
  return len(_local_data_indices(mesh))


def _local_data_indices(mesh: Mesh) -> list[int]:
  rows = mesh.devices.reshape(data_size(mesh), -1)
  return [i for i, row in enumerate(rows) if row[0].process_index == jax.process_index()]


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device once (params)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


def local_slice(mesh: Mesh, global_batch: int) -> slice:
  """Which rows of a global batch this process's devices hold."""
  per_device = global_batch // data_size(mesh)
  local = _local_data_indices(mesh)
  return slice(local[0] * per_device, (local[-1] + 1) * per_device)


def shard_batch(mesh: Mesh, local_data: np.ndarray, global_batch: int):
  """A global array split along the data axis, from this process's rows."""
  sharding = NamedSharding(mesh, P(DATA))
  shape = (global_batch, *local_data.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local_data, shape)


def sharded_sampler(mesh: Mesh, spec: sampling.SampleSpec, pipe, refiner=None, hires=None,
                    hires_pipe=None, first_refiner=None):
  """The sampling program, run per device on its share of a global batch.

  Returns a jitted `f(params, cond, seeds, guidance_scale, guidance_rescale, state) -> images`
  (img2img, `spec.img2img`: `f(..., state, init_images)`; with a ControlNet, `spec.control`:
  `f(..., control_images, scale, weights)`, see `sampling.sample_fn`'s `control`); `cond` is a
  `sampling.Conditioning`
  whose leaves, like `seeds` and the images, are sharded along the mesh's data axis (see
  `shard_tree`). With `refiner=(refiner_spec, refiner_pipe)` (an SDXL
  base -> refiner handoff, `spec` ending in latents) `params`, `cond` and `state` are
  (base, refiner) pairs and both stages run in the one program (a ControlNet steers the
  base's). With `hires` (the hires pass's spec, `spec` ending in latents, or in images for a
  pixel upscaler) `cond` and `state` are (first pass, hires pass) pairs; a ControlNet steers
  both, `f(..., control_images, scale, weights, hires_control_images, hires_weights)`; with
  `hires_pipe` (another model for the hires pass) `params` are (first pass, hires pass) pairs
  too. With both `hires` and `refiner` the refiner takes the hires pass over (`hires` ending in
  latents): `cond` and `state` are triples (first pass, hires pass, refiner), `params` the
  (model, refiner) pair. With `hires` and `first_refiner=(refiner_spec, refiner_pipe)` the
  refiner finishes the first pass (`spec` ending in latents) and hands the hires pass its latents
  or images (A1111's "Hires refiner: first pass", with `refiner` too "both passes"): its
  conditioning and state come last in `cond` and `state`, `params` the (model, refiner) pair.
  """
  latent_shape = (*spec.latent_hw, sampling.latent_channels(pipe))
  nets = pipe.networks
  cfg_axis = CFG if CFG in mesh.axis_names else None
  if cfg_axis is not None and not spec.cfg_split:
    raise ValueError("a (data, cfg) mesh needs a spec prepared with cfg_split=True")

  def per_device(params, cond, seeds, guidance_scale, guidance_rescale, state, *extra):
    init = extra[0] if spec.img2img else None
    control = hires_control = None
    if spec.control:
      control = tuple(extra[int(spec.img2img):][:3])
      if hires is not None:
        hires_control = (extra[-2], control[1], extra[-1])
    noise = sampling.initial_noise(seeds, latent_shape)
    if hires is not None:
      refined = refiner is not None or first_refiner is not None
      model = params[0] if refined else params  # (a refiner: not with hires_pipe)
      first, second = (model, model) if hires_pipe is None else params
      latents = sampling.sample_fn(spec, nets, first, cond[0], seeds, noise, guidance_scale,
                                   guidance_rescale, init, state[0], cfg_axis, control)
      if first_refiner is not None:
        latents, carried = sampling.handed_over(spec, latents, state[-1], init)
        latents = sampling.sample_fn(first_refiner[0], first_refiner[1].networks, params[1],
                                     cond[-1], seeds, noise, guidance_scale, guidance_rescale,
                                     latents, carried, cfg_axis)
      out = sampling.sample_fn(hires, nets if hires_pipe is None else hires_pipe.networks,
                               second, cond[1], seeds, noise, guidance_scale,
                               guidance_rescale, latents, state[1], cfg_axis, hires_control)
      if refiner is None:
        return out
      carried = state[2]
      if hires.output_state:  # A1111's switch: the hires pass's sampler runs on into the refiner
        out, carried = out
      return sampling.sample_fn(refiner[0], refiner[1].networks, params[1], cond[2], seeds,
                                noise, guidance_scale, guidance_rescale, out, carried, cfg_axis)
    if refiner is None:
      return sampling.sample_fn(spec, nets, params, cond, seeds, noise, guidance_scale,
                                guidance_rescale, init, state, cfg_axis, control)
    latents = sampling.sample_fn(spec, nets, params[0], cond[0], seeds, noise, guidance_scale,
                                 guidance_rescale, init, state[0], cfg_axis, control)
    latents, carried = sampling.handed_over(spec, latents, state[1], init)
    return sampling.sample_fn(refiner[0], refiner[1].networks, params[1], cond[1], seeds, noise,
                              guidance_scale, guidance_rescale, latents, carried, cfg_axis)

  batch = P(DATA)  # and replicated over the cfg axis, if any
  in_specs = (P(), batch, batch, P(), P(), P()) + ((batch,) if spec.img2img else ()) + (
      (batch, P(), P()) if spec.control else ()) + (
      (batch, P()) if spec.control and hires is not None else ())
  fn = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=batch,
                     check_vma=False)
  return jax.jit(fn)


def shard_tree(mesh: Mesh, tree, global_batch: int):
  """`shard_batch` on every leaf of a pytree of this process's rows (a `Conditioning`); a leaf
  may hold several rows per image (composable prompts' parts), split with their images."""
  del global_batch  # each leaf's global rows follow from its local rows
  scale = data_size(mesh), local_data_size(mesh)
  return jax.tree.map(lambda x: shard_batch(mesh, np.asarray(x), len(x) * scale[0] // scale[1]),
                      tree)


def local_rows(array) -> list[tuple[int, np.ndarray]]:
  """(global row, value) for every row of a data-sharded array held by this process."""
  rows = []
  for shard in _one_replica(array):
    start = shard.index[0].start or 0
    data = np.asarray(shard.data)
    rows.extend((start + i, data[i]) for i in range(data.shape[0]))
  return sorted(rows, key=lambda r: r[0])


def local_rows_numpy(array) -> np.ndarray:
  """This process's rows of a data-sharded array, in order, on the host."""
  shards = sorted(_one_replica(array), key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _one_replica(array):
  """This process's shards of `array`, one per block of rows (a cfg pair holds two copies)."""
  seen, shards = set(), []
  for shard in array.addressable_shards:
    start = shard.index[0].start or 0
    if start not in seen:
      seen.add(start)
      shards.append(shard)
  return shards


def max_over_processes(value: int) -> int:
  """The largest `value` any process has (every process must call this)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


