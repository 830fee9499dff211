"""Data parallelism: the device mesh, and host batches made global (start-up: cluster.py).

Parameters are replicated on every device (NamedSharding P()); each batch is split along its
first axis over the mesh axis "data". Every process feeds its own slice of the global batch
(`batch_size // process_count` examples) and `jax.make_array_from_process_local_data` stitches
the slices into one global array, so the same jitted step runs on 1 CPU or a pod.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"

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
BATCH_KEYS = ("image", "label", "image_size", "mask", "flip", "view_offsets", "transposed")


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
