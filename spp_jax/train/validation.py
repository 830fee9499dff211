"""Config checks that run before anything is compiled or any data is read.

Every mistake a config can hold that would otherwise surface minutes later, deep inside XLA or
after the data set was prepared, is a `ValueError` here naming the key and its value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from spp_jax.ops.spp import normalize_levels
from spp_jax.train import defaults

# Options of models.create(), read from config.model when present.
MODEL_OPTIONS = ("spp_levels", "head", "width_multiplier", "fc_width", "dropout_rate", "base_size",
                 "dtype", "param_dtype")


class ConfigError(ValueError):
  """A config that cannot run: raised before anything is compiled or read."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """Size facts of the configured network, read from an abstract (parameter-free) instance."""
  min_input_size: int
  base_size: int


def model_options(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.model -> keyword options for models.create (dtype names become jnp dtypes)."""
  import jax.numpy as jnp

  out = {}
  for key in MODEL_OPTIONS:
    if key in model_cfg and model_cfg[key] is not None:
      value = model_cfg[key]
      if key in ("dtype", "param_dtype"):
        value = jnp.dtype(value)
      elif key == "spp_levels":
        value = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
      out[key] = value
  return out


def abstract_model(models_lib, model_cfg: ml_collections.ConfigDict, num_classes: int):
  """The configured network with shape-only parameters: traced, never compiled."""
  from flax import nnx

  options = model_options(model_cfg)
  return nnx.eval_shape(lambda: models_lib.create(
      model_cfg.name, num_classes=num_classes, rngs=nnx.Rngs(0, dropout=1), **options))


def model_info(models_lib, model_cfg: ml_collections.ConfigDict) -> ModelInfo:
  """Size facts from models_lib.spec (no parameters) or else from a shape-only instance."""
  try:
    if hasattr(models_lib, "spec"):
      model = models_lib.spec(model_cfg.name, **model_options(model_cfg))
    else:
      model = abstract_model(models_lib, model_cfg, num_classes=10)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model={model_cfg.to_dict()!r} cannot be built: {e}") from e
  return ModelInfo(min_input_size=int(model.min_input_size), base_size=int(model.base_size))


def _fail(key: str, value, why: str):
  raise ConfigError(f"config.{key}={value!r}: {why}")


def _positive_int(config, key: str):
  value = _get(config, key)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    _fail(key, value, "must be a positive integer")
  return value


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _one_of(config, key: str, allowed: Sequence[str]):
  value = _get(config, key)
  if value not in allowed:
    _fail(key, value, f"must be one of {', '.join(map(repr, allowed))}")
  return value


