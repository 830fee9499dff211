"""configs/demo.py:tiny with a gs:// workdir and data_dir, against fake-gcs-server: train,
SIGTERM, resume to the parameters of an uninterrupted local run bit for bit, evaluate.

Runs inside a network namespace with only loopback (tests/test_gcs_sandbox.py starts it).
"""

from __future__ import annotations

import json
import os
import re
import signal
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
from spp_jax.train import load_params  # noqa: E402
from spp_jax.train.metrics import _tfrecords  # noqa: E402

pytestmark = pytest.mark.slow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 epochs of 16 steps, a checkpoint every 8 (saved asynchronously while training goes on).
_FLAGS = ["--config", "configs/demo.py:tiny", "--config.train.num_epochs=4",
          "--config.train.checkpoint_every_steps=8"]
_STEPS = 64


def _main(workdir: str, *flags: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "spp_jax.main", "--workdir", workdir, *_FLAGS,
                           *flags], cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


class _Lines:
  """A process's output, read by a thread, searchable while it runs."""

  def __init__(self, proc: subprocess.Popen):
    self.proc, self.lines = proc, []
    self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
    self._thread.start()

  def wait_for(self, pattern: str, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      if any(re.search(pattern, line) for line in list(self.lines)):
        return
      time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not seen: {''.join(self.lines)[-4000:]}")

  def text(self, timeout: float = 240) -> str:
    self.proc.wait(timeout=timeout)
    self._thread.join(timeout=30)
    return "".join(self.lines)


def _records(workdir: str) -> list[dict]:
  return [json.loads(line) for line in epath.Path(f"{workdir}/metrics.jsonl").read_text()
          .splitlines()]


def _tensorboard_loss_steps(workdir: str) -> list[int]:
  from tensorboardX.proto import event_pb2

  steps = []
  for f in epath.Path(f"{workdir}/tensorboard").iterdir():
    for _, payload in _tfrecords(f):
      event = event_pb2.Event.FromString(payload)
      steps += [event.step for v in event.summary.value if v.tag == "loss"]
  return sorted(steps)


def test_tiny_demo_on_gcs_stops_on_sigterm_resumes_bitwise_and_evaluates(tmp_path, gcs_bucket):
  reference = str(tmp_path / "reference")  # local workdir, local data: the uninterrupted run
  _finish(_main(reference))
  with open(os.path.join(reference, "results.json"), encoding="utf-8") as f:
    want = json.load(f)

  workdir, data_dir = f"{gcs_bucket}/tiny/run", f"{gcs_bucket}/tiny/tfds"
  data_flag = f"--config.data.data_dir={data_dir}"
  first = _Lines(_main(workdir, data_flag))
  first.wait_for(r"step (8|12)/64 ")  # training, past the first asynchronous checkpoint
  first.proc.send_signal(signal.SIGTERM)
  out = first.text()
  assert first.proc.returncode == 0, out[-4000:]
  assert "then copying it to gs://" in out  # the data set was staged locally, then uploaded
  stopped = [r for r in _records(workdir) if r.get("event") == "stopped"]
  assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM", out[-3000:]
  step = stopped[0]["step"]
  assert 8 <= step < _STEPS
  assert str(step) in [p.name for p in epath.Path(f"{workdir}/checkpoints").iterdir()]
  assert not epath.Path(f"{workdir}/.lock").exists()  # released
  assert not epath.Path(f"{workdir}/results.json").exists()

  _finish(_main(workdir, data_flag))  # resumes from the checkpoint at `step`
  got = json.loads(epath.Path(f"{workdir}/results.json").read_text())
  assert got == want
  jax.tree.map(np.testing.assert_array_equal, load_params(workdir), load_params(reference))
  records = _records(workdir)
  assert [r["step"] for r in records if "loss" in r] == list(range(4, _STEPS + 1, 4))
  assert any(r.get("event") == "resume" and r["step"] == step for r in records)
  assert _tensorboard_loss_steps(workdir) == list(range(4, _STEPS + 1, 4))

  evaluated = subprocess.run([sys.executable, "-m", "spp_jax.evaluate", "--workdir", workdir],
                             cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                             capture_output=True, text=True, timeout=240)
  assert evaluated.returncode == 0, evaluated.stderr[-4000:]
  report = epath.Path(f"{workdir}/eval/multiscale_fashion_mnist_tiny-test-step{_STEPS}.json")
  scored = json.loads(report.read_text())
  assert scored["results"] == {k: v for k, v in want.items() if k != "images_left_out"}
