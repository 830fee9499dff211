"""The data config (config.data and one config.eval.views entry) read once and checked early:
defaults and allowed values from the one config schema (spp_jax/train/config_schema.py).

Every value is validated here with a ValueError naming the key, so a bad config fails before any
worker starts. The frozen dataclasses are what the (pickled) batch makers carry to grain workers.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence

import numpy as np

from spp_jax.train import config_schema

VIEW_KINDS = config_schema.VIEW_KINDS
MODES = config_schema.MODES


def _get(cfg, key, default=None):
  """cfg[key] for ConfigDicts, dicts and plain objects; default when absent or None."""
  if cfg is None:
    return default
  if hasattr(cfg, "get"):
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value


def _int(name: str, value, *, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
  return int(value)


def _choice(name: str, value, choices) -> str:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")
  return value


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def _workers(value) -> int:
  """data.num_workers: an int >= 0, or "auto" = one worker per available core but one (the
  training process keeps a core for its loop and the transfers to the device), at least 1."""
  if value == "auto":
    return max(1, available_cores() - 1)
  return _int("data.num_workers", value, minimum=0)


def _triple(name: str, value) -> tuple[float, float, float]:
  try:
    out = tuple(float(v) for v in value)
  except TypeError:
    out = ()
  if len(out) != 3:
    raise ValueError(f"{name} must be 3 numbers (r, g, b), got {name}={value!r}")
  return out


def _buckets(name: str, value) -> tuple[tuple[int, int], ...]:
  try:
    pairs = [tuple(b) for b in value]
  except TypeError:
    pairs = []
  if not pairs or any(len(p) != 2 for p in pairs):
    raise ValueError(f"{name} must be a non-empty list of (h, w) pairs, got {name}={value!r}")
  return tuple((_int(name, h), _int(name, w)) for h, w in pairs)


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """config.data, checked. Sizes are pixels; mean and std are at pixel scale 0..255."""
  name: str
  data_dir: str | None
  source_dir: str | None
  train_split: str
  eval_split: str
  num_workers: int
  shuffle_seed: int | None
  resize_short: int | None
  crop_size: int
  flip: bool
  color_jitter: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  full_short_side: int
  buckets: tuple[tuple[int, int], ...]
  bad_image: str
  small_image: str
  min_size: int
  decoder: str
  prefetch: int  # batches buffered ahead (per worker, or in the main process; 0: read in the caller's thread)
  mode: str  # training inputs: "crop" or "full_image" (the trainer copies config.train.mode)
  batch_dtype: str = "float32"  # "uint8": pixels only; on_device.py finishes them in the steps

  @property
  def mean_array(self) -> np.ndarray:
    return np.asarray(self.mean, np.float32)

  @property
  def std_array(self) -> np.ndarray:
    return np.asarray(self.std, np.float32)


def data_settings(data_cfg) -> DataSettings:
  """Reads and checks config.data (a ConfigDict, a dict, or a DataSettings).

  Defaults and each key's allowed values come from the config schema; min_size and mode are
  what the trainer adds (the network's minimum input, config.train.mode).
  """
  if isinstance(data_cfg, DataSettings):
    return data_cfg
  v = config_schema.group_values("data", data_cfg)
  min_size = _int("data.min_size", _get(data_cfg, "min_size", 1))
  s = DataSettings(
      name=v["name"], data_dir=v["data_dir"], source_dir=v["source_dir"],
      train_split=v["train_split"], eval_split=v["eval_split"],
      num_workers=_workers(v["num_workers"]), shuffle_seed=v["shuffle_seed"],
      resize_short=v["resize_short"], crop_size=v["crop_size"], flip=v["flip"],
      color_jitter=float(v["color_jitter"]), mean=_triple("data.mean", v["mean"]),
      std=_triple("data.std", v["std"]), full_short_side=v["full_image"]["short_side"],
      buckets=_buckets("data.full_image.buckets", v["full_image"]["buckets"]),
      bad_image=v["bad_image"], small_image=v["small_image"], min_size=min_size,
      decoder=v["decoder"], prefetch=v["prefetch"],
      mode=_choice("data.mode", _get(data_cfg, "mode", "crop"), MODES),
      batch_dtype=v["batch_dtype"])
  if s.resize_short is not None and s.resize_short < s.crop_size:
    raise config_schema.ConfigError(
        f"config.data.resize_short={s.resize_short}: smaller than "
        f"data.crop_size={s.crop_size}: the crops would not fit")
  for b in s.buckets:
    if min(b) < s.full_short_side:
      raise config_schema.ConfigError(
          f"config.data.full_image.buckets entry {b}: smaller than "
          f"data.full_image.short_side={s.full_short_side}: no image would fill it")
  check_min_size("data.crop_size", s.crop_size, min_size)
  check_min_size("data.full_image.short_side", s.full_short_side, min_size)
  return s


def check_min_size(name: str, size: int, min_size: int):
  """Config sizes below the network's minimum would fail inside XLA: refuse them early."""
  if size < min_size:
    raise ValueError(f"{name}={size} is below the network's minimum input size "
                     f"data.min_size={min_size}")


# Views whose batches hold the whole image once per scale (the "multiscale" layout).
PER_SCALE_KINDS = ("multiscale", "feature_multiview")


@dataclasses.dataclass(frozen=True)
class ViewSettings:
  """One evaluation view, checked, with defaults filled from config.data.

  feature_multiview (spp_jax/train/feature_views.py) sends its images in the multiscale
  layout, one unflipped image per entry of `scales`: the window scales, then the full-image
  views' short side when that is not one of them. Its flips are made on the device.
  """
  name: str
  kind: str
  size: int  # crop side (center, ten_view); window side (feature_multiview)
  short_side: int | None  # center/ten_view: resize before cropping; full: the short side
  scales: tuple[int, ...]  # multiscale, feature_multiview: the short sides of the images sent
  flip: bool  # multiscale: also the flipped image at every scale
  window_scales: tuple[int, ...] = ()  # feature_multiview: the scales windows are taken at
  windows: int = 0  # feature_multiview: windows per window scale
  full_views: int = 0  # feature_multiview: 0, 1 (the whole map) or 2 (and its flip)

  @property
  def num_views(self) -> int:
    """Images per example in the float32 layout (feature_multiview: images, not windows)."""
    if self.kind == "ten_view":
      return 10
    if self.kind in PER_SCALE_KINDS:
      return len(self.scales) * (2 if self.flip else 1)
    return 1

  @property
  def bucketed(self) -> bool:
    return self.kind in ("full",) + PER_SCALE_KINDS

  @property
  def per_scale(self) -> bool:
    return self.kind in PER_SCALE_KINDS


def view_settings(view, data: DataSettings) -> ViewSettings:
  """Reads one config.eval.views entry: name, kind, and its sizes."""
  if isinstance(view, ViewSettings):
    return view
  kind = _choice("view.kind", _get(view, "kind"), VIEW_KINDS)
  name = str(_get(view, "name", kind))
  size = _int(f"view {name!r} size", _get(view, "size", data.crop_size))
  if kind == "full":
    short_side = _int(f"view {name!r} short_side", _get(view, "short_side", data.full_short_side))
  else:
    ss = _get(view, "short_side", data.resize_short)
    short_side = None if ss is None else _int(f"view {name!r} short_side", ss)
  scales: tuple[int, ...] = ()
  if kind == "multiscale":
    raw = _get(view, "scales")
    if not isinstance(raw, Sequence) or not raw:
      raise ValueError(f"view {name!r}: a multiscale view needs scales (short sides), got "
                       f"scales={raw!r}")
    scales = tuple(_int(f"view {name!r} scales", s) for s in raw)
  if kind == "feature_multiview":
    v = _feature_view(view, name, size, data)
  else:
    v = ViewSettings(name=name, kind=kind, size=size, short_side=short_side, scales=scales,
                     flip=bool(_get(view, "flip", False)))
  if kind in ("center", "ten_view"):
    check_min_size(f"view {name!r} size", size, data.min_size)
    if short_side is not None and short_side < size:
      raise ValueError(f"view {name!r}: short_side={short_side} is smaller than size={size}")
  if kind == "full":
    check_min_size(f"view {name!r} short_side", short_side, data.min_size)
  for s in v.scales:
    check_min_size(f"view {name!r} scale", s, data.min_size)
  return v


def _feature_view(view, name: str, size: int, data: DataSettings) -> ViewSettings:
  """A feature_multiview entry (docs/paper.md §4; spp_jax/train/feature_views.py)."""
  if _get(view, "flip", False):
    raise ValueError(f"view {name!r}: feature_multiview takes its flips from windows (2, 10, "
                     f"18) and full_views (2), not from flip")
  raw = _get(view, "scales")
  if raw is None:  # The paper's scales for 224-pixel windows, scaled to this window size.
    raw = tuple(max(1, round(s * size / config_schema.PAPER_WINDOW_SIZE))
                for s in config_schema.PAPER_FEATURE_SCALES)
  if not isinstance(raw, Sequence) or not raw:
    raise ValueError(f"view {name!r}: scales must be short sides, got scales={raw!r}")
  window_scales = tuple(_int(f"view {name!r} scales", s) for s in raw)
  if len(set(window_scales)) != len(window_scales):
    raise ValueError(f"view {name!r}: scales must differ, got scales={window_scales}")
  for s in window_scales:
    if s < size:
      raise ValueError(f"view {name!r}: scale {s} is smaller than the window size {size}: "
                       f"its windows would not fit")
  windows = _choice(f"view {name!r} windows", _get(view, "windows", 18),
                    config_schema.WINDOWS_PER_SCALE)
  full_views = _choice(f"view {name!r} full_views", _get(view, "full_views", 2), (0, 1, 2))
  short_side = _int(f"view {name!r} short_side", _get(view, "short_side", data.full_short_side))
  scales = window_scales
  if full_views and short_side not in scales:
    scales = scales + (short_side,)
  return ViewSettings(name=name, kind="feature_multiview", size=size, short_side=short_side,
                      scales=scales, flip=False, window_scales=window_scales, windows=windows,
                      full_views=full_views)
