"""`python -m spp_jax.main`: flags, config files with arguments and overrides, errors, results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "spp_jax.main", *args], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_bad_config_is_a_clear_error(tmp_path):
  workdir = tmp_path / "w"
  proc = _main("--config", "configs/demo.py:tiny", "--config.model.name=resnet",
               f"--workdir={workdir}")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "error: config.model.name='resnet': unknown model" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_unknown_variant_and_missing_workdir(tmp_path):
  proc = _main("--config", "configs/demo.py:fastest", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "unknown config variant 'fastest'" in proc.stderr
  proc = _main("--config", "configs/demo.py")
  assert proc.returncode != 0 and "--workdir" in proc.stderr


@pytest.mark.slow
def test_demo_tiny_end_to_end_then_resume_and_refuse(tmp_path):
  workdir = tmp_path / "demo"
  data_dir = os.environ.get("SPP_JAX_TEST_TFDS_DIR", str(tmp_path / "tfds"))
  common = ("--config", "configs/demo.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}")
  proc = _main(*common)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(workdir / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  left_out = results.pop("images_left_out")
  assert left_out["train"]["split"] == "train" and set(left_out["eval"]) == {
      "center", "full", "ten_view"}
  assert all(v["split"] == "test" and v["skipped"] >= 0 and v["rejected"] >= 0
             for v in left_out["eval"].values())
  assert set(results) == {f"{v}/{k}" for v in ("center", "full", "ten_view")
                          for k in ("top1", "top5")}
  assert all(0.0 <= v <= 1.0 for v in results.values())
  # The table of accuracy per view is the last thing printed.
  assert "view" in proc.stdout and "top-1 acc" in proc.stdout
  for view in ("center", "full", "ten_view"):
    assert f"{100 * results[view + '/top1']:.2f}%" in proc.stdout
  # A finished workdir is not trained again; a changed training key is refused...
  proc = _main(*common, "--config.optimizer.learning_rate=0.5")
  assert proc.returncode == 1 and "optimizer.learning_rate: 0.02 -> 0.5" in proc.stderr
  assert "Traceback" not in proc.stderr and "hint: use a new workdir, or --force" in proc.stderr
  # --force cannot change the shapes of what the checkpoints hold: refused, nothing written.
  with open(workdir / "config.json", encoding="utf-8") as f:
    saved = f.read()
  proc = _main(*common, "--config.model.fc_width=64", "--force")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "error: config.model.fc_width: None -> 64 changes the shapes of the state saved" in (
      proc.stderr)
  with open(workdir / "config.json", encoding="utf-8") as f:
    assert f.read() == saved
  # ...other training keys may change when forced.
  proc = _main(*common, "--config.optimizer.learning_rate=0.5", "--force")
  assert proc.returncode == 0, proc.stderr[-3000:]
