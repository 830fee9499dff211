"""Training loop, in process, with the small stand-ins of spp_jax.train.testing (fast)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import fakes
from spp_jax.train import (NonFiniteLossError, load_model, load_params, schedules,
                           train_and_evaluate, validate_config)
from spp_jax.train.config_schema import ConfigError, default_config, view
from spp_jax.train.variants import apply_variants, parse_levels
from spp_jax.train.steps import make_eval_step
from spp_jax.train.workdir import config_differences


def _run(workdir, data=None, **overrides):
  return train_and_evaluate(fakes.tiny_config(**overrides), str(workdir),
                            models=fakes.TinyModels(),
                            data=data or fakes.SyntheticData())


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted tiny run (2 epochs, sizes 16 then 12), shared by several tests."""
  workdir = tmp_path_factory.mktemp("full")
  results = _run(workdir)
  return workdir, results


def test_end_to_end_outputs(full_run):
  workdir, results = full_run
  views = ("center", "full", "ten_view")
  assert set(results) == {f"{v}/{k}" for v in views for k in ("top1", "top5")}
  with open(workdir / "results.json", encoding="utf-8") as f:
    saved = json.load(f)
  left_out = saved.pop("images_left_out")
  assert saved == results
  # Images left out per split and view (the synthetic data leaves none out).
  assert left_out == {"train": {"split": "train", "skipped": 0, "rejected": 0},
                      "eval": {v: {"split": "validation", "skipped": 0, "rejected": 0}
                               for v in views}}
  # The synthetic task is easy: well above chance (0.25) after 16 steps; top-5 of 4 classes is 1.
  assert results["center/top1"] >= 0.5
  assert results["center/top5"] == 1.0
  records = _records(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [4, 8, 12, 16]
  for r in train:
    for key in ("loss", "top1", "lr", "images_per_s", "step_time_s", "epoch", "size"):
      assert key in r
  assert [r["size"] for r in train] == [16, 16, 12, 12]  # alternate: one epoch per size
  evals = [r for r in records if "eval/center/top1" in r]
  assert [r["step"] for r in evals] == [8, 16]  # every epoch; the last one is the final
  assert os.listdir(workdir / "tensorboard")
  with open(workdir / "config.json", encoding="utf-8") as f:
    assert json.load(f)["train"]["sizes"] == [16, 12]


def test_one_compilation_per_input_shape(full_run):
  workdir, _ = full_run
  records = _records(workdir)
  compiles = [r for r in records if r.get("event") == "compile"]
  train = sorted(r["shapes"] for r in compiles if r["fn"] == "train_step")
  assert len(train) == 2 and "image=(8,12,12,3)" in train[0] and "image=(8,16,16,3)" in train[1]
  # Eval: centre and 10-view crops (unmasked step, 2 shapes) and the full view (masked step);
  # the eval after epoch 1 and the final one share them.
  assert len([r for r in compiles if r["fn"].startswith("eval_step")]) == 3
  done = [r for r in records if r.get("event") == "done"][0]
  assert done["train_compilations"] == 2 and done["eval_compilations"] == 3


def test_load_model_from_workdir(full_run):
  workdir, results = full_run
  config = fakes.tiny_config()
  model = load_model(config, str(workdir), models=fakes.TinyModels(), num_classes=4)
  np.testing.assert_array_equal(model.fc.kernel[...], load_params(workdir)["fc"]["kernel"])
  # Eval mode: no dropout, so the centre-view accuracy is the run's final one.
  data = fakes.SyntheticData()
  correct = count = 0
  for batch in data.eval_iterator(config.data, config.eval.views[0], batch_size=8):
    logits = np.asarray(model(jnp.asarray(batch["image"][:, 0])))
    correct += float(np.sum((logits.argmax(-1) == batch["label"]) * batch["mask"]))
    count += float(batch["mask"].sum())
  assert correct / count == pytest.approx(results["center/top1"])


def test_resume_gives_identical_parameters(full_run, tmp_path):
  workdir, results = full_run
  # Stop at step 7 (mid-epoch, after the step-5 checkpoint): saves a checkpoint at 7 with the
  # data iterator's position.
  assert _run(tmp_path, **{"train.stop_at_step": 7}) == {}
  assert load_params(tmp_path)["fc"]["kernel"].shape == (8 * 5, 16)
  resumed = _run(tmp_path)
  assert resumed == results
  a, b = load_params(workdir), load_params(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  events = [r.get("event") for r in _records(tmp_path)]
  assert "stopped" in events and "resume" in events


def test_resume_from_end_of_epoch(full_run, tmp_path):
  workdir, _ = full_run
  # Step 8 is the last batch of epoch 0: the checkpoint holds an exhausted iterator.
  assert _run(tmp_path, **{"train.stop_at_step": 8}) == {}
  _run(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, load_params(workdir), load_params(tmp_path))


def test_finished_workdir_is_not_retrained(full_run):
  workdir, results = full_run
  n_before = len(_records(workdir))
  assert _run(workdir) == results
  new = _records(workdir)[n_before:]
  assert not [r for r in new if "loss" in r]  # no training step ran again


def test_changed_config_refused_unless_allowed(tmp_path):
  _run(tmp_path, **{"train.stop_at_step": 2})
  with pytest.raises(ConfigError, match="optimizer.learning_rate"):
    _run(tmp_path, **{"optimizer.learning_rate": 0.5})
  # Logging/eval keys may change; allow_config_change lets the rest through.
  _run(tmp_path, **{"train.stop_at_step": 3, "train.log_every_steps": 1})
  _run(tmp_path, **{"train.stop_at_step": 4, "optimizer.learning_rate": 0.5,
                    "allow_config_change": True})


class _NaNData(fakes.SyntheticData):
  """NaN images from training batch 6 (global step 6 of epoch 0) on."""

  def train_iterator(self, *args, **kwargs):
    it = super().train_iterator(*args, **kwargs)
    make = it._make_batch  # noqa: SLF001

    def bad(b):
      batch = make(b)
      if b >= 5:
        batch["image"] = np.full_like(batch["image"], np.nan)
      return batch

    it._make_batch = bad  # noqa: SLF001
    return it


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(NonFiniteLossError, match="last good checkpoint is step 5"):
    _run(tmp_path, data=_NaNData(), **{"train.log_every_steps": 8})
  params = load_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert not os.path.exists(tmp_path / "results.json")


def test_full_image_training(tmp_path):
  results = _run(tmp_path, **{"train.mode": "full_image", "train.num_epochs": 1,
                              "eval.views": [view("full", "full", short_side=16)]})
  assert set(results) == {"full/top1", "full/top5"}
  shapes = {r["shapes"] for r in _records(tmp_path) if r.get("fn") == "train_step"}
  # Two padded buckets -> two compilations, each with the per-image sizes.
  assert len(shapes) == 2 and all("image_size=(8,2)" in s for s in shapes)


# ----------------------------------------------------------------------------- validation


def _compile_events():
  events = []

  def listener(name, *args, **kwargs):
    del args, kwargs
    if name.endswith(("backend_compile_duration", "jaxpr_to_mlir_module_duration")):
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  return events, listener


BAD_CONFIGS = {
    "unknown model": ({"model.name": "resnet"}, "model.name"),
    "empty levels": ({"model.spp_levels": ()}, "model.spp_levels"),
    "size below minimum": ({"train.sizes": (16, 3)}, "minimum input size 4"),
    "uniform range below minimum": ({"train.schedule": "uniform", "train.size_range": (2, 16)},
                                    "train.size_range"),
    "eval view below minimum": ({"eval.views": [view("c", "center", size=2)]},
                                "eval.views"),
    "fixed head at another size": ({"model.head": "fixed"}, "base size"),
    "single with two sizes": ({"train.schedule": "single"}, "exactly one size"),
    "bad schedule": ({"optimizer.schedule": "linear"}, "optimizer.schedule"),
    "bad momentum": ({"optimizer.momentum": 1.5}, "optimizer.momentum"),
    "duplicate views": ({"eval.views": [view("a", "center", size=16)] * 2}, "unique"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_rejected_before_any_compilation(name, tmp_path):
  overrides, match = BAD_CONFIGS[name]
  events, listener = _compile_events()
  try:
    with pytest.raises(ConfigError, match=match):
      _run(tmp_path / "w", **overrides)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert events == []
  assert not os.path.exists(tmp_path / "w")  # nothing written either


def test_batch_must_divide_over_devices():
  config = fakes.tiny_config(**{"train.batch_size": 12})
  with pytest.raises(ConfigError, match="train.batch_size=12.*8 devices"):
    validate_config(config, device_count=8, process_count=2, models=fakes.TinyModels())
  config = fakes.tiny_config(**{"eval.batch_size": 4})
  with pytest.raises(ConfigError, match="eval.batch_size=4"):
    validate_config(config, device_count=8, process_count=1, models=fakes.TinyModels())
  info = validate_config(fakes.tiny_config(**{"train.batch_size": 16, "eval.batch_size": 16}),
                         device_count=8, process_count=2, models=fakes.TinyModels())
  assert info.min_input_size == 4 and info.base_size == 16


def test_real_model_sizes_checked_without_building():
  from spp_jax import models

  config = default_config()
  config.train.sizes = (224, 32)  # ZF-5 needs 39
  config.train.schedule = "alternate"
  with pytest.raises(ConfigError, match=r"train.sizes=32.*minimum input size 39"):
    validate_config(config, device_count=1, process_count=1, models=models)


# ----------------------------------------------------------------------------- pieces


def test_epoch_size_schedules():
  cfg = ml_collections.ConfigDict(dict(schedule="alternate", sizes=(224, 180),
                                       size_range=(180, 224), size_step=1))
  assert [schedules.epoch_size(cfg, e, 0) for e in range(5)] == [224, 180, 224, 180, 224]
  cfg.schedule = "uniform"
  drawn = [schedules.epoch_size(cfg, e, 0) for e in range(200)]
  assert drawn == [schedules.epoch_size(cfg, e, 0) for e in range(200)]  # seeded
  assert min(drawn) >= 180 and max(drawn) <= 224 and len(set(drawn)) > 20
  assert drawn != [schedules.epoch_size(cfg, e, 1) for e in range(200)]
  cfg.size_step = 4
  drawn = {schedules.epoch_size(cfg, e, 0) for e in range(200)}
  assert drawn == set(range(180, 225, 4))  # steps of 4 down from the base size
  assert schedules.distinct_sizes(cfg, 3, 0) == list(dict.fromkeys(
      schedules.epoch_size(cfg, e, 0) for e in range(3)))


def test_learning_rate_schedules():
  opt = default_config().optimizer
  opt.learning_rate, opt.decay_epochs, opt.decay_factor, opt.warmup_epochs = 0.1, (2, 4), 0.1, 0
  lr = schedules.learning_rate_schedule(opt, steps_per_epoch=10, num_epochs=6)
  got = [float(lr(s)) for s in (0, 19, 20, 39, 40, 59)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  opt.warmup_epochs = 1
  lr = schedules.learning_rate_schedule(opt, steps_per_epoch=10, num_epochs=6)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 4, 9, 10, 19, 20, 40)],
                             [0.01, 0.05, 0.1, 0.1, 0.1, 0.01, 0.001], rtol=1e-5)
  opt.schedule, opt.warmup_epochs = "cosine", 0
  lr = schedules.learning_rate_schedule(opt, steps_per_epoch=10, num_epochs=6)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 30, 60)], [0.1, 0.05, 0.0], atol=1e-7)


