"""What the trainer needs from a model registry and a data module, as typed interfaces.

`spp_jax.models` and `spp_jax.data` satisfy them; tests pass small fakes (tests/fakes.py) with
the same methods. Nothing probes signatures: a stand-in implements the whole interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, Protocol

import numpy as np


class ModelSpec(Protocol):
  """Size facts of a configured network, known without parameters."""
  min_input_size: int
  base_size: int


class ModelRegistry(Protocol):
  def names(self) -> tuple[str, ...]: ...

  def spec(self, name: str, **options) -> ModelSpec: ...

  def create(self, name: str, *, num_classes: int, rngs: Any, **options) -> Any:
    """An nnx.Module in train mode: model(images (N, H, W, 3), image_sizes (N, 2) | None)
    -> logits (N, classes)."""


class BatchIterator(Iterator[dict[str, np.ndarray]], Protocol):
  """One pass of host-local batches, resumable inside it."""

  def get_state(self) -> Any: ...

  def set_state(self, state: Any) -> None: ...


class EvalIterator(Iterator[dict[str, np.ndarray]], Sized, Protocol):
  """len(): batches every process runs (the same on every process)."""


class DataSource(Protocol):
  """Batches: image (B, H, W, 3), label (B,), image_size (B, 2), mask (B,); eval batches hold
  V views per example: image (B, V, H, W, 3), image_size (B, V, 2)."""

  def num_classes(self, data_cfg) -> int: ...

  def num_examples(self, data_cfg, split: str) -> int: ...

  def steps_per_epoch(self, data_cfg, batch_size: int, *, mode: str) -> int: ...

  def train_iterator(self, data_cfg, *, batch_size: int, image_size: int, epoch: int, seed: int,
                     process_index: int, process_count: int, mode: str) -> BatchIterator: ...

  def eval_iterator(self, data_cfg, view, *, batch_size: int, process_index: int,
                    process_count: int) -> EvalIterator: ...

  def multiscale_view_shapes(self, data_cfg, view,
                             padded_shape: tuple[int, int]) -> list[tuple[int, int]]:
    """The padded (h, w) of each view of a multiscale batch padded to `padded_shape`."""
