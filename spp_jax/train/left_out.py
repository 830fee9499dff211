"""Images the data module left out: undecodable ones (skipped) and too small ones (rejected).

The data module's iterators count them (`it.skipped`, `it.rejected`; 0 when absent). Training
counts are kept per process in each checkpoint, so they add up over epochs and resumes; the
final evaluation's counts are each view's last iterator's. results.json holds the sums over
processes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from spp_jax.train.interfaces import DataSource

KINDS = ("skipped", "rejected")


def none() -> dict[str, int]:
  return {k: 0 for k in KINDS}


def of(it) -> dict[str, int]:
  """What an iterator left out so far (none for None)."""
  return {k: int(getattr(it, k, 0) or 0) for k in KINDS}


def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
  return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in KINDS}


class CountingData:
  """The data module, remembering each eval view's latest iterator."""

  def __init__(self, data: DataSource):
    self._data = data
    self.eval_iterators: dict[str, Any] = {}

  def __getattr__(self, name):
    return getattr(self._data, name)

  def eval_iterator(self, data_cfg, view, **kwargs):
    it = self._data.eval_iterator(data_cfg, view, **kwargs)
    self.eval_iterators[view.name] = it
    return it


def summary(train: dict[str, int], data: CountingData, views, data_cfg) -> dict[str, Any]:
  """{"train": {"split", "skipped", "rejected"}, "eval": {view: {...}}} over all processes."""
  names = [v.name for v in views]
  counts = [train] + [of(data.eval_iterators.get(n)) for n in names]
  table = np.array([[c[k] for k in KINDS] for c in counts], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    table = np.asarray(multihost_utils.process_allgather(table)).sum(axis=0)
  rows = [dict(zip(KINDS, map(int, row))) for row in table]
  return dict(train=dict(split=data_cfg.train_split, **rows[0]),
              eval={n: dict(split=data_cfg.eval_split, **r) for n, r in zip(names, rows[1:])})
