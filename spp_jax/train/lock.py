"""One writer per workdir: an exclusive lock file, workdir/.lock, naming its holder.

The file is created only where it does not exist, atomically (spp_jax/paths.py
create_exclusive): with O_CREAT | O_EXCL on local file systems and NFS (v3 and later), with
an upload under the precondition ifGenerationMatch=0 on GCS. Two hosts that share the workdir
cannot both create it. It holds the holder's host, pid, process start time, boot id and
command line as JSON. A lock whose holder is gone is stale: on the holder's own host that is
decided from the pid (and, so that a reused pid is not taken for the holder, the process start
time and boot id); from another host it cannot be decided, and the error says which file to
delete once that run is known to be gone.

Only process 0 of a multi-process run takes the lock (the others write nothing to the workdir
but their checkpoint shards); every process learns whether it got it, so all of them fail
together instead of waiting for one another.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any

from spp_jax import paths
from spp_jax.errors import DiskFullError, WorkdirLockedError, is_disk_full

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_BREAK_SUFFIX = ".break"
_BREAK_STALE_S = 30.0  # a stale-lock breaker holds its guard for milliseconds
_READ_RETRY_S = 1.0  # a lock file just created is empty until its holder writes it


def _proc_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      return f.read().strip()
  except OSError:
    return None


def this_process() -> dict[str, Any]:
  pid = os.getpid()
  return dict(host=socket.gethostname(), pid=pid, start=_proc_start(pid), boot=_boot_id(),
              since=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv),
              token=uuid.uuid4().hex)


def _alive(holder: dict[str, Any]) -> bool:
  """Whether a holder on this host still runs; True when that cannot be told."""
  if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
    return False  # the host restarted since
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process
  start = holder.get("start")
  return not (start and _proc_start(pid) and _proc_start(pid) != start)


def _read(path) -> dict[str, Any] | None:
  """The holder in a lock file; None if it is missing; {} if it stays unreadable."""
  deadline = time.monotonic() + _READ_RETRY_S
  while True:
    try:
      return json.loads(path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      if time.monotonic() > deadline:
        return {}
      time.sleep(0.05)


def describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "an unknown process (the lock file is unreadable)"
  return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
          f"({holder.get('command')})")


class WorkdirLock:
  """Context manager: holds workdir/.lock for its body (when enabled), or raises.

  Raises:
    WorkdirLockedError naming the holder, within about a second.
  On leaving, a workdir this lock created and that stayed empty is removed again, so a run
  that fails to start leaves no trace.
  """

  def __init__(self, workdir, *, enabled: bool = True):
    self.workdir = paths.path(workdir, "workdir")
    self.path = self.workdir / LOCK_NAME
    self.enabled = enabled
    self._me: dict[str, Any] | None = None
    self._created_dir = False

  def __enter__(self) -> "WorkdirLock":
    error = None
    if self.enabled:
      try:
        self._acquire()
      except (WorkdirLockedError, DiskFullError) as e:
        error = e
    _agree(error is None, self.workdir)
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc):
    self.release()
    return False

  def _acquire(self):
    # An object store has no empty directories: nothing to create there, nothing to remove.
    self._created_dir = not paths.is_remote(self.workdir) and not self.workdir.is_dir()
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      me = this_process()
      content = json.dumps(me, indent=1)
      for _ in range(20):
        if paths.create_exclusive(self.path, content):
          self._me = me
          return
        holder = _read(self.path)
        if holder is None:
          continue  # released in between
        if holder and holder.get("host") == me["host"] and not _alive(holder):
          self._break(holder)
          continue
        break
    except OSError as e:
      if is_disk_full(e):
        raise DiskFullError(self.path, "taking the workdir lock") from e
      raise
    self._remove_created_dir()
    raise WorkdirLockedError(
        f"workdir {self.workdir} is in use by {describe(holder)}",
        hint=f"wait for that run to end; if it is gone (it ran on another host), delete "
             f"{self.path}")

  def _break(self, stale: dict[str, Any]):
    """Removes a lock whose holder is gone, under a guard file so only one breaker acts."""
    guard = self.path.parent / (self.path.name + _BREAK_SUFFIX)
    try:
      if time.time() - paths.mtime(guard) > _BREAK_STALE_S:
        guard.unlink()
    except OSError:
      pass
    if not paths.create_exclusive(guard, json.dumps(this_process())):
      time.sleep(0.05)
      return
    try:
      if _read(self.path) == stale:  # not a lock taken since by someone else
        self.path.unlink()
        log.warning("removed the stale lock of %s: that process is gone", describe(stale))
    finally:
      guard.unlink()

  def release(self):
    if self._me is not None:
      if _read(self.path) == self._me:
        self.path.unlink()
      self._me = None
    self._remove_created_dir()

  def _remove_created_dir(self):
    if self._created_dir:
      try:
        os.rmdir(self.workdir)  # only if still empty (a local directory: see _acquire)
      except OSError:
        pass
      self._created_dir = False


def _agree(ok: bool, workdir):
  """Every process learns whether process 0 got the lock."""
  import jax

  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  import numpy as np

  got = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
  if not got and ok:
    raise WorkdirLockedError(f"process 0 could not lock the workdir {workdir} (its error "
                             f"names the holder)")
