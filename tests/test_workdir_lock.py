"""One writer per workdir: the lock file, its stale-lock rule, and two real runs at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from spp_jax.errors import WorkdirLockedError
from spp_jax.train.lock import LOCK_NAME, WorkdirLock, this_process

_FAKES = os.path.join(os.path.dirname(__file__), "fakes.py")


def _gone_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_NAME), "w", encoding="utf-8") as f:
    json.dump(dict(this_process(), **holder), f)


def test_lock_names_its_holder_and_is_released(tmp_path):
  with WorkdirLock(tmp_path) as lock:
    with open(lock.path, encoding="utf-8") as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(WorkdirLockedError, match=f"is in use by pid {os.getpid()} on "
                       f"{socket.gethostname()} since "):
      with WorkdirLock(tmp_path):
        pass
  assert not os.path.exists(tmp_path / LOCK_NAME)
  with WorkdirLock(tmp_path):  # free again
    pass


def test_stale_lock_of_a_gone_process_is_removed(tmp_path, caplog):
  _write_lock(tmp_path, pid=_gone_pid())
  with WorkdirLock(tmp_path):
    pass
  assert "removed the stale lock" in caplog.text
  # A live pid whose process started at another time is a reused pid: stale too.
  _write_lock(tmp_path, pid=os.getppid(), start="1")
  with WorkdirLock(tmp_path):
    pass


def test_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
  _write_lock(tmp_path, host="elsewhere", pid=_gone_pid())
  with pytest.raises(WorkdirLockedError, match="on elsewhere") as e:
    with WorkdirLock(tmp_path):
      pass
  assert e.value.hint.endswith(f"delete {tmp_path / LOCK_NAME}")
  os.unlink(tmp_path / LOCK_NAME)


def test_unreadable_lock_is_refused(tmp_path):
  (tmp_path / LOCK_NAME).write_text("")
  with pytest.raises(WorkdirLockedError, match="unknown process"):
    with WorkdirLock(tmp_path):
      pass


def test_a_refused_lock_leaves_a_new_workdir_absent(tmp_path):
  with WorkdirLock(tmp_path / "w"):
    with pytest.raises(WorkdirLockedError):
      with WorkdirLock(tmp_path / "w"):
        pass
  assert not os.path.exists(tmp_path / "w")  # created by the lock, left empty: removed


@pytest.mark.slow
def test_second_run_in_a_workdir_is_refused_within_seconds(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.Popen([sys.executable, _FAKES, "--workdir", str(tmp_path), "--delay", "0.3",
                            "--set", "train.num_epochs=3"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not os.path.exists(tmp_path / "metrics.jsonl") and time.time() < deadline:
    time.sleep(0.1)
  start = time.time()
  second = subprocess.run([sys.executable, _FAKES, "--workdir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
  seconds = time.time() - start
  out, _ = first.communicate(timeout=300)
  assert first.returncode == 0 and "RESULT {" in out, out[-3000:]
  assert second.returncode == 1, second.stderr[-3000:]
  lines = second.stderr.strip().splitlines()
  assert lines[-2] == (f"error: workdir {tmp_path} is in use by pid {first.pid} on "
                       f"{socket.gethostname()} since {lines[-2].split(' since ')[1]}")
  assert lines[-1].startswith("hint: wait for that run to end; if it is gone")
  assert "Traceback" not in second.stderr
  print(f"second writer refused after {seconds:.1f} s (process start included)")
  assert seconds < 30
  assert not os.path.exists(tmp_path / LOCK_NAME)  # the first released it
