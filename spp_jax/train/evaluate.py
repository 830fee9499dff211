"""Evaluation over the config's views: masked counts summed over every device and process.

Each view (centre crop, full image, 10-view, multi-scale) comes from the data module as
batches of V views per example; the step averages the softmax over the views and returns
masked sums, so padding examples that complete the last batch never count and every example of
the split counts once. The sums come out of the jitted step as global scalars, identical on
every process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from spp_jax.train import parallel
from spp_jax.train.compile_log import CompileLog, describe
from spp_jax.train.interfaces import DataSource
from spp_jax.train.steps import make_eval_step

log = logging.getLogger(__name__)

# Views whose batches hold images of different true sizes padded to one shape.
_SIZED_KINDS = ("full", "multiscale")


class Evaluator:
  """Runs every view of config.eval on a TrainState; `jax.jit` compiles once per batch shape."""

  def __init__(self, eval_graphdef, mesh, data: DataSource, data_cfg, eval_cfg,
               compile_log: CompileLog | None = None):
    self._data = data
    self._data_cfg = data_cfg
    self._cfg = eval_cfg
    self._sharding = parallel.batch_sharded(mesh)
    self._rep = parallel.replicated(mesh)
    self._graphdef = eval_graphdef
    self._compile_log = compile_log
    self._seen: set[tuple] = set()
    # One jitted step per (view, per-view shapes or None): the step finishes uint8 batches
    # by the view's own rule (data/on_device.py).
    self.steps: dict[tuple, Callable] = {}

  def _step(self, view, view_shapes: tuple | None) -> Callable:
    key = (view.name, view_shapes)
    if key not in self.steps:
      fn = make_eval_step(self._graphdef, use_image_sizes=view.kind in _SIZED_KINDS,
                          view=view, data=self._data_cfg, view_shapes=view_shapes)
      self.steps[key] = jax.jit(fn, out_shardings=self._rep)
    return self.steps[key]

  def _run(self, state, view, batch, local_batch: int):
    shapes = None
    if view.kind == "multiscale":
      shapes = tuple(tuple(int(v) for v in hw) for hw in self._data.multiscale_view_shapes(
          self._data_cfg, view, tuple(batch["image"].shape[2:4])))
    step = self._step(view, shapes)
    if self._compile_log is not None:
      signature = (view.name, shapes, tuple((k, v.shape) for k, v in sorted(batch.items())))
      if signature not in self._seen:
        self._seen.add(signature)
        self._compile_log.expect(describe(batch))
    return step(state, parallel.to_global(batch, self._sharding, expected_local=local_batch))

  def evaluate_view(self, state, view, should_stop: Callable[[], bool] | None = None):
    """Returns {"top1", "top5", "loss"} (fractions, mean NLL) and "count", or None if stopped."""
    local_batch = parallel.local_batch_size(self._cfg.batch_size)
    it = self._data.eval_iterator(self._data_cfg, view, batch_size=local_batch,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    # With several processes every one must run the same number of steps: pad with empty
    # (all-masked) batches if this process's share ran out first.
    limit = len(it) if jax.process_count() > 1 else None
    totals = None
    last = None
    done = 0
    while limit is None or done < limit:
      batch = next(it, None)
      if batch is None:
        if limit is None:
          break
        if last is None:
          raise ValueError(f"eval view {view.name!r}: the eval iterator yielded no batch")
        batch = dict(last, mask=np.zeros_like(last["mask"]))
      last = batch
      out = self._run(state, view, batch, local_batch)
      totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
      done += 1
      if should_stop is not None and should_stop():
        return None
    if limit is not None and next(it, None) is not None:
      raise ValueError(f"eval view {view.name!r}: the eval iterator of process "
                       f"{jax.process_index()} yields more than the {limit} batches every "
                       f"process must run")
    if totals is None:
      raise ValueError(f"eval view {view.name!r}: the eval iterator yielded no batch")
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = totals["count"]
    expected = self._data.num_examples(self._data_cfg, self._data_cfg.eval_split)
    if int(round(count)) != expected:
      log.warning("eval view %r counted %d examples, the split has %d", view.name,
                  int(round(count)), expected)
    denom = max(count, 1.0)
    return dict(top1=totals["top1"] / denom, top5=totals["top5"] / denom,
                loss=totals["loss"] / denom, count=int(round(count)))

  def evaluate(self, state, should_stop: Callable[[], bool] | None = None):
    """Every view: {"<view>/top1": f, "<view>/top5": f}, per-view details, or None if stopped."""
    results, details = {}, {}
    for view in self._cfg.views:
      start = time.perf_counter()
      got = self.evaluate_view(state, view, should_stop)
      if got is None:
        return None, None
      results[f"{view.name}/top1"] = got["top1"]
      results[f"{view.name}/top5"] = got["top5"]
      details[view.name] = dict(got, seconds=time.perf_counter() - start)
      log.info("eval %s: top-1 %.4f top-5 %.4f over %d examples (%.1f s)", view.name,
               got["top1"], got["top5"], got["count"], details[view.name]["seconds"])
    return results, details
