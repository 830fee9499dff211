"""One path type for every file the project reads or writes: etils.epath, so gs:// works.

  path(p, what)            str | os.PathLike -> epath.Path: a local path made absolute (~
                           expanded), gs://bucket/... as written; another scheme is refused
  check(p, what)           the same refusal, at start, before anything is read or written
  is_remote(p)             on an object store: no rename, no append, no O_EXCL, no empty
                           directories
  is_file(p)               a regular file (not a device)
  write_atomic(p, data)    a whole file, never seen half written
  create_exclusive(p, data) -> bool   created only where absent (O_EXCL locally; on GCS an
                           upload with the precondition ifGenerationMatch=0)
  move(source, target)     a file or a directory tree, to a target whose parent may not exist
  Appender(p)              an append-only file (metrics.jsonl, TensorBoard events)
  local_copy(p)            a local file with p's content (a config file on gs://)

gs:// goes through gcsfs behind epath (the `gcs` extra: pip install 'spp_jax[gcs]'), and
orbax and TensorStore take the same strings. Only local paths and gs:// are tested; any other
scheme (s3://, hdfs://, ...) is an UnsupportedPathError naming the flag or key, in one line.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
from typing import Union

from etils import epath

from spp_jax.errors import ExpectedError

PathLike = Union[str, os.PathLike]
SCHEMES = ("gs",)
# Objects cannot be appended to: an Appender on GCS rewrites its object, at most this often
# unless flushed with force (a checkpoint, the end of the run).
REMOTE_FLUSH_S = 30.0
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class UnsupportedPathError(ExpectedError):
  """A path whose scheme this project cannot read or write (or whose client is missing)."""


def scheme(p: PathLike) -> str | None:
  """"gs" for gs://bucket/x, None for a local path."""
  match = _SCHEME.match(os.fspath(p))
  return match.group(1).lower() if match else None


def is_remote(p: PathLike) -> bool:
  return scheme(p) is not None


def check(p: PathLike, what: str = "path") -> None:
  """Raises UnsupportedPathError (one line) for a scheme other than gs://, or for gs://
  without gcsfs installed."""
  s = scheme(p)
  if s is None:
    return
  if s not in SCHEMES:
    raise UnsupportedPathError(
        f"{what} {os.fspath(p)!r}: the scheme {s}:// is not supported (local paths and gs:// "
        f"are)", hint="use a local path, a mounted file system, or gs://bucket/...")
  if importlib.util.find_spec("gcsfs") is None:
    raise UnsupportedPathError(f"{what} {os.fspath(p)!r}: gs:// needs gcsfs, which is not "
                               f"installed", hint="pip install 'spp_jax[gcs]'")


def path(p: PathLike, what: str = "path") -> epath.Path:
  """p as an epath.Path: local paths absolute, gs:// as written. Raises UnsupportedPathError."""
  check(p, what)
  if is_remote(p):
    return epath.Path(os.fspath(p).rstrip("/"))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def is_file(p: PathLike) -> bool:
  """Whether p is a regular file (epath's is_file also says so of /dev/full, a device)."""
  return path(p).is_file() if is_remote(p) else os.path.isfile(p)


def _fs_and_key(p: PathLike):
  import fsspec

  return fsspec.core.url_to_fs(os.fspath(p))


def write_atomic(p: PathLike, data: bytes | str) -> None:
  """Writes a whole file: locally a temporary file renamed over p (per process, so two
  writers never share one); on GCS one upload, which readers see whole or not at all."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  target = path(p)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = f"{target}.tmp.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, target)
  except OSError:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def create_exclusive(p: PathLike, data: bytes | str) -> bool:
  """Creates p holding data if p does not exist, atomically; False when it exists.

  Locally O_CREAT | O_EXCL (atomic on local file systems and NFS v3+); on GCS an upload with
  ifGenerationMatch=0, which the service refuses once any writer has created the object.
  """
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(p):
    fs, key = _fs_and_key(p)
    try:
      fs.pipe_file(key, data, mode="create")
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(os.fspath(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    os.write(fd, data)
    os.fsync(fd)
  except OSError:
    os.close(fd)
    os.unlink(p)
    raise
  os.close(fd)
  return True


def move(source: PathLike, target: PathLike) -> None:
  """Moves a file or directory tree; target's parent is created (on GCS a copy of every
  object, then a delete: no folder has to exist there)."""
  if is_remote(source) or is_remote(target):
    fs, key = _fs_and_key(source)
    fs.mv(key, _fs_and_key(target)[1], recursive=True)
    return
  os.makedirs(os.path.dirname(os.fspath(target)), exist_ok=True)
  shutil.move(os.fspath(source), os.fspath(target))


def mtime(p: PathLike) -> float:
  """Seconds since the epoch of p's last change; FileNotFoundError if it is absent."""
  if not is_remote(p):
    return os.path.getmtime(p)
  fs, key = _fs_and_key(p)
  info = fs.info(key)
  value = info.get("mtime") or info.get("updated")
  return value.timestamp() if hasattr(value, "timestamp") else float(value or 0)


class Appender:
  """An append-only file, opened at its end.

  Locally a file opened for appending, flushed to the OS on every flush(). On GCS (objects
  cannot grow) the whole content is kept in memory and uploaded again by flush(), at most
  every REMOTE_FLUSH_S unless force=True; close() uploads what is left. A kill loses at most
  the records written since the last upload.
  """

  def __init__(self, p: PathLike, *, binary: bool = False):
    self.path = path(p)
    self._binary = binary
    self.remote = is_remote(self.path)
    self._file = None
    self._buffer = bytearray()
    self._dirty = False
    self._uploaded = 0.0
    if self.remote:
      if self.path.exists():
        self._buffer += self.path.read_bytes()
    else:
      self._file = open(self.path, "ab" if binary else "a", encoding=None if binary else "utf-8")

  def write(self, data: bytes | str) -> None:
    if self._file is not None:
      self._file.write(data)
      return
    self._buffer += data.encode("utf-8") if isinstance(data, str) else data
    self._dirty = True

  def flush(self, *, force: bool = False) -> None:
    if self._file is not None:
      self._file.flush()
      return
    if self._dirty and (force or time.monotonic() - self._uploaded >= REMOTE_FLUSH_S):
      self.path.write_bytes(bytes(self._buffer))
      self._dirty, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    else:
      self.flush(force=True)


def local_copy(p: PathLike, what: str = "path", cache_dir: str | None = None) -> str:
  """A local file with p's content: p itself when local, else a copy under cache_dir
  (default: a temporary directory), keeping p's file name."""
  source = path(p, what)
  if not is_remote(source):
    return os.fspath(source)
  directory = cache_dir or tempfile.mkdtemp(prefix="spp_jax_")
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, source.name)
  with open(target, "wb") as f:
    f.write(source.read_bytes())
  return target
