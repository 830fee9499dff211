"""Where numbers go: TensorBoard events, workdir/metrics.jsonl, a progress bar or log lines.

Only process 0 writes. metrics.jsonl holds one JSON object per line: training records
{"step", "epoch", "size", "loss", "top1", "lr", "images_per_s", "step_time_s", ...}, evaluation
records {"step", "eval/<view>/top1", "eval/<view>/top5", ...} and events
{"event": "compile" | "first_step" | ..., ...}, each with "time" (seconds since the epoch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def _import_summary_writer():
  """tensorboardX.SummaryWriter, without letting it import torch when torch is installed.

  tensorboardX only imports torch to accept torch tensors (we pass floats); that import costs
  about 5 s of start-up on a 2-core CPU. Already imported torch is left alone.
  """
  import sys

  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """TensorBoard (tensorboardX) + JSON lines; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._logdir = os.path.join(workdir, "tensorboard")
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def _tensorboard(self):
    # Made at the first scalar: its import and writer thread stay off the way to the first step.
    if self._tb is None:
      self._tb = _import_summary_writer()(logdir=self._logdir)
    return self._tb

  def write(self, step: int, scalars: dict[str, Any], extra: dict[str, Any] | None = None):
    """scalars go to TensorBoard and the JSON line; extra (strings, ints) to the line only."""
    if not self.enabled:
      return
    for key, value in scalars.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tensorboard().add_scalar(key, value, step)
    self.event(dict(step=step, **(extra or {}), **scalars))

  def event(self, record: dict[str, Any]):
    if not self.enabled:
      return
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in dict(record, time=round(time.time(), 3)).items()}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def flush(self):
    if self.enabled:
      self._tensorboard().flush()
      self._jsonl.flush()

  def close(self):
    if self.enabled:
      if self._tb is not None:
        self._tb.close()
      self._jsonl.close()
      self.enabled = False


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """A tqdm bar with ETA when stdout is a terminal, plain log lines otherwise."""

  def __init__(self, total_steps: int, initial_step: int, *, enabled: bool = True,
               bar: bool | None = None):
    self.total = total_steps
    self.enabled = enabled
    use_bar = sys.stdout.isatty() if bar is None else bar
    self._bar = None
    if enabled and use_bar:
      from tqdm import tqdm

      import shutil

      # A terminal that reports a size of 0 (some ptys) would hide the bar: assume 100 x 50.
      size = shutil.get_terminal_size((0, 0))
      known = size.columns > 0 and size.lines > 0
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", file=sys.stdout,
                       dynamic_ncols=known, ncols=None if known else 100,
                       nrows=None if known else 50)
    self._start_step = initial_step
    self._start = time.perf_counter()

  def update(self, step: int):
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def log(self, step: int, record: dict[str, Any]):
    """A logged training step: bar postfix, or one log line with the ETA."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.3f}",
                            size=record.get("size"), refresh=False)
      return
    done = step - self._start_step
    elapsed = time.perf_counter() - self._start
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    log.info("step %d/%d epoch %d size %s: loss %.4f top1 %.3f lr %.3g, %.1f img/s, "
             "%.3f s/step, ETA %s", step, self.total, record["epoch"], record.get("size"),
             record["loss"], record["top1"], record["lr"], record["images_per_s"],
             record["step_time_s"], _duration(eta) if math.isfinite(eta) else "?")

  def write(self, message: str):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      log.info("%s", message)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def results_table(results: dict[str, float]) -> str:
  """{"<view>/top1": f, "<view>/top5": f} -> a text table of accuracy (%) per view."""
  views = []
  for key in results:
    name = key.rsplit("/", 1)[0]
    if name not in views:
      views.append(name)
  width = max([len("view")] + [len(v) for v in views])
  lines = [f"{'view':<{width}}  top-1 acc  top-5 acc", f"{'-' * width}  ---------  ---------"]
  for v in views:
    t1, t5 = results.get(f"{v}/top1"), results.get(f"{v}/top5")
    cells = [f"{100 * x:8.2f}%" if x is not None else f"{'-':>9}" for x in (t1, t5)]
    lines.append(f"{v:<{width}}  {cells[0]}  {cells[1]}")
  return "\n".join(lines)
