"""Only good checkpoints: damage is found and moved aside, non-finite states are never saved,
and a start that fails leaves the workdir as it was (in process, fast)."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

import fakes
from spp_jax.errors import DamagedCheckpointError, DataError, NonFiniteLossError
from spp_jax.train import integrity, parallel, schedules, state as state_lib
from spp_jax.train import load_params, train_and_evaluate
from spp_jax.train.checkpoint import Checkpointer, to_nested
from spp_jax.train.config_schema import ConfigError


def _run(workdir, data=None, **overrides):
  return train_and_evaluate(fakes.tiny_config(**overrides), str(workdir),
                            models=fakes.TinyModels(), data=data or fakes.SyntheticData())


def _array_file(step_dir) -> str:
  """The largest file of the state item: the one holding the arrays' chunks."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def damage(path: str, fraction: float, size: int = 4096):
  """Inverts `size` bytes (4 KiB, or all of a smaller file) starting at `fraction` of the way."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    size = min(size, len(data))
    start = int(fraction * (len(data) - size))
    data[start:start + size] = bytes(b ^ 0xFF for b in data[start:start + size])
    f.seek(0)
    f.write(data)


def _files(workdir) -> dict[str, bytes]:
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), workdir)] = f.read()
  return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A run stopped at step 12: checkpoints 10 and 12 (keep_checkpoints=2)."""
  workdir = tmp_path_factory.mktemp("stopped")
  _run(workdir, **{"train.stop_at_step": 12})
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "12"]
  return workdir


@pytest.mark.parametrize("fraction", [i / 8 for i in range(9)])
def test_damaged_array_file_falls_back_to_the_previous_checkpoint(stopped, tmp_path, fraction,
                                                                  caplog):
  workdir = tmp_path / "w"
  shutil.copytree(stopped, workdir)
  damage(_array_file(workdir / "checkpoints" / "12"), fraction)
  with caplog.at_level(logging.WARNING, logger="spp_jax"):
    assert _run(workdir, **{"train.stop_at_step": 12}) == {}
  moved = os.listdir(workdir / "checkpoints" / "corrupt")
  assert len(moved) == 1 and moved[0].startswith("12-")
  assert any("checkpoint at step 12" in r.message and "failed verification" in r.message
             and "moved to" in r.message for r in caplog.records)
  # Steps 11 and 12 were trained again from step 10: the same parameters as before.
  jax.tree.map(np.testing.assert_array_equal, load_params(workdir), load_params(stopped))


def test_damage_that_orbax_restores_silently_is_caught_by_the_checksums(stopped, tmp_path,
                                                                        monkeypatch):
  # One byte inside the (zstd-compressed) array file that TensorStore decodes without error.
  # Where such a byte lies depends on the file's layout (async saves write arrays in any
  # order), so the offset is searched for with verification off.
  good = Checkpointer(str(stopped / "checkpoints"), keep=2).restore(12, _abstract_state())

  def restore(name, fraction, check):
    workdir = tmp_path / f"{name}-{fraction}"
    shutil.copytree(stopped, workdir)
    damage(_array_file(workdir / "checkpoints" / "12"), fraction, size=1)
    if not check:
      monkeypatch.setattr(integrity, "verify", lambda *args: None)
    try:
      return workdir, Checkpointer(str(workdir / "checkpoints"), keep=2).restore_latest(
          _abstract_state())
    finally:
      monkeypatch.undo()

  for fraction in (0.25, 0.1, 0.4, 0.55, 0.7, 0.85):
    _, restored = restore("unchecked", fraction, check=False)
    silent = restored.step == 12 and not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(to_nested(restored.state)), jax.tree.leaves(to_nested(good.state))))
    if silent:  # what orbax alone would have trained on: another state than the one saved
      break
  else:
    pytest.skip("orbax itself detected the damage at every offset tried")
  workdir, restored = restore("checked", fraction, check=True)
  assert restored.step == 10 and os.listdir(workdir / "checkpoints" / "corrupt")


def _abstract_state():
  config = fakes.tiny_config()
  tx = schedules.make_optimizer(config.optimizer, lambda count: 0.0)
  return state_lib.abstract_train_state(fakes.TinyModels(), config.model, 4, config.seed, tx,
                                        parallel.replicated(parallel.make_mesh()))


