"""Device mesh, shardings and multi-host set-up (jit + NamedSharding; no pmap).

The mesh has a 'data' axis and an 'fsdp' axis.  Batches are split over both axes (every
device sees a different part of the batch); parameters and optimizer state are replicated
over 'data' and, when fsdp > 1, each large array is split over 'fsdp' along one dimension.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays smaller than this stay replicated under FSDP (biases, norms, scalars).
FSDP_MIN_SIZE = 2 ** 14


def configure_fake_cpu_devices(n: int):
  """Ask XLA:CPU for n fake devices; call before jax initialises its backends.

  Also sets NPROC (XLA:CPU's thread-pool size) to at least 2n: with fewer threads than fake
  devices, a collective's participants can wait for threads that never come and the
  rendezvous aborts (seen on a 2-core host with 8 devices).
  """
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["NPROC"] = str(max(int(os.environ.get("NPROC", "0") or 0), 2 * n))


def maybe_initialize_distributed(cfg) -> None:
  """jax.distributed.initialize from config.distributed (no-op unless cfg.initialize)."""
  if not cfg.initialize:
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  jax.distributed.initialize(**kwargs)


def mesh_shape(mesh_cfg, num_devices: int):
  """(data, fsdp) sizes from the config; data = -1 takes the remaining devices."""
  fsdp = int(mesh_cfg.fsdp)
  data = int(mesh_cfg.data)
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f"config.mesh.fsdp must be >= 1 and divide the device count {num_devices}, got {fsdp}")
  if data == -1:
    data = num_devices // fsdp
  if data < 1 or data * fsdp != num_devices:
    raise ValueError(f"config.mesh.data * config.mesh.fsdp must equal the device count {num_devices}, "
                     f"got data={mesh_cfg.data}, fsdp={fsdp}")
  return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  data, fsdp = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def leaf_sharding(mesh: Mesh, shape) -> NamedSharding:
  """FSDP rule: split the largest dimension divisible by the fsdp size, if the array is large."""
  n = mesh.shape[FSDP_AXIS]
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return replicated(mesh)
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % n == 0:
      spec = [None] * len(shape)
      spec[d] = FSDP_AXIS
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_shardings(mesh: Mesh, abstract_tree) -> Any:
  """Shardings for a pytree of arrays or ShapeDtypeStructs under the FSDP rule."""
  return jax.tree_util.tree_map(lambda a: leaf_sharding(mesh, a.shape), abstract_tree)


def gather_for_compute(step, mesh: Mesh):
  """FSDP as designed: step(state, batch, frozen, *rest) with the networks' weights (state.params,
  state.extra: the target / discriminator, and the frozen teacher / feature nets) gathered
  whole at the step's start, so every layer runs on the device's own examples; the optimizer
  state and the EMAs stay split, and the gradient leaves as the partial sums the partitioner
  reduce-scatters onto them.  Without this, XLA's sharding propagation splits activations by
  feature where a weight is split (all-to-alls and all-reduces of activations every layer).
  Identity when the fsdp axis has size 1."""
  if mesh.shape[FSDP_AXIS] == 1:
    return step
  rep = replicated(mesh)
  whole = lambda tree: jax.tree_util.tree_map(
      lambda a: jax.lax.with_sharding_constraint(a, rep), tree)

  def gathered(state, batch, frozen, *rest):
    state = state.replace(params=whole(state.params), extra=whole(state.extra))
    return step(state, batch, whole(frozen), *rest)
  return gathered


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax.Arrays split over the mesh's batch axes."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree):
  """Fetch a (possibly multi-host, replicated or sharded) pytree to numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
