"""Warm starts (config.init_from): parameters by name, a new classifier for another class
count, every other mismatch refused by name (spp_jax/train/init_from.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fakes
from spp_jax.train import load_params, parallel, schedules, state as state_lib
from spp_jax.train import train_and_evaluate
from spp_jax.train.config_schema import ConfigError
from spp_jax.train.init_from import flatten, match, transfer, warm_start


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """A finished 4-class run of the tiny fake network."""
  workdir = tmp_path_factory.mktemp("source")
  train_and_evaluate(fakes.tiny_config(**{"train.num_epochs": 1, "eval.every_epochs": 0}),
                     str(workdir), models=fakes.TinyModels(),
                     data=fakes.SyntheticData(num_classes=4))
  return str(workdir)


def _fresh_state(config, num_classes):
  tx = schedules.make_optimizer(config.optimizer, lambda count: 0.01)
  rep = parallel.replicated(parallel.make_mesh())
  state = state_lib.create_train_state(fakes.TinyModels(), config.model, num_classes,
                                       int(config.seed), tx, rep)
  return state, tx


def _warm(config, num_classes, events=None):
  state, tx = _fresh_state(config, num_classes)
  before = {k: np.asarray(v) for k, v in flatten(state.params).items()}
  after = warm_start(state, config, tx, event=None if events is None else events.append)
  return before, {k: np.asarray(v) for k, v in flatten(after.params).items()}


def test_other_class_count_gets_a_new_classifier(source_run):
  config = fakes.tiny_config(init_from=source_run, seed=7)
  events = []
  before, after = _warm(config, num_classes=6, events=events)
  source = flatten(load_params(source_run))
  for name in ("conv/kernel", "conv/bias", "fc/kernel", "fc/bias"):
    np.testing.assert_array_equal(after[name], source[name])
    assert not np.array_equal(after[name], before[name])
  for name in ("classifier/kernel", "classifier/bias"):
    np.testing.assert_array_equal(after[name], before[name])  # seed 7's own initialisation
  assert after["classifier/kernel"].shape == (16, 6)
  assert events == [dict(event="init_from", workdir=source_run, step=None, copied=4,
                         reinitialised=["classifier/bias", "classifier/kernel"])]


def test_same_class_count_copies_everything(source_run):
  config = fakes.tiny_config(init_from=source_run)
  _, after = _warm(config, num_classes=4)
  source = flatten(load_params(source_run))
  assert sorted(after) == sorted(source)
  for name in source:
    np.testing.assert_array_equal(after[name], source[name])


@pytest.mark.parametrize("overrides, named", [
    ({"model.fc_width": 32}, "fc/kernel (40, 16) vs (40, 32)"),
    ({"model.spp_levels": (1,)}, "fc/kernel (40, 16) vs (8, 16)"),
])
def test_other_architecture_is_refused_naming_the_parameters(source_run, overrides, named):
  config = fakes.tiny_config(init_from=source_run, **overrides)
  with pytest.raises(ConfigError, match="do not match") as info:
    _warm(config, num_classes=4)
  assert named in str(info.value)
  assert "classifier" not in str(info.value)


def test_match_names_missing_and_extra_parameters():
  target = {"conv/kernel": np.zeros(3), "fc/kernel": np.zeros(2), "classifier/kernel": np.zeros(4)}
  source = {"conv/kernel": np.ones(3), "fc7/kernel": np.ones(2), "classifier/kernel": np.ones(5)}
  with pytest.raises(ConfigError) as info:
    match(target, source, where="W")
  message = str(info.value)
  assert "missing in W: fc/kernel" in message and "not in this network: fc7/kernel" in message
  assert "\n" not in message
  source = {"conv/kernel": np.ones(3), "fc/kernel": np.ones(2), "classifier/kernel": np.ones(5)}
  values, report = match(target, source, where="W")
  assert report.copied == ["conv/kernel", "fc/kernel"]
  assert report.reinitialised == ["classifier/kernel"]
  assert values["classifier/kernel"] is target["classifier/kernel"]
  assert values["fc/kernel"] is source["fc/kernel"]


def test_no_checkpoint_and_unknown_step(source_run, tmp_path):
  with pytest.raises(ConfigError, match="no checkpoint in"):
    _warm(fakes.tiny_config(init_from=str(tmp_path)), num_classes=4)
  with pytest.raises(ConfigError, match="init_from_step=3: .* has checkpoints at steps"):
    _warm(fakes.tiny_config(init_from=source_run, init_from_step=3), num_classes=4)


def test_training_run_starts_from_the_source(source_run, tmp_path):
  """End to end: a 6-class run warm-started from the 4-class one logs what it re-initialised
  and trains; with stop_at_step=1 its first checkpoint is one step from the source's weights."""
  config = fakes.tiny_config(init_from=source_run, **{"train.num_epochs": 1,
                                                      "eval.every_epochs": 0})
  train_and_evaluate(config, str(tmp_path), models=fakes.TinyModels(),
                     data=fakes.SyntheticData(num_classes=6))
  events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  warm = [e for e in events if e.get("event") == "init_from"]
  assert len(warm) == 1 and warm[0]["reinitialised"] == ["classifier/bias", "classifier/kernel"]
  trained = flatten(load_params(str(tmp_path)))
  assert trained["classifier/kernel"].shape == (16, 6)


@pytest.mark.parametrize("arg", [None, "single", "levels=4321", "tiny"])
def test_transfer_config_builds_the_source_runs_network(arg):
  """configs/flowers_from_imagenette.py: imagenette.py's network for the same variant (init_from
  refuses any other), its own data set and schedule, and a valid config."""
  from spp_jax import configs, models
  from spp_jax.train import validate_config

  flowers = configs.load("flowers_from_imagenette.py", arg)
  source = configs.load("imagenette.py", arg)
  assert flowers.model.to_dict() == source.model.to_dict()
  assert flowers.init_from
  validate_config(flowers, device_count=1, process_count=1, models=models)
  if arg != "tiny":
    assert flowers.data.name == "oxford_flowers102"
    assert flowers.optimizer.learning_rate < source.optimizer.learning_rate


def test_transfer_into_a_detection_style_model(source_run):
  """`transfer` on an nnx model's parameters: the backbone by name, its own classifier kept
  (detection's classes + 1 outputs)."""
  from flax import nnx

  model = fakes.TinyModels.create("tiny", num_classes=5, rngs=nnx.Rngs(params=3, dropout=4),
                                  spp_levels=(2, 1), fc_width=16)
  before = {k: np.asarray(v) for k, v in flatten(nnx.state(model, nnx.Param)).items()}
  params, report = transfer(nnx.state(model, nnx.Param), source_run)
  nnx.update(model, params)
  after = {k: np.asarray(v) for k, v in flatten(nnx.state(model, nnx.Param)).items()}
  source = flatten(load_params(source_run))
  assert report.reinitialised == ["classifier/bias", "classifier/kernel"]
  np.testing.assert_array_equal(after["fc/kernel"], source["fc/kernel"])
  np.testing.assert_array_equal(after["classifier/kernel"], before["classifier/kernel"])
  same_shape = fakes.TinyModels.create("tiny", num_classes=4, rngs=nnx.Rngs(params=3, dropout=4))
  own = flatten(nnx.state(same_shape, nnx.Param))
  params, report = transfer(nnx.state(same_shape, nnx.Param), source_run, fresh=("classifier",))
  assert report.reinitialised == ["classifier/bias", "classifier/kernel"]
  np.testing.assert_array_equal(flatten(params)["classifier/kernel"], own["classifier/kernel"])