@pytest.mark.parametrize("item", ["manifest/metadata", "meta/metadata", "data/*.json"])
def test_damaged_metadata_is_found(stopped, tmp_path, item):
  workdir = tmp_path / "w"
  shutil.copytree(stopped, workdir)
  (path,) = glob.glob(str(workdir / "checkpoints" / "12" / item))
  with open(path, encoding="utf-8") as f:
    text = f.read()
  i = next(i for i, c in enumerate(text) if c.isdigit())
  with open(path, "w", encoding="utf-8") as f:  # one digit: still JSON, another number
    f.write(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
  assert _run(workdir, **{"train.stop_at_step": 12}) == {}
  assert os.listdir(workdir / "checkpoints" / "corrupt")[0].startswith("12-")


def test_no_good_checkpoint_left_is_an_error_every_time(stopped, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(stopped, workdir)
  for step in ("10", "12"):
    damage(_array_file(workdir / "checkpoints" / step), 0.5)
  for _ in range(2):  # never a silent restart from scratch, also once they are moved aside
    with pytest.raises(DamagedCheckpointError, match="no good checkpoint left in"):
      _run(workdir)
  assert sorted(n.split("-")[0] for n in os.listdir(workdir / "checkpoints" / "corrupt")) == [
      "10", "12"]


def test_load_params_verifies(stopped, tmp_path):
  shutil.copytree(stopped, tmp_path / "v")
  damage(_array_file(tmp_path / "v" / "checkpoints" / "12"), 0.5)
  with pytest.raises(DamagedCheckpointError, match="step 12 .* failed verification|cannot read"):
    load_params(tmp_path / "v")
  load_params(tmp_path / "v", step=10)


@pytest.mark.parametrize("overrides", [
    {"optimizer.learning_rate": 1e39},  # the first update overflows float32
    {"optimizer.learning_rate": 1e5, "model.param_dtype": "float16"},  # and float16
])
def test_non_finite_state_is_never_saved(tmp_path, overrides):
  with pytest.raises(NonFiniteLossError, match="train state became non-finite by step 1"):
    _run(tmp_path, **overrides, **{"train.checkpoint_every_steps": 1})
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))


class _Unprepared(fakes.SyntheticData):
  """As the data module for a data set that was never prepared."""

  def num_examples(self, data_cfg, split):
    raise DataError(f"synthetic split {split!r} is not prepared in /data/synthetic/1.0.0",
                    hint="prepare it once with: python -m spp_jax.data.prepare --dataset "
                         "synthetic")


def test_failed_start_in_a_new_workdir_leaves_nothing(tmp_path):
  with pytest.raises(DataError, match=r"^config.data.name='synthetic': synthetic split 'train' "
                     r"is not prepared in /data/synthetic/1.0.0$") as e:
    _run(tmp_path / "w", data=_Unprepared())
  assert e.value.hint == "prepare it once with: python -m spp_jax.data.prepare --dataset synthetic"
  with pytest.raises(ConfigError, match="batch_size=128 is larger than the training split"):
    _run(tmp_path / "w", **{"train.batch_size": 128})
  assert not os.path.exists(tmp_path / "w")
  _run(tmp_path / "w", **{"train.stop_at_step": 2})  # the corrected command starts


def test_failed_start_in_an_existing_workdir_changes_nothing(tmp_path):
  _run(tmp_path, **{"train.stop_at_step": 2})
  before = _files(tmp_path)
  with pytest.raises(DataError):
    _run(tmp_path, data=_Unprepared())
  # --force may change training keys, not the shapes of what the checkpoints hold.
  with pytest.raises(ConfigError, match=r"config.model.fc_width: 16 -> 32 changes the shapes "
                     r"of the state saved in .*checkpoints \(params/classifier/kernel/value: "
                     r"\(16, 4\) float32 -> \(32, 4\) float32; ") as e:
    _run(tmp_path, **{"model.fc_width": 32, "allow_config_change": True})
  assert "keep config.model.fc_width=16" in e.value.hint
  assert _files(tmp_path) == before
  with open(tmp_path / "config.json", encoding="utf-8") as f:
    assert json.load(f)["model"]["fc_width"] == 16
  _run(tmp_path, **{"train.stop_at_step": 3})  # the corrected command resumes
