"""Where numbers go: TensorBoard events, workdir/metrics.jsonl, a progress bar or log lines.

Only process 0 writes. metrics.jsonl holds one JSON object per line: training records
{"step", "epoch", "size", "loss", "top1", "lr", "images_per_s", "step_time_s", ...}, evaluation
records {"step", "eval/<view>/top1", "eval/<view>/top5", ...} and events
{"event": "compile" | "first_step" | ..., ...}, each with "time" (seconds since the epoch).

Records once: a run that resumes from the checkpoint at step S first drops the records that
the steps after S wrote (they are computed again) and the evaluation at S (it runs again), in
metrics.jsonl and in the TensorBoard files, so every step is recorded once however often the
run was stopped, killed or sent back to an older checkpoint. Events (compilations, stops,
resumes) are history and stay. TensorBoard files are written synchronously, so a full disk is
an error of the step that wrote, not of a background thread.

Both files are paths.Appender: on gs:// (objects cannot be appended to) they are uploaded
again at most every paths.REMOTE_FLUSH_S, and always by `flush` (the loop's checkpoints and
evaluations) and `close`. The event files are framed here (TFRecord: length, masked CRC-32C,
payload, masked CRC-32C) rather than by tensorboardX's writers, whose GCS writer uploads once
more at interpreter exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import struct
import sys
import time
from typing import Any

from spp_jax import paths
from spp_jax.errors import DiskFullError, is_disk_full

log = logging.getLogger(__name__)


def _import_tensorboardx():
  """tensorboardX's protos and record writer, without letting it import torch when torch is
  installed (tensorboardX imports torch to accept torch tensors; we pass floats; that import
  costs about 5 s of start-up on a 2-core CPU). Already imported torch is left alone."""
  if "torch" not in sys.modules and "tensorboardX" not in sys.modules:
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
    try:
      import tensorboardX  # noqa: F401
    finally:
      del sys.modules["torch"]
  import tensorboardX.proto.event_pb2
  import tensorboardX.proto.summary_pb2
  import tensorboardX.record_writer
  return tensorboardX


def _dropped(step: int | None, keys, resume_step: int) -> bool:
  """Whether a record of `step` with these keys is redone by a run resuming at resume_step."""
  if step is None:
    return False
  return step > resume_step or (step == resume_step and any(k.startswith("eval/") for k in keys))


# ----------------------------------------------------------------------------- TensorBoard


def _tfrecords(source):
  """(raw record bytes, payload) of each whole record of a TFRecord file (its path, or its
  bytes); a torn tail ends it."""
  data = source if isinstance(source, bytes) else paths.path(source).read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    end = pos + 12 + length + 4
    if end > len(data):
      break
    yield data[pos:end], data[pos + 12:pos + 12 + length]
    pos = end


def _truncate_tensorboard(logdir, resume_step: int) -> None:
  logdir = paths.path(logdir)
  if not logdir.is_dir():
    return
  event_pb2 = _import_tensorboardx().proto.event_pb2
  for path in sorted(logdir.iterdir()):
    if ".tfevents." not in path.name or not paths.is_file(path):
      continue
    data = path.read_bytes()
    kept, changed = [], False
    for raw, payload in _tfrecords(data):
      event = event_pb2.Event.FromString(payload)
      keys = [v.tag for v in event.summary.value] if event.HasField("summary") else None
      if keys is not None and _dropped(event.step, keys, resume_step):
        changed = True
      else:
        kept.append(raw)
    if changed or sum(map(len, kept)) != len(data):
      paths.write_atomic(path, b"".join(kept))


class _EventFile:
  """One TensorBoard event file, written synchronously (on GCS: see paths.Appender)."""

  def __init__(self, logdir):
    tbx = _import_tensorboardx()
    self._event_pb2, self._summary_pb2 = tbx.proto.event_pb2, tbx.proto.summary_pb2
    self._masked_crc = tbx.record_writer.masked_crc32c
    logdir = paths.path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    stem = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path, n = logdir / stem, 0
    while self.path.exists():  # another writer of this process in the same second
      n += 1
      self.path = logdir / f"{stem}.{n}"
    self._writer = paths.Appender(self.path, binary=True)
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._writer.write(header + struct.pack("<I", self._masked_crc(header)) + data
                       + struct.pack("<I", self._masked_crc(data)))
    self._writer.flush()

  def flush(self):
    self._writer.flush(force=True)

  def scalars(self, step: int, values: dict[str, float]):
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self):
    self._writer.close()


# ----------------------------------------------------------------------------- writer


@contextlib.contextmanager
def _disk_full(path: str, what: str):
  """OSError ENOSPC -> DiskFullError(path)."""
  try:
    yield
  except OSError as e:
    if is_disk_full(e) and not isinstance(e, DiskFullError):
      raise DiskFullError(path, what) from e
    raise


def _truncate_jsonl(path, resume_step: int) -> None:
  path = paths.path(path)
  if not paths.is_file(path):
    return  # absent (or a device, as in tests: nothing to read back)
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # a line torn by a kill
    if not line.endswith("\n"):
      continue
    if "event" in record or not _dropped(record.get("step"), record, resume_step):
      kept.append(line)
  if len(kept) != len(lines):
    paths.write_atomic(path, "".join(kept))


class MetricWriter:
  """TensorBoard + JSON lines; a no-op on processes other than 0.

  Nothing is written before `start(resume_step)`, which drops what the resumed steps will
  record again (events before it wait for it). A full disk is a DiskFullError naming the
  file.
  """

  def __init__(self, metrics_path: str, tensorboard_dir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._path = metrics_path
    self._logdir = tensorboard_dir
    self._tb: _EventFile | None = None
    self._jsonl = None
    self._early: list[dict[str, Any]] = []

  def start(self, resume_step: int):
    if not self.enabled or self._jsonl is not None:
      return
    with _disk_full(self._path, "dropping the records past the resumed step"):
      _truncate_jsonl(self._path, resume_step)
      _truncate_tensorboard(self._logdir, resume_step)
      self._jsonl = paths.Appender(self._path)
    for record in self._early:
      self.event(record)
    self._early.clear()

  def write(self, step: int, scalars: dict[str, Any], extra: dict[str, Any] | None = None):
    """scalars go to TensorBoard and the JSON line; extra (strings, ints) to the line only."""
    if not self.enabled:
      return
    finite = {k: v for k, v in scalars.items()
              if isinstance(v, (int, float)) and math.isfinite(v)}
    if finite:
      with _disk_full(self._logdir, "writing TensorBoard events"):
        if self._tb is None:  # made at the first scalar: off the way to the first step
          self._tb = _EventFile(self._logdir)
        self._tb.scalars(step, finite)
    self.event(dict(step=step, **(extra or {}), **scalars))

  def event(self, record: dict[str, Any]):
    if not self.enabled:
      return
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in dict(record, time=round(time.time(), 3)).items()}
    if self._jsonl is None:
      self._early.append(record)  # e.g. a compilation before the resumed step is known
      return
    with _disk_full(self._path, "writing metrics"):
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()

  def flush(self):
    """Everything written so far reaches the file (on GCS: is uploaded now)."""
    if self.enabled and self._jsonl is not None:
      with _disk_full(self._path, "writing metrics"):
        self._jsonl.flush(force=True)
      if self._tb is not None:
        with _disk_full(self._logdir, "writing TensorBoard events"):
          self._tb.flush()

  def close(self):
    if self.enabled:
      self.enabled = False
      for f in (self._tb, self._jsonl):
        if f is not None:
          try:
            f.close()
          except OSError as e:  # a full disk was already reported by the write that hit it
            log.debug("closing %s: %s", f, e)


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
