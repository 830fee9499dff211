"""Evaluation over the config's views: masked counts summed over every device and process.

Each view (centre crop, full image, 10-view, multi-scale) comes from the data module as
batches of V views per example; the step averages the softmax over the views and returns
masked sums, so padding examples that complete the last batch never count and every example of
the split counts once. The sums come out of the jitted step as global scalars, identical on
every process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import jax
import numpy as np

from spp_jax.train import parallel
from spp_jax.train.compiled import CompiledCache, CompileRecord
from spp_jax.train.program_cache import ProgramCache
from spp_jax.train.steps import make_eval_step

log = logging.getLogger(__name__)

# Views whose batches hold images of different true sizes padded to one shape.
_SIZED_KINDS = ("full", "multiscale")


class Evaluator:
  """Runs every view of config.eval on a TrainState; one compilation per batch shape."""

  def __init__(self, eval_graphdef, mesh, data_lib, data_cfg, eval_cfg,
               on_compile: Callable[[CompileRecord], None] | None = None,
               programs: ProgramCache | None = None):
    """eval_graphdef: the eval-mode graph definition, or a function returning it (called only
    when a step must be traced). programs: optional on-disk cache of executables."""
    self._mesh = mesh
    self._data = data_lib
    self._data_cfg = data_cfg
    self._cfg = eval_cfg
    self._sharding = parallel.batch_sharded(mesh)
    self._graphdef = eval_graphdef
    self._on_compile = on_compile
    self._programs = programs
    self._rep = parallel.replicated(mesh)
    # One compiled-step cache per variant: (uses image sizes, per-view shapes or None).
    self.steps: dict[tuple, CompiledCache] = {}
    # Slice multi-scale views to their own padded shapes when the data module says them.
    self.slice_multiscale = hasattr(data_lib, "multiscale_view_shapes")

  def _step(self, sized: bool, view_shapes: tuple | None) -> CompiledCache:
    key = (sized, view_shapes)
    if key not in self.steps:
      name = "eval_step" + ("[image_size]" if sized else "") + (
          f"[views {view_shapes}]" if view_shapes else "")

      def make_jitted():
        graphdef = self._graphdef() if callable(self._graphdef) else self._graphdef
        fn = make_eval_step(graphdef, use_image_sizes=sized, view_shapes=view_shapes)
        return jax.jit(fn, out_shardings=self._rep)
      self.steps[key] = CompiledCache(name, make_jitted, self._on_compile, self._programs)
    return self.steps[key]

  def _step_for(self, view, batch) -> CompiledCache:
    sized = view.kind in _SIZED_KINDS
    shapes = None
    if view.kind == "multiscale" and self.slice_multiscale:
      shapes = tuple(tuple(int(v) for v in hw) for hw in self._data.multiscale_view_shapes(
          self._data_cfg, view, tuple(batch["image"].shape[2:4])))
    return self._step(sized, shapes)

  def _expected_batches(self, it, local_batch: int) -> int:
    """Batches every process must run: len(it) when the data module guarantees it is the same
    on every process; else enough for the largest share of an evenly split data set."""
    if hasattr(it, "__len__"):
      return len(it)
    n = self._data.num_examples(self._data_cfg, self._data_cfg.eval_split)
    return math.ceil(math.ceil(n / jax.process_count()) / local_batch)

  def evaluate_view(self, state, view, should_stop: Callable[[], bool] | None = None):
    """Returns {"top1", "top5", "loss"} (fractions, mean NLL) and "count", or None if stopped."""
    local_batch = parallel.local_batch_size(self._cfg.batch_size)
    it = self._data.eval_iterator(self._data_cfg, view, batch_size=local_batch,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    # With several processes every one must run the same number of steps: pad with empty
    # (all-masked) batches if this process's share ran out first.
    limit = self._expected_batches(it, local_batch) if jax.process_count() > 1 else None
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
      step = self._step_for(view, batch)
      out = step(state, parallel.to_global(batch, self._sharding, expected_local=local_batch))
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