def test_weight_decay_on_kernels_only():
  opt = default_config().optimizer
  opt.learning_rate, opt.momentum, opt.weight_decay = 1.0, 0.0, 0.5
  tx = schedules.make_optimizer(opt, lambda step: 1.0)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates["bias"], np.zeros(2))


class _LogitsFromPixel(nnx.Module):
  """Logits = the first pixel's channels: eval scores fully set by the input."""

  def __call__(self, images, image_sizes=None):
    del image_sizes
    return images[:, 0, 0, :]


def test_eval_step_averages_views_and_masks_padding():
  rng = np.random.default_rng(0)
  b, v, c = 6, 10, 7
  logits = rng.normal(size=(b, v, c)).astype(np.float32) * 3
  images = np.zeros((b, v, 2, 2, c), np.float32)
  images[:, :, 0, 0, :] = logits
  labels = rng.integers(0, c, size=b).astype(np.int32)
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  # Padding rows are "correct" at top-1: counting them would change the result.
  probs_pad = np.exp(logits[4:]) / np.exp(logits[4:]).sum(-1, keepdims=True)
  labels[4:] = probs_pad.mean(1).argmax(-1)

  graphdef, state = nnx.split(_LogitsFromPixel())
  step = make_eval_step(graphdef, use_image_sizes=False, view=view("c", "center"),
                        data=default_config().data)  # float32 views pass through

  class _State:
    params, rngs, other = state, nnx.State({}), nnx.State({})

  got = step(_State, dict(image=jnp.asarray(images), image_size=jnp.ones((b, v, 2), jnp.int32),
                          label=jnp.asarray(labels), mask=jnp.asarray(mask)))
  # Reference: plain loops over examples and views.
  top1 = top5 = count = 0.0
  for i in range(b):
    if not mask[i]:
      continue
    avg = np.zeros(c)
    for j in range(v):
      e = np.exp(logits[i, j] - logits[i, j].max())
      avg += e / e.sum() / v
    order = sorted(range(c), key=lambda k: -avg[k])
    top1 += order[0] == labels[i]
    top5 += labels[i] in order[:5]
    count += 1
  assert float(got["count"]) == count == 4
  assert float(got["top1"]) == top1
  assert float(got["top5"]) == top5


