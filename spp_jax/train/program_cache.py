"""Compiled programs kept on disk, so a warm run neither traces, lowers nor compiles.

JAX's persistent compilation cache is keyed by the lowered program, so every run still traces
the model and lowers it (most of a warm start on a CPU) before that cache can answer. This cache
is keyed by what determines the program instead: the caller's context (the whole config and what
the trainer derives from the data), the function's name and static arguments, the shapes, dtypes
and shardings of its arguments, the source of the spp_jax package and of the model and data
modules' packages, the versions of Python, jax, jaxlib, flax, optax and numpy, XLA_FLAGS,
LIBTPU_INIT_ARGS, jax's config, the devices, the processes and the host CPU. A hit deserializes
the executable (`jax.experimental.serialize_executable`).

Files under <compilation cache dir>/spp_jax_programs/:
  <key>.index    the content address of the program this key produced;
  <digest>.prog  the serialized executable, addressed by its lowered text and the environment;
  <key>.value    the arrays of an argument-free program (the initial state, whose program calls
                 back into Python and so has no executable file), up to MAX_VALUE_BYTES.
A key that misses (e.g. a config change that leaves the program alone) traces and lowers, then
finds the program by content without compiling, and writes its own index for the next run.

Only freshly compiled executables are stored: XLA:CPU (jaxlib 0.10.2) drops code when it
re-serializes an executable that JAX's persistent cache loaded ("Function ... not found" on the
first call). So a program that JAX's cache already held before this cache saw it is traced and
taken from JAX's cache every time, until its lowered text changes or that cache is cleared.
A source file modified after the process started turns the cache off (the code running may not
be the code hashed). Entries are not evicted. Loading unpickles and runs what is in the
directory: the same trust as JAX's own cache. An unreadable entry logs a warning naming the file
and the normal path runs (and rewrites it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import platform
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

FORMAT = 1
SUBDIR = "spp_jax_programs"
_MAGIC = b"SPP_JAX_PROGRAM %d\n" % FORMAT

# jax config entries that only steer logging and caches, never a program.
_IGNORED_JAX_CONFIG = frozenset({
    "jax_compilation_cache_dir", "jax_compilation_cache_max_size",
    "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes",
    "jax_enable_compilation_cache", "jax_raise_persistent_cache_errors", "jax_log_compiles",
    "jax_explain_cache_misses", "jax_logging_level", "jax_debug_log_modules",
    "jax_pprint_use_color"})
_ENV_VARS = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy")
# Argument-free results (an initial state) up to this size are kept as values: bigger ones take
# about as long to read as to compute, and each seed would add as much to the disk.
MAX_VALUE_BYTES = 64 << 20


class UncacheableError(ValueError):
  """The program's inputs cannot all be named (e.g. a model module without a source file)."""


