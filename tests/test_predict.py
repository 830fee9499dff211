"""Predicting files (spp_jax/predict.py): evaluation's own preprocessing, class names, padded
mixed-size batches equal to each image alone, bad files skipped by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import workdirs
from spp_jax.data import buckets as buckets_lib, on_device, sources
from spp_jax.data.settings import data_settings
from spp_jax.evaluate import open_run
from spp_jax.predict import load_files, predict, view_settings_for

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
         "bag", "ankle_boot"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return open_run(workdirs.untrained_run(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def test_files(run, tmp_path_factory):
  """The test images of the run's data set, as the PNG files they are stored as."""
  directory = tmp_path_factory.mktemp("images")
  source = sources.open_source(run.data_cfg, run.data_cfg.eval_split)
  paths = []
  for i in range(len(source)):
    path = directory / f"{i:03d}.png"
    path.write_bytes(source.records[i][source.image_key])
    paths.append(str(path))
  return paths


def _probs(result) -> np.ndarray:
  p = np.zeros(10)
  for entry in result["predictions"]:
    p[entry["class"]] = entry["probability"]
  return p


def _eval_probs(run, view_name, rows):
  """Softmax averaged over views, from evaluation's own batch of the first `rows` slots."""
  import jax

  from spp_jax import data

  view = next(v for v in run.config.eval.views if v.name == view_name)
  batch = next(iter(data.eval_iterator(run.data_cfg, view, batch_size=rows)))
  batch = jax.device_get(on_device.eval_batch(batch, view, run.data_cfg))
  model = run.model()
  out = []
  for j in range(rows):
    logits = model(batch["image"][j], batch["image_size"][j])
    out.append(np.asarray(jax.nn.softmax(logits, -1)).mean(0))
  return np.stack(out)


@pytest.mark.parametrize("view", ["center", "ten_view", "full"])
def test_files_score_as_evaluation_scores_them(run, test_files, view):
  rows = 4
  if view == "full":  # evaluation batches the examples of one bucket together, by index
    s = data_settings(run.data_cfg)
    b = buckets_lib.example_buckets(s, s.eval_split)
    indices = np.flatnonzero(b == b.min())[:rows]
  else:
    indices = np.arange(rows)
  results, skipped = predict(run, [test_files[i] for i in indices], view=view, top_k=10)
  assert not skipped
  np.testing.assert_allclose(np.stack([_probs(r) for r in results]),
                             _eval_probs(run, view, rows)[:len(indices)], rtol=0, atol=2e-6)


def test_mixed_sizes_in_one_batch_equal_each_alone(run, test_files):
  files = test_files[:12]
  settings, v = view_settings_for(run, "full")
  loaded, _ = load_files(files, settings, v)
  assert len({x.views[0].shape for x in loaded}) > 2  # really of several sizes
  together, _ = predict(run, files, top_k=10, batch_size=16)
  alone = [predict(run, [f], top_k=10)[0][0] for f in files[:4]]
  for a, t in zip(alone, together):
    np.testing.assert_allclose(_probs(t), _probs(a), rtol=0, atol=1e-6)
  assert [r["file"] for r in together] == files
  assert together[0]["size"] == list(Image.open(files[0]).size[::-1])
  assert all(p["name"] == NAMES[p["class"]] for r in together for p in r["predictions"])
  probs = [p["probability"] for p in together[0]["predictions"]]
  assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5


def test_bad_and_small_files(run, tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  small = tmp_path / "small.png"
  Image.fromarray(np.full((6, 9, 3), 200, np.uint8)).save(small)
  results, skipped = predict(run, [str(bad), str(small), str(tmp_path / "none.png")], top_k=3)
  assert [r["file"] for r in results] == [str(small)]  # resized up, as evaluation does
  assert len(results[0]["predictions"]) == 3
  assert skipped == [dict(file=str(bad), error="cannot decode: UnidentifiedImageError"),
                     dict(file=str(tmp_path / "none.png"),
                          error="cannot read: No such file or directory")]
  with run.data_cfg.unlocked():
    run.data_cfg.small_image = "reject"
  try:
    results, skipped = predict(run, [str(small)])
  finally:
    with run.data_cfg.unlocked():
      run.data_cfg.small_image = "resize"
  assert results == [] and skipped[0]["file"] == str(small)
  assert skipped[0]["error"].startswith("refused: image of size (6, 9) is below")


@pytest.mark.slow
def test_command_line(run, test_files, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG broken")
  cmd = [sys.executable, "-m", "spp_jax.predict", "--workdir", run.workdir, "--top_k", "2"]
  proc = subprocess.run(cmd + ["--json", test_files[0], str(bad), test_files[1]], cwd=_REPO,
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert [r["file"] for r in out["results"]] == test_files[:2]
  assert out["skipped"][0]["file"] == str(bad)
  assert f"skipped {bad}: cannot decode" in proc.stderr
  expected, _ = predict(run, test_files[:2], top_k=2)
  for got, want in zip(out["results"], expected):
    np.testing.assert_allclose([p["probability"] for p in got["predictions"]],
                               [p["probability"] for p in want["predictions"]], atol=1e-6)
  proc = subprocess.run(cmd + ["--view", "ten_view", test_files[2]], cwd=_REPO,
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0 and proc.stdout.startswith(f"{test_files[2]} (")
  proc = subprocess.run(cmd + [str(bad)], cwd=_REPO, capture_output=True, text=True, env=env,
                        timeout=600)
  assert proc.returncode == 1  # nothing could be predicted