def validate_config(config: ml_collections.ConfigDict, *, device_count: int, process_count: int,
                    models_lib) -> ModelInfo:
  """Checks config against itself, the device layout and the network's size limits.

  Args:
    config: the full training config (see spp_jax.train.defaults).
    device_count: global number of devices the batch is split over.
    process_count: number of processes (hosts).
    models_lib: the model registry (`spp_jax.models` or a stand-in with names/create).
  Returns:
    ModelInfo of the configured network.
  Raises:
    ValueError naming the offending key and value.
  """
  names = tuple(models_lib.names())
  if config.model.name not in names:
    _fail("model.name", config.model.name, f"unknown model; known: {', '.join(names)}")
  head = _one_of(config, "model.head", ("spp", "fixed"))
  if head == "spp":
    try:
      normalize_levels(config.model.spp_levels)
    except ValueError as e:
      _fail("model.spp_levels", config.model.spp_levels, str(e))
  _one_of(config, "model.dtype", defaults.DTYPES)
  _one_of(config, "model.param_dtype", defaults.DTYPES)

  for key in ("train.batch_size", "eval.batch_size"):
    batch = _positive_int(config, key)
    if batch % device_count:
      _fail(key, batch, f"a global batch must divide over the {device_count} devices "
            f"({process_count} process(es)); use a multiple of {device_count}")
  _positive_int(config, "train.num_epochs")
  _positive_int(config, "train.log_every_steps")
  _positive_int(config, "train.checkpoint_every_steps")
  _positive_int(config, "train.keep_checkpoints")
  if config.train.stop_at_step is not None:
    _positive_int(config, "train.stop_at_step")
  mode = _one_of(config, "train.mode", defaults.MODES)
  schedule = _one_of(config, "train.schedule", defaults.SCHEDULES)
  _one_of(config, "optimizer.schedule", defaults.LR_SCHEDULES)
  _check_optimizer(config)

  info = model_info(models_lib, config.model)

  sizes = tuple(config.train.sizes)
  if not sizes:
    _fail("train.sizes", config.train.sizes, "must list at least one training size")
  if schedule == "single" and len(sizes) != 1:
    _fail("train.sizes", sizes, "schedule='single' takes exactly one size")
  train_sizes = list(sizes)
  if schedule == "uniform":
    lo, hi = _pair(config, "train.size_range")
    if lo > hi:
      _fail("train.size_range", config.train.size_range, "must be (low, high) with low <= high")
    _positive_int(config, "train.size_step")
    train_sizes += [lo, hi]
  for s in train_sizes:
    _check_size("train.sizes" if s in sizes else "train.size_range", s, info)
  if mode == "full_image":
    # The epoch's size scales the images' short side: short_side * size / crop_size.
    fi = config.data.full_image
    crop = config.data.crop_size
    _check_size("data.full_image.short_side", fi.short_side, info)
    for s in train_sizes:
      short = max(1, round(fi.short_side * s / crop))
      if short < info.min_input_size:
        _fail("train.sizes", sizes, f"in full-image mode size {s} gives a short side of "
              f"{short} (data.full_image.short_side * size / data.crop_size), below the "
              f"network's minimum input size {info.min_input_size}")
    if not fi.buckets:
      _fail("data.full_image.buckets", fi.buckets, "full-image training needs at least one bucket")
    for hw in fi.buckets:
      if len(hw) != 2:
        _fail("data.full_image.buckets", fi.buckets, "each bucket is an (h, w) pair")
      for s in hw:
        _check_size("data.full_image.buckets", s, info)
  if head == "fixed":
    if mode != "crop" or any(s != info.base_size for s in sizes) or schedule == "uniform":
      _fail("train.sizes", sizes, f"model.head='fixed' (no SPP) only accepts the base size "
            f"{info.base_size}: use one size {info.base_size}, schedule 'single', mode 'crop'")

  views = list(config.eval.views)
  if not views:
    _fail("eval.views", views, "list at least one evaluation view")
  seen = set()
  for i, v in enumerate(views):
    key = f"eval.views[{i}]"
    if "name" not in v or not v.name:
      _fail(key, v.to_dict(), "every view needs a name")
    if v.name in seen:
      _fail(key + ".name", v.name, "view names must be unique")
    seen.add(v.name)
    if v.get("kind") not in defaults.VIEW_KINDS:
      _fail(key + ".kind", v.get("kind"), f"must be one of {defaults.VIEW_KINDS}")
    for field in ("size", "short_side"):
      if v.get(field) is not None:
        _check_size(f"{key}.{field}", v[field], info)
    for s in v.get("scales", None) or ():
      _check_size(f"{key}.scales", s, info)
    if head == "fixed" and (v.kind not in ("center", "ten_view")
                            or v.get("size", info.base_size) != info.base_size):
      _fail(key, v.to_dict(), f"model.head='fixed' (no SPP) only evaluates crops of the base "
            f"size {info.base_size}")
  if config.eval.every_epochs is None or config.eval.every_epochs < 0:
    _fail("eval.every_epochs", config.eval.every_epochs, "must be >= 0 (0: only at the end)")
  return info


def _pair(config, key: str) -> tuple[int, int]:
  value = _get(config, key)
  if len(value) != 2 or not all(isinstance(v, int) for v in value):
    _fail(key, value, "must be a pair of ints")
  return int(value[0]), int(value[1])


def _check_size(key: str, size, info: ModelInfo):
  if not isinstance(size, int) or isinstance(size, bool):
    _fail(key, size, "sizes are integers (pixels)")
  if size < info.min_input_size:
    _fail(key, size, f"below the network's minimum input size {info.min_input_size}")


def _check_optimizer(config):
  opt = config.optimizer
  if not opt.learning_rate > 0:
    _fail("optimizer.learning_rate", opt.learning_rate, "must be > 0")
  if not 0 <= opt.momentum < 1:
    _fail("optimizer.momentum", opt.momentum, "must be in [0, 1)")
  if opt.weight_decay < 0:
    _fail("optimizer.weight_decay", opt.weight_decay, "must be >= 0")
  if not 0 < opt.decay_factor <= 1:
    _fail("optimizer.decay_factor", opt.decay_factor, "must be in (0, 1]")
  if opt.warmup_epochs < 0:
    _fail("optimizer.warmup_epochs", opt.warmup_epochs, "must be >= 0")
  if any(e <= 0 for e in opt.decay_epochs):
    _fail("optimizer.decay_epochs", opt.decay_epochs, "epochs must be > 0")