def _sha256(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


# ----------------------------------------------------------------------------- source


def _py_files(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
    out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  return out


def _source_files(module_name: str) -> dict[str, str]:
  """{name: path} of the .py files a module's code can come from: its whole top-level package,
  or its own file. Names are relative to the package's parent, so checkouts share entries."""
  top_name = module_name.split(".")[0]
  top = sys.modules.get(top_name)
  if top is None:
    raise UncacheableError(f"module {module_name!r} is not imported")
  paths = getattr(top, "__path__", None)
  if paths:
    return {os.path.join(top_name, os.path.relpath(f, p)): f
            for p in paths for f in _py_files(p)}
  file = getattr(top, "__file__", None)
  if not file or not file.endswith(".py") or not os.path.exists(file):
    raise UncacheableError(f"module {module_name!r} has no source file")
  return {os.path.basename(file): file}


def _lib_modules(lib) -> list[str]:
  """Modules that may hold a library object's code: a module, a class (and its bases), an
  instance's class (and its bases), or a function."""
  if isinstance(lib, types.ModuleType):
    return [lib.__name__]
  cls = lib if isinstance(lib, type) else type(lib)
  names = [c.__module__ for c in cls.__mro__ if c.__module__ != "builtins"]
  own = getattr(lib, "__module__", None)
  if isinstance(own, str):
    names.insert(0, own)
  if not names:
    raise UncacheableError(f"cannot tell which module defines {lib!r}")
  return list(dict.fromkeys(names))


def source_files(libs: Iterable[Any] = ()) -> dict[str, str]:
  """spp_jax's .py files plus those of the packages defining each library object."""
  files = _source_files("spp_jax")
  for lib in libs:
    for name in _lib_modules(lib):
      if name.split(".")[0] != "spp_jax":
        files.update(_source_files(name))
  return dict(sorted(files.items()))


def _digest_files(files: dict[str, str]) -> str:
  h = hashlib.sha256()
  for name, path in files.items():
    with open(path, "rb") as f:
      data = f.read()
    h.update(f"{len(name)}:{name}:{len(data)}:".encode() + data)
  return h.hexdigest()


def _newest(files: dict[str, str]) -> tuple[float, str]:
  """(mtime, path) of the most recently modified file."""
  newest = (0.0, "")
  for path in files.values():
    try:
      newest = max(newest, (os.stat(path).st_mtime, path))
    except FileNotFoundError:
      newest = max(newest, (float("inf"), path))  # Deleted: changed too.
  return newest


# ----------------------------------------------------------------------------- environment


@functools.lru_cache(maxsize=None)
def _cpu_fingerprint() -> str:
  """Host CPU model and features (XLA:CPU code is compiled for them)."""
  text = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("model name", "flags", "Features", "CPU part")):
          text += line
        elif not line.strip() and text:
          break  # The first processor is enough.
  except OSError:
    pass
  return hashlib.sha256((platform.machine() + platform.processor() + text).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _version(package: str) -> str | None:
  from importlib import metadata
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def environment() -> dict[str, Any]:
  """Everything outside the program's text that decides what XLA compiles."""
  devices = jax.devices()
  backend = devices[0].client
  return dict(
      format=FORMAT, python=list(sys.version_info[:2]),
      versions={p: _version(p) for p in _VERSIONED},
      env={k: os.environ.get(k) for k in _ENV_VARS},
      jax_config={k: repr(v) for k, v in sorted(jax.config.values.items())
                  if k not in _IGNORED_JAX_CONFIG},
      platform=backend.platform, platform_version=backend.platform_version,
      devices=[(d.id, d.process_index, d.device_kind) for d in devices],
      process=(jax.process_index(), jax.process_count()),
      cpu=_cpu_fingerprint())


def describe_args(args) -> dict[str, Any]:
  """Tree structure, shapes, dtypes, weak types and shardings (with their device ids)."""
  leaves, treedef = jax.tree.flatten(args)

  def leaf(x):
    sharding = getattr(x, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    ids = None if mesh is None else [int(i) for i in mesh.device_ids.flat]
    return [list(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), repr(sharding),
            ids]
  return dict(tree=str(treedef), leaves=[leaf(x) for x in leaves])


# ----------------------------------------------------------------------------- entries


def _frame(obj) -> bytes:
  """Magic line, sha256 of the payload, pickled payload."""
  payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  return _MAGIC + hashlib.sha256(payload).digest() + payload


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(x):
  return jax.random.key_data(x) if _is_key(x) else x


def _host_value(tree) -> dict[str, Any]:
  """Replicated arrays -> picklable host data (typed PRNG keys as their data and impl)."""
  leaves, treedef = jax.tree.flatten(tree)
  return dict(treedef=treedef, leaves=[
      (np.asarray(_key_data(x).addressable_data(0)), x.dtype._impl.name if _is_key(x) else None)
      for x in leaves])


def _place(entry: dict[str, Any], sharding):
  """Inverse of _host_value: every leaf placed by `sharding` (any number of processes)."""
  leaves = []
  for data, impl in entry["leaves"]:
    x = jax.make_array_from_callback(data.shape, sharding, lambda index, d=data: d[index])
    leaves.append(x if impl is None else jax.random.wrap_key_data(x, impl=impl))
  return jax.tree.unflatten(entry["treedef"], leaves)


# ----------------------------------------------------------------------------- compilation


class _CompileEvents:
  """Whether a compilation in this thread was fresh: JAX's persistent cache was asked and did not
  answer (or is off). XLA:CPU cannot re-serialize what that cache loaded."""

  def __init__(self):
    self.requests = self.hits = 0
    self._thread = threading.get_ident()

  def __call__(self, event: str, **kwargs):
    del kwargs
    if threading.get_ident() != self._thread:
      return
    if event == "/jax/compilation_cache/compile_requests_use_cache":
      self.requests += 1
    elif event == "/jax/compilation_cache/cache_hits":
      self.hits += 1

  def __enter__(self):
    jax.monitoring.register_event_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_listener(self)

  @property
  def fresh(self) -> bool:
    if self.hits:
      return False
    if self.requests:
      return True
    # No request: the persistent cache is off, or this executable was compiled before in this
    # process (from where, unknown): fresh only if the cache cannot have produced it.
    return not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


class ProgramCache:
  """Executables on disk keyed by (context, name, static arguments, argument signature).

  Args:
    directory: where entries go (created on the first write).
    context: JSON-able data that, with the sources, determines every function this cache
      compiles: whatever they close over (the config, values derived from the data).
    libs: library objects whose source the programs depend on besides spp_jax's (the model and
      data modules).
    start_time: when this process started running the sources; entries are neither read nor
      written if a source file changed after it (the code running is not the code hashed).
  """

  def __init__(self, directory: str, context: Any, libs: Iterable[Any] = (),
               start_time: float | None = None):
    self.directory = directory
    self._files = source_files(libs)
    self._start_time = start_time
    self.enabled = True
    self._check_sources()
    self._context_key = _sha256(context, _digest_files(self._files))

  @classmethod
  def create(cls, cache_dir: str | None, context: Any, libs: Iterable[Any] = (),
             start_time: float | None = None) -> ProgramCache | None:
    """A cache under cache_dir/SUBDIR, or None when cache_dir is None or a source is unknown."""
    if not cache_dir:
      return None
    try:
      return cls(os.path.join(cache_dir, SUBDIR), context, libs, start_time)
    except (UncacheableError, OSError) as e:
      log.info("program cache off: %s", e)
      return None

  def _check_sources(self) -> bool:
    """Turns the cache off for good if a source file is newer than start_time: the code this
    process runs may then differ from the code the key names."""
    if self.enabled and self._start_time is not None:
      mtime, path = _newest(self._files)
      if mtime > self._start_time:
        log.warning("program cache off: %s changed after this process started", path)
        self.enabled = False
    return self.enabled

  def key(self, name: str, args, static: Any = None) -> str:
    """The index key of `name` called on args (arrays or ShapeDtypeStructs)."""
    return _sha256(environment(), self._context_key, name, static, describe_args(args))

  def _content_key(self, lowered, compiler_options) -> str:
    return _sha256(environment(), lowered.as_text(), str(lowered.in_tree),
                   str(lowered.out_tree), compiler_options)

  def _path(self, key: str, suffix: str) -> str:
    return os.path.join(self.directory, key + suffix)

  def compile(self, name: str, args, lower: Callable[[], Any], static: Any = None,
              compiler_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The compiled `lower()` for args: (executable, "loaded" | "traced").

    "loaded": read from disk without tracing. "traced": `lower()` ran; the executable was then
    read by content, compiled, or taken from JAX's persistent cache.
    static: JSON-able arguments of the function not in args or the context.
    """
    if not self._check_sources():
      return lower().compile(compiler_options), "traced"
    key = self.key(name, args, [static, compiler_options])
    content = self._read_index(key)
    if content is not None:
      compiled = self._load(content)
      if compiled is not None:
        return compiled, "loaded"
    lowered = lower()
    content = self._content_key(lowered, compiler_options)
    compiled = self._load(content, missing_ok=True)
    if compiled is None:
      with _CompileEvents() as events:
        compiled = lowered.compile(compiler_options)
      if not events.fresh:
        log.info("program cache: not storing %s, loaded from JAX's persistent cache (XLA:CPU "
                 "cannot re-serialize it); stored once a run compiles it", name)
        return compiled, "traced"
      if not self._store(content, compiled, name):
        return compiled, "traced"
    self._write_index(key, content, name)
    return compiled, "traced"

  def value(self, name: str, compute: Callable[[], tuple[Any, str]], sharding,
            static: Any = None, max_bytes: int = MAX_VALUE_BYTES) -> tuple[Any, str]:
    """The arrays an argument-free program returns (an initial state), from disk if stored.

    Such a program's value is all there is to keep, and the only thing to keep when it calls
    back into Python (no executable file can hold a callback).
    compute: () -> (value, source), e.g. through `compile`; every leaf of value is replicated
    by `sharding`. Returns (value, "loaded" | compute's source). Values over max_bytes are not
    stored.
    """
    if not self._check_sources():
      return compute()
    path = self._path(self.key(name, (), [static, repr(sharding), "value"]), ".value")
    entry = self._read(path, missing_ok=True)
    if entry is not None:
      try:
        return _place(entry, sharding), "loaded"
      except Exception as e:  # pylint: disable=broad-except  # Any bad entry: fall back.
        log.warning("program cache: ignoring unusable %s (%s: %s)", path, type(e).__name__, e)
    value, source = compute()
    leaves = jax.tree.leaves(value)
    if all(x.is_fully_replicated for x in leaves) and sum(
        _key_data(x).nbytes for x in leaves) <= max_bytes:
      try:
        self._write(path, _frame(_host_value(value)))
      except OSError as e:
        log.warning("program cache: not storing the value of %s (%s)", name, e)
    return value, source

  # --------------------------------------------------------------------------- files

  def _read_index(self, key: str) -> str | None:
    path = self._path(key, ".index")
    try:
      with open(path, encoding="utf-8") as f:
        entry = json.load(f)
      content = entry["program"]
      if not isinstance(content, str) or len(content) != 64:
        raise ValueError(f"bad program digest {content!r}")
      return content
    except FileNotFoundError:
      return None
    except (OSError, ValueError, KeyError, TypeError) as e:
      log.warning("program cache: ignoring unreadable index %s (%s)", path, e)
      return None

  def _read(self, path: str, missing_ok: bool = False):
    """The object framed in path (checked against its checksum), or None with a warning."""
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      if not missing_ok:
        log.warning("program cache: %s is missing; tracing instead", path)
      return None
    except OSError as e:
      log.warning("program cache: cannot read %s (%s); tracing instead", path, e)
      return None
    try:
      n = len(_MAGIC)
      if data[:n] != _MAGIC:
        raise ValueError(f"not an entry of format {FORMAT}")
      digest, payload = data[n:n + 32], data[n + 32:]
      if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
      return pickle.loads(payload)
    except Exception as e:  # pylint: disable=broad-except  # Any bad entry: fall back.
      log.warning("program cache: ignoring unreadable %s (%s: %s); tracing instead", path,
                  type(e).__name__, e)
      return None

  def _load(self, content: str, missing_ok: bool = False):
    path = self._path(content, ".prog")
    entry = self._read(path, missing_ok)
    if entry is None:
      return None
    try:
      return serialize_executable.deserialize_and_load(
          entry["executable"], entry["in_tree"], entry["out_tree"])
    except Exception as e:  # pylint: disable=broad-except  # e.g. another jaxlib's bytes.
      log.warning("program cache: ignoring unloadable %s (%s: %s); tracing instead", path,
                  type(e).__name__, e)
      return None

  def _write(self, path: str, data: bytes):
    if not self._check_sources():
      raise OSError("sources changed after this process started")
    os.makedirs(self.directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, path)  # Readers see the old file or the whole new one.
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def _store(self, content: str, compiled, name: str) -> bool:
    try:
      executable, in_tree, out_tree = serialize_executable.serialize(compiled)
      data = _frame(dict(executable=executable, in_tree=in_tree, out_tree=out_tree))
    except Exception as e:  # pylint: disable=broad-except  # e.g. host callbacks: no bytes.
      log.info("program cache: %s cannot be serialized (%s: %s)", name, type(e).__name__, e)
      return False
    try:
      self._write(self._path(content, ".prog"), data)
    except OSError as e:
      log.warning("program cache: not storing %s (%s)", name, e)
      return False
    return True

  def _write_index(self, key: str, content: str, name: str):
    try:
      self._write(self._path(key, ".index"),
                  json.dumps(dict(program=content, name=name)).encode())
    except OSError as e:
      log.warning("program cache: not writing the index of %s (%s)", name, e)
