"""Training across devices and processes, and SIGTERM, in subprocesses (tens of seconds).

Each subprocess runs `python tests/fakes.py` (tiny stand-in model and data) with its own
XLA_FLAGS, so this pytest process keeps its single CPU device.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fakes
from spp_jax.train import load_params, train_and_evaluate

pytestmark = pytest.mark.slow


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _worker(workdir, devices: int, *sets: str, extra=()) -> subprocess.Popen:
  cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "fakes.py"), "--workdir",
         str(workdir)]
  for s in sets:
    cmd += ["--set", s]
  return subprocess.Popen(cmd + list(extra), env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _result(out: str) -> dict:
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert lines, out[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _assert_params_close(a, b, atol):
  """Same parameters up to float summation order (the gradient all-reduce differs)."""
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def _in_process(workdir, **overrides):
  return train_and_evaluate(fakes.tiny_config(**overrides), str(workdir),
                            models=fakes.TinyModels(), data=fakes.SyntheticData())


def test_eight_fake_devices_match_one_device(tmp_path):
  proc = _worker(tmp_path / "eight", 8)
  bad = _worker(tmp_path / "bad", 8, "train.batch_size=12")
  rc, out = _finish(proc)
  assert rc == 0, out[-3000:]
  results = _result(out)
  ref = _in_process(tmp_path / "one")
  assert set(results) == set(ref)
  # Dropout masks do not depend on the layout: the runs differ only by float rounding.
  _assert_params_close(load_params(tmp_path / "eight"), load_params(tmp_path / "one"), 1e-5)
  rc, out = _finish(bad)
  assert rc == 1 and "error: config.train.batch_size=12" in out, out[-3000:]
  assert "8 devices" in out and "Traceback" not in out
  assert not (tmp_path / "bad").exists()


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  port = _free_port()
  procs = [_worker(tmp_path / "two", 2, extra=["--coordinator", f"localhost:{port}",
                                               "--num-processes", "2", "--process-id", str(i)])
           for i in range(2)]
  procs.append(_worker(tmp_path / "four", 4))  # at the same time: start-ups overlap
  outs = [_finish(p) for p in procs]
  for rc, out in outs:
    assert rc == 0, out[-3000:]
  assert _result(outs[0][1]) == _result(outs[1][1])  # every process has the global result
  _assert_params_close(load_params(tmp_path / "two"), load_params(tmp_path / "four"), 1e-6)
  # Both processes wrote their own data-iterator state into the checkpoint.
  step_dir = max((tmp_path / "two" / "checkpoints").iterdir(), key=lambda p: p.name)
  files = sorted(f for f in os.listdir(step_dir / "data") if f.endswith(".json"))
  assert files == ["process_0-of-2.json", "process_1-of-2.json"]


def _wait_for_event(path, event: str, timeout: float = 240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        if any(json.loads(line).get("event") == event for line in f if line.strip()):
          return
    time.sleep(0.2)
  raise TimeoutError(f"no {event!r} event in {path}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 4-epoch run in this process: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, _in_process(workdir, **{"train.num_epochs": 4})


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path, reference):
  proc = _worker(tmp_path / "term", 1, "train.num_epochs=4", extra=["--delay", "0.3"])
  _wait_for_event(tmp_path / "term" / "metrics.jsonl", "first_step")
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  rc, out = _finish(proc, timeout=120)
  assert rc == 0, out[-3000:]
  assert "RESULT {}" in out  # stopped early: no final evaluation
  with open(tmp_path / "term" / "metrics.jsonl", encoding="utf-8") as f:
    stopped = [r for r in map(json.loads, f) if r.get("event") == "stopped"]
  assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM"
  step = stopped[0]["step"]
  assert 1 <= step < 32
  assert str(step) in os.listdir(tmp_path / "term" / "checkpoints")

  resumed = _in_process(tmp_path / "term", **{"train.num_epochs": 4})
  assert resumed == reference[1]
  jax.tree.map(np.testing.assert_array_equal, load_params(tmp_path / "term"),
               load_params(reference[0]))


def test_sigkill_then_resume_from_last_checkpoint_matches_uninterrupted(tmp_path, reference):
  workdir = tmp_path / "kill"
  proc = _worker(workdir, 1, "train.num_epochs=4", "train.checkpoint_every_steps=3",
                 extra=["--delay", "0.2"])
  deadline = time.time() + 240
  while time.time() < deadline:  # until a checkpoint is committed (step 3 or later)
    ckpts = workdir / "checkpoints"
    if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.1)
  time.sleep(0.5)
  proc.kill()  # SIGKILL: no handler, possibly in the middle of a step or a save
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  resumed = _in_process(workdir, **{"train.num_epochs": 4, "train.checkpoint_every_steps": 3})
  assert resumed == reference[1]
  jax.tree.map(np.testing.assert_array_equal, load_params(workdir), load_params(reference[0]))
  events = [json.loads(line).get("event") for line in open(workdir / "metrics.jsonl")]
  assert "resume" in events


def test_sigint_saves_exits_130_and_resume_matches_uninterrupted(tmp_path, reference):
  proc = _worker(tmp_path / "int", 1, "train.num_epochs=4", extra=["--delay", "0.3"])
  _wait_for_event(tmp_path / "int" / "metrics.jsonl", "first_step")
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  rc, out = _finish(proc, timeout=120)
  assert rc == 130, out[-3000:]
  assert "Traceback" not in out
  with open(tmp_path / "int" / "metrics.jsonl", encoding="utf-8") as f:
    stopped = [r for r in map(json.loads, f) if r.get("event") == "stopped"]
  assert len(stopped) == 1 and stopped[0]["reason"] == "SIGINT"
  step = stopped[0]["step"]
  assert f"interrupted: interrupted (SIGINT) at step {step}; checkpoint saved in" in out
  assert str(step) in os.listdir(tmp_path / "int" / "checkpoints")
  assert _in_process(tmp_path / "int", **{"train.num_epochs": 4}) == reference[1]
  jax.tree.map(np.testing.assert_array_equal, load_params(tmp_path / "int"),
               load_params(reference[0]))


def test_second_sigint_aborts_at_once(tmp_path, reference):
  proc = _worker(tmp_path / "int2", 1, "train.num_epochs=4", "train.checkpoint_every_steps=3",
                 extra=["--delay", "1.0"])
  _wait_for_event(tmp_path / "int2" / "metrics.jsonl", "first_step")
  time.sleep(3.5)  # a checkpoint at step 3
  proc.send_signal(signal.SIGINT)
  time.sleep(0.1)  # the first one waits for the batch being read (1 s)
  start = time.time()
  proc.send_signal(signal.SIGINT)
  rc, out = _finish(proc, timeout=60)
  seconds = time.time() - start
  assert rc == -signal.SIGINT, out[-3000:]  # killed by the signal's default action
  assert seconds < 1.0, seconds
  assert _in_process(tmp_path / "int2", **{"train.num_epochs": 4,
                                           "train.checkpoint_every_steps": 3}) == reference[1]
  jax.tree.map(np.testing.assert_array_equal, load_params(tmp_path / "int2"),
               load_params(reference[0]))


def test_damaged_checkpoint_falls_back_and_ends_as_uninterrupted(tmp_path, reference):
  import test_workdir_checkpoints as ck

  workdir = tmp_path / "damaged"
  rc, out = _finish(_worker(workdir, 1, "train.num_epochs=4", "train.stop_at_step=20"))
  assert rc == 0, out[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["15", "20"]
  ck.damage(ck._array_file(workdir / "checkpoints" / "20"), 0.5)
  rc, out = _finish(_worker(workdir, 1, "train.num_epochs=4"))
  assert rc == 0, out[-3000:]
  assert "checkpoint at step 20" in out and "failed verification" in out
  assert "resuming from the older checkpoint at step 15" in out
  assert _result(out) == reference[1]
  jax.tree.map(np.testing.assert_array_equal, load_params(workdir), load_params(reference[0]))
  (moved,) = os.listdir(workdir / "checkpoints" / "corrupt")
  assert moved.startswith("20-")
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    train_steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
  assert train_steps == sorted(set(train_steps)) == [4, 8, 12, 16, 20, 24, 28, 32]


def test_sigint_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
  port = _free_port()
  procs = [_worker(tmp_path / "two", 2, "train.num_epochs=4",
                   extra=["--delay", "0.3", "--coordinator", f"localhost:{port}",
                          "--num-processes", "2", "--process-id", str(i)]) for i in range(2)]
  _wait_for_event(tmp_path / "two" / "metrics.jsonl", "first_step")
  time.sleep(1.0)
  procs[0].send_signal(signal.SIGINT)  # jax's preemption service tells process 1
  (rc0, out0), (rc1, out1) = [_finish(p, timeout=120) for p in procs]
  assert rc0 == 130 and "interrupted (SIGINT) at step" in out0, out0[-3000:]
  assert rc1 == 0 and "RESULT {}" in out1, out1[-3000:]
  steps = {int(out.split(" at step ")[1].split()[0].rstrip(";")) for out in (out0, out1)
           if " at step " in out}
  assert len(steps) == 1
  assert str(steps.pop()) in os.listdir(tmp_path / "two" / "checkpoints")
