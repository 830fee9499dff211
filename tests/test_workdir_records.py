"""Records once: metrics.jsonl and TensorBoard hold each step once after any resume;
stop_at_step is idempotent; results.json counts the images left out (in process, fast)."""

from __future__ import annotations

import collections
import json
import os
import shutil

import pytest

import fakes
from spp_jax.train import train_and_evaluate
from spp_jax.train.metrics import _import_tensorboardx, _tfrecords


def _run(workdir, data=None, **overrides):
  return train_and_evaluate(fakes.tiny_config(**overrides), str(workdir),
                            models=fakes.TinyModels(), data=data or fakes.SyntheticData())


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _metric_steps(workdir):
  """(kind, step) of every metric record: 'train' or 'eval'."""
  out = []
  for r in _records(workdir):
    if "event" not in r:
      out.append(("eval" if any(k.startswith("eval/") for k in r) else "train", r["step"]))
  return out


_TIMING = ("images_per_s", "step_time_s")  # NaN (not written) when a log interval is 1 step


def _same_points(a, b):
  """Every (tag, step) once in both, and the same ones but for timing tags."""
  assert set(a.values()) == set(b.values()) == {1}
  assert {k for k in a if k[0] not in _TIMING} == {k for k in b if k[0] not in _TIMING}


def _tensorboard_points(workdir):
  """Counter of (tag, step) over every TensorBoard event file of the workdir."""
  event_pb2 = _import_tensorboardx().proto.event_pb2
  logdir = os.path.join(workdir, "tensorboard")
  points = collections.Counter()
  for name in os.listdir(logdir):
    for _, payload in _tfrecords(os.path.join(logdir, name)):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        points[(value.tag, event.step)] += 1
  return points


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref")
  results = _run(workdir)
  return workdir, results


EXPECTED = [("train", 4), ("train", 8), ("eval", 8), ("train", 12), ("train", 16), ("eval", 16)]


def test_uninterrupted_run_records_each_step_once(reference):
  workdir, _ = reference
  assert _metric_steps(workdir) == EXPECTED
  points = _tensorboard_points(workdir)
  assert points and set(points.values()) == {1}
  assert {s for (t, s) in points if t == "loss"} == {4, 8, 12, 16}


def test_resume_after_stop_records_each_step_once(reference, tmp_path):
  _run(tmp_path, **{"train.stop_at_step": 7})
  _run(tmp_path)
  assert _metric_steps(tmp_path) == EXPECTED
  _same_points(_tensorboard_points(tmp_path), _tensorboard_points(reference[0]))


def test_resume_from_an_older_checkpoint_drops_the_redone_records(reference, tmp_path):
  # As after a kill between the log line at step 8 (and the eval after epoch 0) and the
  # checkpoint at step 10: the run goes back to step 5 and records 8 again.
  _run(tmp_path, **{"train.stop_at_step": 10})
  shutil.rmtree(tmp_path / "checkpoints" / "10")
  _run(tmp_path)
  assert _metric_steps(tmp_path) == EXPECTED
  _same_points(_tensorboard_points(tmp_path), _tensorboard_points(reference[0]))
  resumes = [r for r in _records(tmp_path) if r.get("event") == "resume"]
  assert [r["step"] for r in resumes] == [5]


def test_finished_workdir_rerun_records_its_evaluation_once(reference, tmp_path):
  shutil.copytree(reference[0], tmp_path / "w")
  assert _run(tmp_path / "w") == reference[1]
  assert _metric_steps(tmp_path / "w") == EXPECTED
  assert set(_tensorboard_points(tmp_path / "w").values()) == {1}


def test_stop_at_step_is_idempotent(tmp_path):
  _run(tmp_path, **{"train.stop_at_step": 7})
  before = _metric_steps(tmp_path)
  steps = sorted(os.listdir(tmp_path / "checkpoints"))
  for _ in range(2):
    assert _run(tmp_path, **{"train.stop_at_step": 7}) == {}
  assert _metric_steps(tmp_path) == before
  assert sorted(os.listdir(tmp_path / "checkpoints")) == steps == ["5", "7"]
  stopped = [r for r in _records(tmp_path) if r.get("event") == "stopped"]
  assert [r["step"] for r in stopped] == [7]


def test_results_count_images_left_out_per_split_and_view(tmp_path):
  data = fakes.SyntheticData(left_out_every=4)
  _run(tmp_path / "a", data=data, **{"train.stop_at_step": 7})  # resumes mid-epoch
  _run(tmp_path / "a", data=data)
  _run(tmp_path / "b", data=data)
  for name in ("a", "b"):
    with open(tmp_path / name / "results.json", encoding="utf-8") as f:
      left_out = json.load(f)["images_left_out"]
    # 8 batches an epoch, 2 epochs: batches 0 and 4 count a skip, 1 and 5 a rejection.
    assert left_out["train"] == {"split": "train", "skipped": 4, "rejected": 4}
    # 20 eval examples in 3 batches: batch 0 skips one, batch 1 rejects one, per view.
    assert left_out["eval"] == {v: {"split": "validation", "skipped": 1, "rejected": 1}
                                for v in ("center", "full", "ten_view")}
