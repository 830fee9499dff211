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
  caller: the one error line reported there is enough."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname)


def quiet_library_errors() -> None:
  """Drops orbax's own error logs (main.py, unless --verbose)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
    logger.addFilter(_DropOrbaxErrors())
