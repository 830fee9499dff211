"""The path layer on gs:// against fake-gcs-server: files, appends, exclusive creation, the
workdir lock, checkpoints, metrics, the compilation cache, config files and data sets.

Runs inside a network namespace with only loopback (tests/test_gcs_sandbox.py starts it):
a client that tried to reach Google would fail here instead of leaving the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import gcs_server

gcs_server.skip_outside_sandbox()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from etils import epath  # noqa: E402

from gcs_server import gcs_bucket  # noqa: E402,F401  (the fixture)
from spp_jax import paths  # noqa: E402
from spp_jax.errors import WorkdirLockedError  # noqa: E402
from spp_jax.train import metrics  # noqa: E402
from spp_jax.train.checkpoint import Checkpointer, to_nested  # noqa: E402
from spp_jax.train.lock import LOCK_NAME, WorkdirLock, this_process  # noqa: E402


@pytest.fixture
def root(gcs_bucket, request):
  """A fresh prefix of the bucket for one test."""
  return f"{gcs_bucket}/{request.node.name.replace('[', '_').replace(']', '')}"


def test_gs_paths_stay_as_written_and_read_back(root):
  p = paths.path(f"{root}/a/b.json/")
  assert os.fspath(p) == f"{root}/a/b.json"  # not ./gs:/... as os.path.abspath made it
  paths.write_atomic(p, '{"x": 1}')
  assert json.loads(p.read_text()) == {"x": 1}
  paths.write_atomic(p, '{"x": 2}')  # overwrites
  assert json.loads(p.read_text()) == {"x": 2}
  assert paths.is_file(p) and not paths.is_file(f"{root}/a")


def test_appender_uploads_when_forced_or_due_and_reopens_at_the_end(root, monkeypatch):
  p = epath.Path(f"{root}/m.jsonl")
  a = paths.Appender(p)
  a.write("1\n")
  a.flush()  # the first flush uploads: nothing was uploaded yet
  assert p.read_text() == "1\n"
  a.write("2\n")
  a.flush()  # within REMOTE_FLUSH_S of the last upload: kept in memory
  assert p.read_text() == "1\n"
  a.flush(force=True)
  assert p.read_text() == "1\n2\n"
  a.write("3\n")
  monkeypatch.setattr(paths, "REMOTE_FLUSH_S", 0.0)
  a.flush()  # due
  assert p.read_text() == "1\n2\n3\n"
  a.write("4\n")
  a.close()
  b = paths.Appender(p)  # a resumed run appends after what is there
  b.write("5\n")
  b.close()
  assert p.read_text() == "1\n2\n3\n4\n5\n"


def test_create_exclusive_lets_exactly_one_of_many_writers_win(root):
  p = f"{root}/lock"
  wins = []

  def race(i):
    if paths.create_exclusive(p, f"writer {i}"):
      wins.append(i)

  threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(wins) == 1
  assert epath.Path(p).read_text() == f"writer {wins[0]}"
  assert not paths.create_exclusive(p, "late")
  assert abs(paths.mtime(p) - time.time()) < 120


def test_workdir_lock_on_gcs_names_its_holder_refuses_a_second_and_is_released(root):
  with WorkdirLock(root) as lock:
    assert os.fspath(lock.path) == f"{root}/{LOCK_NAME}"
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"is in use by pid {os.getpid()} on "):
      with WorkdirLock(root):
        pass
  assert not epath.Path(f"{root}/{LOCK_NAME}").exists()


def test_stale_lock_on_gcs_is_broken_and_another_hosts_is_refused(root, caplog):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  lock = epath.Path(f"{root}/{LOCK_NAME}")
  lock.write_text(json.dumps(dict(this_process(), pid=gone.pid)))
  with WorkdirLock(root):
    pass
  assert "removed the stale lock" in caplog.text
  lock.write_text(json.dumps(dict(this_process(), host="elsewhere")))
  with pytest.raises(WorkdirLockedError, match="on elsewhere") as e:
    with WorkdirLock(root):
      pass
  assert e.value.hint.endswith(f"delete {lock}")


def _state(seed: int):
  rng = np.random.default_rng(seed)
  return {"params": {"w": jax.numpy.asarray(rng.normal(size=(64, 32)).astype(np.float32)),
                     "b": jax.numpy.asarray(rng.normal(size=(32,)).astype(np.float32))},
          "step": jax.numpy.asarray(seed)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_async_checkpoint_on_gcs_counts_when_finished_and_verifies(root):
  checkpointer = Checkpointer(f"{root}/checkpoints", keep=2)
  try:
    for step in (1, 2, 3):
      checkpointer.save(_state(step), dict(step=step, epoch=0, size=None), {"it": step})
    checkpointer.wait()
    assert checkpointer.steps() == [2, 3]  # keep=2
    got = checkpointer.restore_latest(_abstract(_state(0)))
    assert got.step == 3 and got.data == {"it": 3}
    jax.tree.map(np.testing.assert_array_equal, to_nested(got.state), to_nested(_state(3)))
  finally:
    checkpointer.close()


def test_damaged_checkpoint_on_gcs_is_moved_aside_and_the_older_one_used(root):
  checkpointer = Checkpointer(f"{root}/checkpoints", keep=3)
  for step in (1, 2):
    checkpointer.save(_state(step), dict(step=step, epoch=0, size=None), None)
  checkpointer.close()
  manifest = epath.Path(f"{root}/checkpoints/2/manifest/metadata")
  data = json.loads(manifest.read_text())
  data["arrays"]["params/w"]["crc32"] ^= 1  # the checksum no longer matches the array
  manifest.write_text(json.dumps(data))
  checkpointer = Checkpointer(f"{root}/checkpoints", keep=3)
  try:
    got = checkpointer.restore_latest(_abstract(_state(0)))
    assert got.step == 1
    assert [n.split("-")[0] for n in checkpointer.moved_aside()] == ["2"]
    assert checkpointer.steps() == [1]
  finally:
    checkpointer.close()


def test_metric_writer_on_gcs_records_each_step_once_after_a_resume(root):
  jsonl, logdir = f"{root}/metrics.jsonl", f"{root}/tensorboard"
  writer = metrics.MetricWriter(jsonl, logdir)
  writer.start(0)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": float(step)})
  writer.close()
  writer = metrics.MetricWriter(jsonl, logdir)  # resumed from the checkpoint at step 2
  writer.start(2)
  for step in (3, 4):
    writer.write(step, {"loss": 10.0 * step})
  writer.close()
  lines = [json.loads(line) for line in epath.Path(jsonl).read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
  from tensorboardX.proto import event_pb2

  points = []
  for f in sorted(epath.Path(logdir).iterdir()):
    for _, payload in metrics._tfrecords(f):
      event = event_pb2.Event.FromString(payload)
      points += [(event.step, v.simple_value) for v in event.summary.value]
  assert sorted(points) == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_compilation_cache_on_gcs_is_written(root):
  code = ("import jax, jax.numpy as jnp\n"
          "from spp_jax import runtime\n"
          f"runtime.enable_compilation_cache({root + '/cache'!r})\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          "print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(5.0)).sum())\n")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert [p for p in epath.Path(f"{root}/cache").iterdir() if not p.name.startswith(".")]


def test_config_file_on_gcs_is_loaded(root):
  from spp_jax import configs

  source = epath.Path(configs.find("demo.py")).read_text()
  epath.Path(f"{root}/my_demo.py").write_text(source)
  resolved = configs.resolve_argv(["main", f"--config={root}/my_demo.py:tiny"])
  local, _, arg = resolved[1][len("--config="):].partition(":")
  assert os.path.isfile(local) and arg == "tiny"
  assert configs.load(f"{local}:tiny").data.name == "multiscale_fashion_mnist/tiny"


def test_data_set_on_gcs_is_prepared_locally_copied_up_and_read(root, caplog):
  import logging

  from spp_jax.data import sources
  from spp_jax.train import default_config

  caplog.set_level(logging.INFO, logger="spp_jax")
  cfg = default_config().data
  cfg.name = "multiscale_fashion_mnist/tiny"
  cfg.data_dir = f"{root}/tfds"
  assert sources.num_examples(cfg, "test") == 256
  assert "then copying it to gs://" in caplog.text
  assert epath.Path(f"{root}/tfds/multiscale_fashion_mnist/tiny/1.0.0/dataset_info.json").exists()
  local = default_config().data
  local.name = "multiscale_fashion_mnist/tiny"
  remote_source, local_source = sources.open_source(cfg, "test"), sources.open_source(local, "test")
  for got, want in zip(remote_source.read([0, 255]), local_source.read([0, 255])):
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_sweep_on_gcs_finds_finished_variants_and_writes_its_reports(root):
  from spp_jax import sweep

  s = sweep.define("configs/demo.py", {"levels": {"a": {}, "b": {}},
                                       "seed": {"0": {}, "1": {}}}, x="levels", average_over="seed")
  for i, variant in enumerate(s.variants[:3]):  # the fourth has not finished
    run = epath.Path(f"{root}/sweep/{variant['name']}")
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps({"center/top1": 0.5 + i / 10}))
    (run / "config.json").write_text(json.dumps({"data": {"name": "d"},
                                                 "model": {"name": "m"}}))
  assert [sweep.is_finished(f"{root}/sweep", v) for v in s.variants] == [True] * 3 + [False]
  reports = sweep.write_reports(s, f"{root}/sweep")
  assert reports["csv"] == f"{root}/sweep/results.csv"
  assert len(epath.Path(reports["csv"]).read_text().splitlines()) == 4  # header + 3 rows
  assert "| a | 2 | 55.00 ± 7.07 |" in epath.Path(reports["markdown"]).read_text()
  assert epath.Path(reports["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
