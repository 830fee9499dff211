"""Eval-only mode (spp_jax/evaluate.py): a workdir's checkpoint scored as training scores it,
on other splits and views, without writing into checkpoints/; one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import fakes
import workdirs
from spp_jax.evaluate import RunError, check_writable, evaluate_run, open_run, write_json
from spp_jax.train import train_and_evaluate
from spp_jax.train.workdir import config_to_dict

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run of the tiny fake network: (workdir, its results.json)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  results = train_and_evaluate(fakes.tiny_config(**{"eval.every_epochs": 0}), workdir,
                               models=fakes.TinyModels(), data=fakes.SyntheticData())
  return workdir, results


def _open(workdir, step=None):
  return open_run(workdir, step, models=fakes.TinyModels(), data=fakes.SyntheticData())


def test_scores_what_training_reported_and_writes_nothing(trained):
  workdir, results = trained
  before = workdirs.tree_snapshot(os.path.join(workdir, "checkpoints"))
  run = _open(workdir)
  report = evaluate_run(run, data=fakes.SyntheticData())
  assert report["results"] == results  # the same numbers, exactly
  assert report["step"] == run.step and report["split"] == "validation"
  assert set(report["details"]) == {"center", "full", "ten_view"}
  assert report["details"]["center"]["count"] == 20
  assert workdirs.tree_snapshot(os.path.join(workdir, "checkpoints")) == before


def test_views_by_name_or_kind_and_another_split(trained):
  workdir, _ = trained
  run = _open(workdir)
  report = evaluate_run(run, views=["full", "center"], split="train",
                        data=fakes.SyntheticData())
  assert list(report["results"]) == ["full/top1", "full/top5", "center/top1", "center/top5"]
  assert report["split"] == "train"
  with pytest.raises(RunError, match="unknown view 'multi'; this run has: center, "
                                    "feature_multiview, full, ten_view"):
    evaluate_run(run, views=["multi"], data=fakes.SyntheticData())


def test_steps_and_missing_checkpoints(trained, tmp_path):
  workdir, _ = trained
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert _open(workdir, steps[0]).step == steps[0]
  with pytest.raises(RunError, match=f"no checkpoint at step 999 .* saved steps: "
                                     f"{', '.join(map(str, steps))}"):
    _open(workdir, 999)
  (tmp_path / "empty").mkdir()
  with pytest.raises(RunError, match="not a training workdir"):
    _open(tmp_path / "empty")
  with open(tmp_path / "empty" / "config.json", "w") as f:
    json.dump(config_to_dict(fakes.tiny_config()), f)
  with pytest.raises(RunError, match="no checkpoint in .*checkpoints"):
    _open(tmp_path / "empty")
  with pytest.raises(RunError, match="does not exist"):
    _open(tmp_path / "nowhere")


def test_damaged_checkpoint_is_not_scored(trained, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(trained[0], workdir)
  step = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  path = workdir / "checkpoints" / str(step) / "meta" / "metadata"
  text = path.read_text()
  i = next(i for i, c in enumerate(text) if c.isdigit())
  path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])  # still JSON
  with pytest.raises(RunError, match=f"step {step} .* failed verification: checksum mismatch "
                                     f"in its metadata"):
    _open(workdir)


def test_output_paths(tmp_path):
  write_json(str(tmp_path / "a" / "b.json"), {"x": 1})
  assert json.load(open(tmp_path / "a" / "b.json")) == {"x": 1}
  with pytest.raises(RunError, match="inside a checkpoints/ directory"):
    write_json(str(tmp_path / "checkpoints" / "r.json"), {})
  (tmp_path / "plain").write_text("a file, not a directory")
  with pytest.raises(RunError, match="plain is not a writable directory"):
    check_writable(str(tmp_path / "plain" / "sub" / "r.json"))
  with pytest.raises(RunError, match="not a writable file"):
    check_writable(str(tmp_path))


def _cli(*args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "spp_jax.evaluate", *args], cwd=cwd or _REPO,
                        capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_command_line(tmp_path):
  """The real network of configs/demo.py:tiny, untrained, on the embedded data set."""
  workdir = workdirs.untrained_run(tmp_path / "run")
  out = tmp_path / "scores.json"
  proc = _cli("--workdir", workdir, "--views", "center", "--output", str(out))
  assert proc.returncode == 0, proc.stderr
  assert "center" in proc.stdout and "top-1 acc" in proc.stdout
  report = json.load(open(out))
  assert report["step"] == 1 and report["data"] == "multiscale_fashion_mnist/tiny"
  assert report["details"]["center"]["count"] == 256
  assert 0 <= report["results"]["center/top1"] <= 1

  for args, message in [
      (("--workdir", str(tmp_path)), "not a training workdir"),
      (("--workdir", workdir, "--split", "nosuchsplit"),
       "has no split 'nosuchsplit'; its splits: test, train"),
      (("--workdir", workdir, "--views", "nosuchview"), "unknown view 'nosuchview'"),
      (("--workdir", workdir, "--output", "/proc/nope/x.json"), "cannot write"),
  ]:
    proc = _cli(*args)
    assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, (args, proc.stderr)
