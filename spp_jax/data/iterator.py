"""The checkpointable iterator over one plan's batches: grain in threads or worker processes.

The grain source is the plan's steps from a start step; a picklable batch maker turns each into
a host-local batch (`pipeline.BatchMaker`). `to_iter_dataset` prefetches in threads; with
data.num_workers > 0, `mp_prefetch` makes batches in worker processes, whose numpy arrays reach
this process through shared memory (uint8 images are written there directly, `assemble.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grain

from spp_jax.data import assemble
from spp_jax.data import plan as plan_lib

log = logging.getLogger(__name__)

_PER_WORKER_THREADS = 1


# ----------------------------------------------------------------------------- plan steps


class _PlanSteps(Sequence):
  """The grain source: element k is (step, indices row, bucket) of the plan, from `start`."""

  def __init__(self, plan: plan_lib.Plan, start: int = 0):
    self._plan = plan
    self._start = start

  def __len__(self) -> int:
    return self._plan.num_steps - self._start

  def __getitem__(self, k: int):
    t = self._start + int(k)
    return t, self._plan.indices[t], int(self._plan.buckets[t])


# ----------------------------------------------------------------------------- iterator


class BatchIterator:
  """Iterator over the host-local batches of one plan, with a checkpointable position.

  `len(it)` is the number of batches (the same on every process); `get_state()` is a small
  JSON-able dict; `set_state()` continues from that batch. `skipped` and `rejected` count
  examples left out (undecodable / too small), each logged once with its identity.
  """

  def __init__(self, maker, local_plan: plan_lib.Plan, *, identity: dict):
    self._maker = maker
    self._plan = local_plan
    self._identity = dict(identity)
    self._step = 0
    self._it = None
    self.skipped = 0
    self.rejected = 0
    self._padding = [0, 0]  # padding pixels, batch pixels (bucketed batches)

  def __len__(self) -> int:
    return self._plan.num_steps

  def __iter__(self):
    return self

  def _build(self):
    s = self._maker.settings
    if s.num_workers > 0:
      _absl_flags_parsed()
    ds = grain.MapDataset.source(_PlanSteps(self._plan, self._step)).map(self._maker)
    if s.num_workers > 0:
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_PER_WORKER_THREADS,
                                                prefetch_buffer_size=max(1, s.prefetch)))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=s.num_workers,
                                                       per_worker_buffer_size=max(1, s.prefetch)))
    else:
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=s.prefetch,
                                                prefetch_buffer_size=s.prefetch))
    return iter(ds)

  def __next__(self) -> dict:
    if self._step >= len(self):
      if self._maker.bucketed and self._padding[1]:
        log.info("%s: padding fraction %.3f (padding pixels / batch pixels over %d batches)",
                 self._identity.get("kind"), self.padding_fraction, len(self))
      self.close()
      raise StopIteration
    if self._it is None:
      self._it = self._build()
    batch = next(self._it)
    if self._maker.bucketed:
      shapes = self._maker.view_shapes(int(self._plan.buckets[self._step]))
      pad, total = assemble.padding_counts(batch["image_size"], batch["mask"], shapes)
      self._padding[0] += pad
      self._padding[1] += total
    self._step += 1
    for key, attr, what in (("_skipped", "skipped", "skipped undecodable"),
                            ("_rejected", "rejected", "rejected small")):
      names = batch.pop(key, None)
      if names is not None:
        setattr(self, attr, getattr(self, attr) + len(names))
        for name in names:
          log.warning("%s image: %s (%d so far)", what, name, getattr(self, attr))
    return batch

  @property
  def padding_fraction(self) -> float | None:
    """Padding pixels over batch pixels of the bucketed batches read so far (None: none)."""
    return self._padding[0] / self._padding[1] if self._padding[1] else None

  def get_state(self) -> dict:
    return dict(self._identity, step=self._step, num_steps=len(self))

  def set_state(self, state: dict) -> None:
    """Continues after the batches counted in `state` (from `get_state` of the same plan)."""
    for key, value in self._identity.items():
      if key in state and state[key] != value:
        raise ValueError(f"iterator state is for {key}={state[key]!r}, this iterator has "
                         f"{key}={value!r}")
    step = state.get("step")
    if not isinstance(step, int) or not 0 <= step <= len(self):
      raise ValueError(f"iterator state step must be in 0..{len(self)}, got {step!r}")
    self.close()
    self._step = step

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


def _absl_flags_parsed():
  """grain's worker processes read absl flags; outside an absl app (pytest, notebooks, a plain
  script) nothing parsed them, so their defaults are taken as parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
