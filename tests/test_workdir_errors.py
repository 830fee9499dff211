"""Expected failures, in real processes: one `error: ...` line, at most one `hint: ...` line,
exit status 1 and no traceback (python -m spp_jax.main, and tests/fakes.py for the trainer)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import uuid

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FAKES = os.path.join(_REPO, "tests", "fakes.py")


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "spp_jax.main", *args], cwd=_REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)


def _fakes(workdir, *sets: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, _FAKES, "--workdir", str(workdir)]
  for s in sets:
    cmd += ["--set", s]
  return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _error(proc: subprocess.CompletedProcess) -> tuple[str, str | None]:
  """(the error line, the hint line or None), checking the one-line format."""
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  errors = [i for i, l in enumerate(lines) if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  rest = lines[errors[0] + 1:]
  assert len(rest) <= 1 and all(l.startswith("hint: ") for l in rest), proc.stderr[-3000:]
  return lines[errors[0]], rest[0] if rest else None


_TINY = ("--config", "configs/demo.py:tiny")


def test_typo_in_an_override_key(tmp_path):
  error, hint = _error(_main(*_TINY, "--config.train.batchsize=3", f"--workdir={tmp_path}/w"))
  assert error == ("error: --config.train.batchsize=3: config.train.batchsize is not a config "
                   "key")
  assert hint == "hint: did you mean --config.train.batch_size?"
  assert not os.path.exists(tmp_path / "w")


def test_bad_override_value(tmp_path):
  error, hint = _error(_main(*_TINY, "--config.train.batch_size=abc", f"--workdir={tmp_path}"))
  assert error == ("error: --config.train.batch_size=abc: invalid literal for int() with base "
                   "10: 'abc'")
  assert hint == "hint: config.train.batch_size must be an int >= 1"
  error, _ = _error(_main(*_TINY, "--config.optimizer.momentum=1.5", f"--workdir={tmp_path}"))
  assert error == "error: config.optimizer.momentum=1.5: must be a number in [0, 1)"


def test_unknown_config_variant_and_missing_file(tmp_path):
  error, _ = _error(_main("--config", "configs/demo.py:fastest", f"--workdir={tmp_path}"))
  assert error.startswith("error: --config=configs/demo.py:fastest: unknown config variant "
                          "'fastest'")
  error, _ = _error(_main("--config", "configs/nope.py", f"--workdir={tmp_path}"))
  assert error.startswith("error: config file 'configs/nope.py' not found")
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  error, _ = _error(_main("--config", str(tmp_path / "bad.py"), f"--workdir={tmp_path}"))
  assert error == f"error: --config: the config file {tmp_path}/bad.py line 1: invalid syntax"


def test_verbose_shows_the_traceback(tmp_path):
  proc = _main(*_TINY, "--config.train.batchsize=3", f"--workdir={tmp_path}", "--verbose")
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("hint: did you mean")


@pytest.mark.slow
def test_unprepared_data_set_names_the_prepare_command(tmp_path):
  empty = tmp_path / "tfds"
  empty.mkdir()
  error, hint = _error(_main(*_TINY, "--config.data.name=imagenet2012",
                             f"--config.data.data_dir={empty}", f"--workdir={tmp_path}/w"))
  assert error.startswith(f"error: config.data.name='imagenet2012': imagenet2012 split 'train' "
                          f"is not prepared in {empty}/imagenet2012/")
  assert hint == (f"hint: prepare it once with: python -m spp_jax.data.prepare --dataset "
                  f"imagenet2012 --data_dir {empty} --manual_dir DIR_WITH_THE_DOWNLOADED_FILES")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_full_metrics_device(tmp_path):
  # /dev/full answers every write with ENOSPC.
  os.makedirs(tmp_path / "w")
  os.symlink("/dev/full", tmp_path / "w" / "metrics.jsonl")
  error, _ = _error(_fakes(tmp_path / "w"))
  assert error == (f"error: no space left on the device of {tmp_path}/w/metrics.jsonl "
                   f"(writing metrics)")


@pytest.fixture
def small_disk(tmp_path):
  """A 400 KiB tmpfs (needs root, as `mount` does)."""
  mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (not root)")
  try:
    yield mount
  finally:
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_full_disk_names_the_path_and_keeps_earlier_checkpoints(small_disk):
  workdir = small_disk / "w"
  error, hint = _error(_fakes(workdir, "train.num_epochs=8", "train.checkpoint_every_steps=2",
                              "train.keep_checkpoints=50"))
  assert error.startswith(f"error: no space left on the device of {workdir}")
  assert hint.startswith("hint: free space there")
  from spp_jax.train import load_params
  assert load_params(workdir)  # the newest checkpoint verifies


@pytest.mark.slow
def test_damaged_checkpoints_and_non_finite_state(tmp_path):
  import test_workdir_checkpoints as ck

  workdir = tmp_path / "w"
  proc = _fakes(workdir, "train.stop_at_step=12")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for step in ("10", "12"):
    ck.damage(ck._array_file(workdir / "checkpoints" / step), 0.5)
  error, hint = _error(_fakes(workdir))
  assert error.startswith(f"error: no good checkpoint left in {workdir}/checkpoints: step 12 (")
  assert error.endswith(f"damaged checkpoints are in {workdir}/checkpoints/corrupt")
  assert hint.startswith("hint: restore a checkpoint from a backup, or move")
  assert len(glob.glob(str(workdir / "checkpoints" / "corrupt" / "*"))) == 2

  shutil.rmtree(workdir)
  error, hint = _error(_fakes(workdir, "optimizer.learning_rate=1e39",
                              "train.checkpoint_every_steps=1"))
  assert error.startswith("error: the train state became non-finite by step 1 (NaN or inf in "
                          "params/")
  assert error.endswith(f"not saved. No checkpoint was saved yet in {workdir}/checkpoints")
  assert hint == ("hint: lower optimizer.learning_rate, use float32 parameters, or check the "
                  "inputs")
