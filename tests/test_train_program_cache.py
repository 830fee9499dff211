"""The on-disk program cache: loads instead of tracing, misses on any key change, survives bad
entries; warm training runs (subprocesses: a fresh JAX each) equal runs without the cache."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.train import load_params
from spp_jax.train.program_cache import SUBDIR, ProgramCache

_CONTEXT = {"config": {"lr": 0.1}}


def _new_fn():
  """A new function object each call: JAX's in-memory caches cannot answer for it."""
  def f(x, y):
    return jnp.tanh(x) * 2.0 + y.sum()
  return jax.jit(f)


def _args(n=4, dtype=jnp.float32):
  return (jnp.arange(n, dtype=dtype), jnp.ones((3,), jnp.float32))


def _compile(cache, args=None, name="f", static=None, lower=None):
  """(executable, source) through the cache, for a fresh function."""
  args = _args() if args is None else args
  jitted = _new_fn()
  return cache.compile(name, args, lower or (lambda: jitted.lower(*args)), static=static)


def _files(directory, suffix):
  if not os.path.isdir(directory):
    return []
  return sorted(f for f in os.listdir(directory) if f.endswith(suffix))


class _Compilations:
  """Counts XLA compilations (or JAX persistent-cache loads) of new lowered programs."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


@pytest.fixture
def directory(tmp_path):
  return str(tmp_path / SUBDIR)


def test_second_cache_loads_without_tracing(directory):
  args = _args()
  first, source = _compile(ProgramCache(directory, _CONTEXT), args)
  assert source == "traced"
  assert len(_files(directory, ".prog")) == 1 and len(_files(directory, ".index")) == 1

  def never():
    raise AssertionError("traced although the program is on disk")
  for _ in range(2):  # Loading the same executable twice in one process works too.
    loaded, source = _compile(ProgramCache(directory, _CONTEXT), args, lower=never)
    assert source == "loaded"
    np.testing.assert_array_equal(loaded(*args), first(*args))


@contextlib.contextmanager
def _xla_flags_changed():
  old = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = (old or "") + " --xla_dump_hlo_as_text"
  try:
    yield
  finally:
    if old is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = old


@contextlib.contextmanager
def _jax_config_changed():
  old = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", "highest")
  try:
    yield
  finally:
    jax.config.update("jax_default_matmul_precision", old)


# name -> (ProgramCache context, _compile kwargs, what changes around them)
_CHANGES = {
    "context": ({"config": {"lr": 0.2}}, {}, contextlib.nullcontext),
    "name": (_CONTEXT, dict(name="g"), contextlib.nullcontext),
    "static": (_CONTEXT, dict(static={"seed": 1}), contextlib.nullcontext),
    "shape": (_CONTEXT, dict(args=_args(5)), contextlib.nullcontext),
    "dtype": (_CONTEXT, dict(args=_args(4, jnp.int32)), contextlib.nullcontext),
    "XLA_FLAGS": (_CONTEXT, {}, _xla_flags_changed),
    "jax config": (_CONTEXT, {}, _jax_config_changed),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_any_key_change_misses(change, directory):
  _compile(ProgramCache(directory, _CONTEXT))
  context, kwargs, changed = _CHANGES[change]
  with changed():
    assert _compile(ProgramCache(directory, context), **kwargs)[1] == "traced"
    assert _compile(ProgramCache(directory, context), **kwargs)[1] == "loaded"
  assert _compile(ProgramCache(directory, _CONTEXT))[1] == "loaded"  # The original still hits.


def test_sharding_is_part_of_the_key(directory):
  device = jax.devices()[0]
  mesh = jax.sharding.Mesh(np.array([device]), ("data",))
  named = jax.device_put(_args(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  _compile(ProgramCache(directory, _CONTEXT), _args())
  assert _compile(ProgramCache(directory, _CONTEXT), named)[1] == "traced"


def _stub_module(tmp_path, name, body="VALUE = 1\n"):
  path = tmp_path / f"{name}.py"
  path.write_text(body)
  sys.path.insert(0, str(tmp_path))
  try:
    return importlib.import_module(name), path
  finally:
    sys.path.remove(str(tmp_path))


def test_library_source_is_part_of_the_key(tmp_path, directory):
  lib, path = _stub_module(tmp_path, "program_cache_stub_lib")
  _compile(ProgramCache(directory, _CONTEXT, libs=[lib]))
  assert _compile(ProgramCache(directory, _CONTEXT, libs=[lib]))[1] == "loaded"
  path.write_text("VALUE = 2\n")
  assert _compile(ProgramCache(directory, _CONTEXT, libs=[lib]))[1] == "traced"


def test_source_changed_after_start_turns_the_cache_off(tmp_path, directory, caplog):
  lib, path = _stub_module(tmp_path, "program_cache_stub_edited")
  cache = ProgramCache(directory, _CONTEXT, libs=[lib], start_time=time.time())
  assert cache.enabled
  later = time.time() + 60
  os.utime(path, (later, later))  # Edited while this process runs.
  with caplog.at_level(logging.WARNING):
    assert _compile(cache)[1] == "traced"
  assert not cache.enabled and str(path) in caplog.text
  assert _files(directory, ".prog") == [] and _files(directory, ".index") == []


def test_library_without_source_is_not_cached(directory):
  lib = types.ModuleType("program_cache_no_source")
  sys.modules[lib.__name__] = lib
  try:
    assert ProgramCache.create(os.path.dirname(directory), _CONTEXT, libs=[lib]) is None
  finally:
    del sys.modules[lib.__name__]
  assert ProgramCache.create(None, _CONTEXT) is None
  assert ProgramCache.create(os.path.dirname(directory), _CONTEXT) is not None


def test_changed_context_finds_the_program_by_content_without_compiling(directory):
  _compile(ProgramCache(directory, _CONTEXT))
  other = ProgramCache(directory, {"config": {"lr": 0.1, "log_every_steps": 7}})
  with _Compilations() as compilations:
    assert _compile(other)[1] == "traced"
  assert compilations.count == 0
  assert len(_files(directory, ".prog")) == 1 and len(_files(directory, ".index")) == 2


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _flip_byte(path):
  data = bytearray(open(path, "rb").read())
  data[-100] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _other_format(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data.replace(b"SPP_JAX_PROGRAM 1\n", b"SPP_JAX_PROGRAM 9\n", 1))


def _garbage(path):
  open(path, "wb").write(b"\x00{not json")


@pytest.mark.parametrize("suffix,damage", [
    (".prog", _truncate), (".prog", _flip_byte), (".prog", _other_format),
    (".index", _garbage), (".index", _truncate)])
def test_bad_entry_warns_and_falls_back(suffix, damage, directory, caplog):
  args = _args()
  expected = _compile(ProgramCache(directory, _CONTEXT), args)[0](*args)
  path = os.path.join(directory, _files(directory, suffix)[0])
  damage(path)
  with caplog.at_level(logging.WARNING):
    compiled, source = _compile(ProgramCache(directory, _CONTEXT), args)
  assert source == "traced" and path in caplog.text
  np.testing.assert_array_equal(compiled(*args), expected)
  # The fallback rewrote the entry: the next cache loads it.
  assert _compile(ProgramCache(directory, _CONTEXT), args)[1] == "loaded"


def test_checksum_catches_a_valid_but_foreign_payload(directory, caplog):
  """Another program's payload under this file's checksum: without the check it would load."""
  args = _args()
  cache = ProgramCache(directory, _CONTEXT)
  expected = _compile(cache, args)[0](*args)
  path = os.path.join(directory, _files(directory, ".prog")[0])
  other = jax.jit(lambda x, y: x * 3.0 - y.sum())
  cache.compile("other", args, lambda: other.lower(*args))
  other_path = next(os.path.join(directory, f) for f in _files(directory, ".prog")
                    if os.path.join(directory, f) != path)
  header = len(b"SPP_JAX_PROGRAM 1\n") + 32
  mine, foreign = open(path, "rb").read(), open(other_path, "rb").read()
  open(path, "wb").write(mine[:header] + foreign[header:])
  with caplog.at_level(logging.WARNING):
    compiled, source = _compile(ProgramCache(directory, _CONTEXT), args)
  assert source == "traced" and "checksum" in caplog.text
  np.testing.assert_array_equal(compiled(*args), expected)


def test_program_from_jax_persistent_cache_is_not_stored(directory):
  args = _args()
  jitted = _new_fn()

  class FromPersistentCache:
    """A lowering whose compilation reports a persistent-cache hit, as JAX does."""

    def __init__(self):
      self._lowered = jitted.lower(*args)

    def __getattr__(self, name):
      return getattr(self._lowered, name)

    def compile(self, *a):
      jax.monitoring.record_event("/jax/compilation_cache/compile_requests_use_cache")
      jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
      return self._lowered.compile(*a)

  compiled, source = ProgramCache(directory, _CONTEXT).compile("f", args, FromPersistentCache)
  assert source == "traced"
  np.testing.assert_array_equal(compiled(*args), jitted(*args))
  assert _files(directory, ".prog") == [] and _files(directory, ".index") == []
  assert _compile(ProgramCache(directory, _CONTEXT), args)[1] == "traced"  # A fresh compile...
  assert _compile(ProgramCache(directory, _CONTEXT), args)[1] == "loaded"  # ...is stored.


def _replicated():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _initial_value():
  sharding = _replicated()
  value = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "n": jnp.arange(3, dtype=jnp.uint32),
           "key": jax.random.key(7)}
  return jax.device_put(value, sharding), "traced"


def test_argument_free_value_is_read_back_exactly(directory):
  expected, _ = _initial_value()
  value, source = ProgramCache(directory, _CONTEXT).value("init", _initial_value, _replicated())
  assert source == "traced" and len(_files(directory, ".value")) == 1

  def never():
    raise AssertionError("computed although the value is on disk")
  value, source = ProgramCache(directory, _CONTEXT).value("init", never, _replicated())
  assert source == "loaded"
  assert jax.tree.structure(value) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(value), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and repr(got.sharding) == repr(want.sharding)
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(got, want)
  # Another seed (static argument) is another value.
  assert ProgramCache(directory, _CONTEXT).value("init", _initial_value, _replicated(),
                                                 static={"seed": 1})[1] == "traced"


def test_value_over_the_size_limit_is_not_stored(directory):
  cache = ProgramCache(directory, _CONTEXT)
  assert cache.value("init", _initial_value, _replicated(), max_bytes=16)[1] == "traced"
  assert _files(directory, ".value") == []


# ----------------------------------------------------------------------------- training runs


def _train(workdir, cache, devices: int = 1) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "spp_jax.train.testing", "--workdir", str(workdir),
         "--set", f"compilation_cache_dir={json.dumps(str(cache))}"]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(*procs) -> str:
  outs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    outs.append(out)
  return "\n".join(outs)


def _compile_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r.get("event") == "compile"]


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, load_params(a), load_params(b))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_warm_run_loads_every_program_and_trains_identically(tmp_path, devices):
  cache = tmp_path / "cache"
  cold = _train(tmp_path / "cold", cache, devices)
  plain = _train(tmp_path / "plain", "", devices)  # No caches at all.
  log = _finish(cold, plain)
  log += _finish(_train(tmp_path / "warm", cache, devices))

  cold_records, warm_records = _compile_records(tmp_path / "cold"), _compile_records(
      tmp_path / "warm")
  assert {r["source"] for r in cold_records} == {"traced"}
  # (A source file edited while a run is going turns the cache off: the log says so.)
  assert {r["source"] for r in warm_records} == {"loaded"}, (warm_records, log[-3000:])
  # Still one record per program and input shape: init, 2 train shapes, 3 eval shapes.
  names = sorted((r["fn"], r["shapes"]) for r in warm_records)
  assert names == sorted((r["fn"], r["shapes"]) for r in cold_records) and len(names) == 6
  _assert_same_params(tmp_path / "warm", tmp_path / "cold")
  _assert_same_params(tmp_path / "warm", tmp_path / "plain")
  results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("warm", "plain")]
  assert results[0] == results[1]