def test_config_variants():
  config = default_config()
  apply_variants(config, "multi,levels=4321")
  assert tuple(config.train.sizes) == (224, 180) and config.train.schedule == "alternate"
  assert tuple(config.model.spp_levels) == (4, 3, 2, 1)
  config = apply_variants(default_config(), "nospp")
  assert config.model.head == "fixed" and tuple(config.train.sizes) == (224,)
  assert {v.kind for v in config.eval.views} <= {"center", "ten_view"}
  assert parse_levels("6-3-2-1") == (6, 3, 2, 1)
  config = apply_variants(default_config(), "single,feature_views")
  assert [v.kind for v in config.eval.views][-1] == "feature_multiview"
  with pytest.raises(ValueError, match="feature_views"):
    apply_variants(default_config(), "nospp,feature_views")
  with pytest.raises(ValueError, match="unknown config variant"):
    apply_variants(default_config(), "multii")
  with pytest.raises(ValueError, match="levels"):
    apply_variants(default_config(), "levels=4a")


def test_config_differences_ignore_logging_keys():
  a = {"train": {"log_every_steps": 1, "batch_size": 8}, "eval": {"batch_size": 8}}
  b = {"train": {"log_every_steps": 5, "batch_size": 16}, "eval": {"batch_size": 4}}
  assert config_differences(a, b) == ["train.batch_size: 8 -> 16"]


def test_progress_bar_and_results_table(capsys):
  from spp_jax.train.metrics import Progress, results_table

  bar = Progress(total_steps=10, initial_step=2, bar=True)
  for step in range(3, 11):
    bar.update(step)
  bar.log(10, dict(loss=1.0, top1=0.5, size=64, epoch=0, lr=0.1, images_per_s=1.0,
                   step_time_s=1.0))
  bar.close()
  out = capsys.readouterr().out
  assert "10/10" in out
  table = results_table({"center/top1": 0.5, "center/top5": 0.875, "ten_view/top1": 0.625,
                         "ten_view/top5": 0.9})
  lines = table.splitlines()
  assert lines[0].split() == ["view", "top-1", "acc", "top-5", "acc"]
  assert lines[2].split() == ["center", "50.00%", "87.50%"]
  assert lines[3].split() == ["ten_view", "62.50%", "90.00%"]
