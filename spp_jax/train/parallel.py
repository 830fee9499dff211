"""Data parallelism: multi-host start-up, the device mesh, and host batches made global.

Parameters are replicated on every device (NamedSharding P()); each batch is split along its
first axis over the mesh axis "data". Every process feeds its own slice of the global batch
(`batch_size // process_count` examples) and `jax.make_array_from_process_local_data` stitches
the slices into one global array, so the same jitted step runs on 1 CPU or a pod.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"

# Environment variables that mean a multi-process launch, besides jax's own cluster detection.
_LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS",)


def _cluster_detected() -> bool:
  """True when one of jax's cluster environments (SLURM, Open MPI, TPU pods, k8s) is present."""
  try:
    from jax._src import clusters
    return any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types)  # noqa: SLF001
  except Exception:  # pylint: disable=broad-except  # Private API: never fail a launch on it.
    return False


def initialize_distributed(dist_cfg, *, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when this is a multi-process run; returns whether it did.

  dist_cfg.initialize: "auto" (when a coordinator address is given or jax detects a cluster),
  True (always; jax detects the rest) or False. Explicit arguments win over dist_cfg fields.
  Must run before anything touches a device.
  """
  addr = coordinator_address or dist_cfg.get("coordinator_address")
  nproc = num_processes if num_processes is not None else dist_cfg.get("num_processes")
  pid = process_id if process_id is not None else dist_cfg.get("process_id")
  mode = dist_cfg.get("initialize", "auto")
  if mode not in ("auto", True, False):
    raise ValueError(f"config.distributed.initialize must be 'auto', True or False, got {mode!r}")
  if mode is False:
    return False
  if mode == "auto" and not (addr or any(k in os.environ for k in _LAUNCH_ENV)
                             or _cluster_detected()):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {k: v for k, v in dict(coordinator_address=addr, num_processes=nproc,
                                  process_id=pid).items() if v is not None}
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device (global order: process 0's devices first)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Split along axis 0 over "data"; the other axes stay whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch: int) -> int:
  """This process's share of a global batch (validated to divide beforehand)."""
  return global_batch // jax.process_count()


# The batch entries the steps read; others (ids, boxes, file names) stay on the host.
BATCH_KEYS = ("image", "label", "image_size", "mask")


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding,
              expected_local: int | None = None) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded on their first axis.

  batch: arrays with leading dimension B_local (this process's slice of the global batch);
  only BATCH_KEYS are kept. Returns arrays with leading dimension B_local * process_count.
  """
  out: dict[str, Any] = {}
  for key, value in batch.items():
    if key not in BATCH_KEYS:
      continue
    value = np.asarray(value)
    if expected_local is not None and value.shape[:1] != (expected_local,):
      raise ValueError(
          f"batch[{key!r}] has shape {value.shape}, expected a leading dimension of "
          f"{expected_local} (the per-process batch = global batch / {jax.process_count()})")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
