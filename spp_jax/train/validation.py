"""Config checks that relate several keys, the device layout or the network's size limits.

Runs once, before anything is compiled, read or written: each key's own rule comes from the
schema (config_schema.check_keys), then the checks here. Every failure is a ConfigError naming
the key and its value.
"""

from __future__ import annotations

import ml_collections

from spp_jax.train.config_schema import ConfigError, check_keys
from spp_jax.train.interfaces import ModelRegistry, ModelSpec
from spp_jax.train.model import model_spec


def _fail(key: str, value, why: str):
  raise ConfigError(f"config.{key}={value!r}: {why}")


def _check_size(key: str, size, spec: ModelSpec):
  if size < spec.min_input_size:
    _fail(key, size, f"below the network's minimum input size {spec.min_input_size}")


def validate_config(config: ml_collections.ConfigDict, *, device_count: int, process_count: int,
                    models: ModelRegistry) -> ModelSpec:
  """Checks config against the schema, itself, the device layout and the network's size limits.

  Args:
    config: the full training config (schema: spp_jax.train.config_schema).
    device_count: global number of devices the batch is split over.
    process_count: number of processes (hosts).
    models: the model registry (`spp_jax.models` or a fake with the same interface).
  Returns:
    The configured network's ModelSpec (size facts, no parameters).
  Raises:
    ConfigError naming the offending key and value.
  """
  check_keys(config)
  names = tuple(models.names())
  if config.model.name not in names:
    _fail("model.name", config.model.name, f"unknown model; known: {', '.join(names)}")
  for key in ("train.batch_size", "eval.batch_size"):
    group, name = key.split(".")
    batch = config[group][name]
    if batch % device_count:
      _fail(key, batch, f"a global batch must divide over the {device_count} devices "
            f"({process_count} process(es)); use a multiple of {device_count}")
  spec = model_spec(models, config.model)
  train_sizes = _check_train_sizes(config, spec)
  if config.train.mode == "full_image":
    _check_full_image(config, train_sizes, spec)
  _check_views(config, spec)
  return spec


def _check_train_sizes(config, spec: ModelSpec) -> list[int]:
  train = config.train
  sizes = tuple(train.sizes)
  if train.schedule == "single" and len(sizes) != 1:
    _fail("train.sizes", sizes, "schedule='single' takes exactly one size")
  train_sizes = list(sizes)
  if train.schedule == "uniform":
    lo, hi = train.size_range
    if lo > hi:
      _fail("train.size_range", train.size_range, "must be (low, high) with low <= high")
    train_sizes += [lo, hi]
  if config.model.head == "fixed" and (train.mode != "crop" or train.schedule == "uniform"
                                       or any(s != spec.base_size for s in sizes)):
    _fail("train.sizes", sizes, f"model.head='fixed' (no SPP) only accepts the base size "
          f"{spec.base_size}: use one size {spec.base_size}, schedule 'single', mode 'crop'")
  for s in train_sizes:
    _check_size("train.sizes" if s in sizes else "train.size_range", s, spec)
  data = config.data
  if data.resize_short is not None and data.resize_short < data.crop_size:
    _fail("data.resize_short", data.resize_short,
          f"smaller than data.crop_size={data.crop_size}: the crops would not fit")
  _check_size("data.crop_size", data.crop_size, spec)
  return train_sizes


def _check_full_image(config, train_sizes: list[int], spec: ModelSpec):
  """The epoch's size scales the images' short side: short_side * size / crop_size."""
  fi = config.data.full_image
  _check_size("data.full_image.short_side", fi.short_side, spec)
  for s in train_sizes:
    short = max(1, round(fi.short_side * s / config.data.crop_size))
    if short < spec.min_input_size:
      _fail("train.sizes", tuple(config.train.sizes), f"in full-image mode size {s} gives a "
            f"short side of {short} (data.full_image.short_side * size / data.crop_size), "
            f"below the network's minimum input size {spec.min_input_size}")
  for hw in fi.buckets:
    if min(hw) < fi.short_side:
      _fail("data.full_image.buckets", tuple(map(tuple, fi.buckets)),
            f"bucket {tuple(hw)} is smaller than data.full_image.short_side={fi.short_side}: "
            f"no image would fill it")


def _check_views(config, spec: ModelSpec):
  seen = set()
  for i, v in enumerate(config.eval.views):
    key = f"eval.views[{i}]"
    if v.name in seen:
      _fail(key + ".name", v.name, "view names must be unique")
    seen.add(v.name)
    for field in ("size", "short_side"):
      if v[field] is not None:
        _check_size(f"{key}.{field}", v[field], spec)
    if v.kind == "multiscale" and not v.scales:
      _fail(key + ".scales", v.scales, "a multiscale view needs scales (short sides)")
    for s in v.scales or ():
      _check_size(f"{key}.scales", s, spec)
    if v.kind == "feature_multiview":
      _check_feature_view(key, v, config)
    if config.model.head == "fixed" and (
        v.kind not in ("center", "ten_view") or (v.size or config.data.crop_size) != spec.base_size):
      _fail(key, v.to_dict(), f"model.head='fixed' (no SPP) only evaluates crops of the base "
            f"size {spec.base_size}")


def _check_feature_view(key: str, v, config):
  """Multi-view testing on feature maps (train/feature_views.py): windows must fit each scale."""
  if v.get("flip"):
    _fail(key + ".flip", v.flip, "feature_multiview takes its flips from windows (2, 10, 18) "
          "and full_views (2)")
  size = v.size or config.data.crop_size
  scales = tuple(v.scales or ())
  if len(set(scales)) != len(scales):
    _fail(key + ".scales", scales, "the scales must differ")
  for s in scales:
    if s < size:
      _fail(key + ".scales", scales, f"scale {s} is smaller than the window size {size} "
            f"(view size, or data.crop_size): its windows would not fit")
