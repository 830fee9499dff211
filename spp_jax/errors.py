"""Expected failures: each is one `error: ...` line and at most one `hint: ...` line.

An expected failure is something the user can fix (a config, a prepared data set, disk space,
a second run in the same workdir, a damaged checkpoint); it is reported without a traceback.
Anything else is a bug and keeps its traceback. `report` prints either; `main.py --verbose`
adds the traceback to expected failures too.

`ConfigError` (train/config_schema.py) is expected as well; an exception may carry a `hint`
attribute, which `report` prints as the hint line.
"""

from __future__ import annotations

import errno
import logging
import sys
import traceback


class ExpectedError(Exception):
  """A failure with a one-line message and an optional one-line hint."""

  def __init__(self, message: str, hint: str | None = None):
    super().__init__(message)
    self.hint = hint


class WorkdirLockedError(ExpectedError):
  """Another run holds the workdir's lock."""


class DamagedCheckpointError(ExpectedError):
  """No checkpoint of the workdir passed verification (the damaged ones were moved aside)."""


class DiskFullError(ExpectedError, OSError):
  """ENOSPC (or a quota) while writing `path`."""

  def __init__(self, path: str, what: str, hint: str | None = None):
    super().__init__(f"no space left on the device of {path} ({what})", hint)
    self.path = path


class DataError(ExpectedError):
  """The data set cannot be read as configured (not prepared, wrong name or split)."""


class NonFiniteLossError(ExpectedError, FloatingPointError):
  """The loss, the gradients or the train state became NaN/inf; the last good checkpoint is
  kept."""


class InterruptedRun(KeyboardInterrupt):
  """SIGINT (Ctrl-C): a checkpoint was saved and the run stopped; running again resumes.

  A KeyboardInterrupt, so that code calling train_and_evaluate stops as it does on Ctrl-C.
  """


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def is_disk_full(exc: BaseException | None) -> bool:
  """Whether exc, or an exception it was raised from or during, is ENOSPC or EDQUOT.

  orbax and TensorStore re-raise I/O errors from worker threads as other types, with the
  errno only in the text, so the message counts too.
  """
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
      return True
    if any(t in str(exc) for t in _DISK_FULL_TEXT):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def one_line(text: str) -> str:
  """Joins a message's lines (a list of differences, say) into one."""
  parts = [p.strip() for p in str(text).splitlines() if p.strip()]
  return " ".join(parts)


def expected(exc: BaseException) -> bool:
  from spp_jax.train.config_schema import ConfigError
  return isinstance(exc, (ExpectedError, ConfigError))


def report(exc: BaseException, *, verbose: bool = False, file=None) -> None:
  """Prints `error: ...` and its hint (and, with verbose, the traceback first) to stderr."""
  file = sys.stderr if file is None else file
  if verbose:
    traceback.print_exception(exc, file=file)
  print(f"error: {one_line(str(exc))}", file=file)
  hint = getattr(exc, "hint", None)
  if hint:
    print(f"hint: {one_line(hint)}", file=file)
  file.flush()


class _DropOrbaxErrors(logging.Filter):
  """orbax logs each failure of its worker threads with a traceback, then raises it in the
  caller, and asyncio logs the tasks orbax left unfinished ("Task exception was never
  retrieved"): the one error line reported by the caller is enough."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    tb = record.exc_info[2] if record.exc_info else None
    files = [f.filename for f in traceback.extract_tb(tb)] if tb else []
    return not ("/orbax/" in record.pathname or any("/orbax/" in f for f in files)
                or "/orbax/" in record.getMessage())


def _library_noise(unraisable) -> bool:
  """An exception Python could not raise anywhere, left by orbax's or TensorStore's threads
  after a failed save or restore (e.g. "Event loop is closed" from a late callback)."""
  files = [f.filename for f in traceback.extract_tb(unraisable.exc_traceback)]
  return (any(part in f for f in files for part in ("/orbax/", "/asyncio/", "tensorstore"))
          or "orbax" in repr(unraisable.object))


def quiet_library_errors() -> None:
  """Drops orbax's own error logs and the unraisable exceptions its threads leave after a
  failure (main.py, unless --verbose): the failure itself is reported once, in one line."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
      logger.addFilter(_DropOrbaxErrors())
  previous = sys.unraisablehook
  if getattr(previous, "_spp_quiet", False):
    return

  def hook(unraisable):
    if not _library_noise(unraisable):
      previous(unraisable)

  hook._spp_quiet = True
  sys.unraisablehook = hook
