"""The data config (config.data and one config.eval.views entry) read once and checked early.

Every value is validated here with a ValueError naming the key, so a bad config fails before any
worker starts. The frozen dataclasses are what the (pickled) batch makers carry to grain workers.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence

import numpy as np

BAD_IMAGE = ("skip", "error")
SMALL_IMAGE = ("resize", "reject")
DECODERS = ("pillow", "opencv", "tfds")  # opencv: also resamples (the detection extra)
VIEW_KINDS = ("center", "full", "ten_view", "multiscale")
MODES = ("crop", "full_image")
BATCH_DTYPES = ("float32", "uint8")  # uint8: the steps normalise on the device (on_device.py)


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
  """Reads and checks config.data (a ConfigDict, a dict, or a DataSettings)."""
  if isinstance(data_cfg, DataSettings):
    return data_cfg
  name = _get(data_cfg, "name")
  if not isinstance(name, str) or not name:
    raise ValueError(f"data.name must be a TFDS builder name, got data.name={name!r}")
  resize_short = _get(data_cfg, "resize_short")
  full = _get(data_cfg, "full_image")
  min_size = _int("data.min_size", _get(data_cfg, "min_size", 1))
  crop_size = _int("data.crop_size", _get(data_cfg, "crop_size", 224))
  s = DataSettings(
      name=name,
      data_dir=_get(data_cfg, "data_dir"),
      source_dir=_get(data_cfg, "source_dir"),
      train_split=str(_get(data_cfg, "train_split", "train")),
      eval_split=str(_get(data_cfg, "eval_split", "test")),
      num_workers=_workers(_get(data_cfg, "num_workers", 0)),
      shuffle_seed=_get(data_cfg, "shuffle_seed"),
      resize_short=None if resize_short is None else _int("data.resize_short", resize_short),
      crop_size=crop_size,
      flip=bool(_get(data_cfg, "flip", True)),
      color_jitter=float(_get(data_cfg, "color_jitter", 0.0)),
      mean=_triple("data.mean", _get(data_cfg, "mean", (0.0, 0.0, 0.0))),
      std=_triple("data.std", _get(data_cfg, "std", (1.0, 1.0, 1.0))),
      full_short_side=_int("data.full_image.short_side", _get(full, "short_side", 256)),
      buckets=_buckets("data.full_image.buckets",
                       _get(full, "buckets", ((256, 256), (256, 352), (352, 256)))),
      bad_image=_choice("data.bad_image", _get(data_cfg, "bad_image", "skip"), BAD_IMAGE),
      small_image=_choice("data.small_image", _get(data_cfg, "small_image", "resize"),
                          SMALL_IMAGE),
      min_size=min_size,
      decoder=_choice("data.decoder", _get(data_cfg, "decoder", "pillow"), DECODERS),
      prefetch=_int("data.prefetch", _get(data_cfg, "prefetch", 2), minimum=0),
      mode=_choice("data.mode", _get(data_cfg, "mode", "crop"), MODES),
      batch_dtype=_choice("data.batch_dtype", _get(data_cfg, "batch_dtype", "float32"),
                          BATCH_DTYPES),
  )
  if not 0 <= s.color_jitter <= 1:
    raise ValueError(f"data.color_jitter must be in [0, 1], got {s.color_jitter}")
  if any(v <= 0 for v in s.std):
    raise ValueError(f"data.std must be positive, got data.std={s.std}")
  if s.resize_short is not None and s.resize_short < s.crop_size:
    raise ValueError(f"data.resize_short={s.resize_short} is smaller than "
                     f"data.crop_size={s.crop_size}: the crops would not fit")
  if s.shuffle_seed is not None:
    _int("data.shuffle_seed", s.shuffle_seed, minimum=0)
  for b in s.buckets:
    if min(b) < s.full_short_side:
      raise ValueError(f"data.full_image.buckets entry {b} is smaller than "
                       f"data.full_image.short_side={s.full_short_side}: no image would fill it")
  check_min_size("data.crop_size", crop_size, min_size)
  check_min_size("data.full_image.short_side", s.full_short_side, min_size)
  return s


def check_min_size(name: str, size: int, min_size: int):
  """Config sizes below the network's minimum would fail inside XLA: refuse them early."""
  if size < min_size:
    raise ValueError(f"{name}={size} is below the network's minimum input size "
                     f"data.min_size={min_size}")


@dataclasses.dataclass(frozen=True)
class ViewSettings:
  """One evaluation view, checked, with defaults filled from config.data."""
  name: str
  kind: str
  size: int  # crop side (center, ten_view)
  short_side: int | None  # center/ten_view: resize before cropping; full: the short side
  scales: tuple[int, ...]  # multiscale: short sides
  flip: bool  # multiscale: also the flipped image at every scale

  @property
  def num_views(self) -> int:
    if self.kind == "ten_view":
      return 10
    if self.kind == "multiscale":
      return len(self.scales) * (2 if self.flip else 1)
    return 1

  @property
  def bucketed(self) -> bool:
    return self.kind in ("full", "multiscale")


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
  v = ViewSettings(name=name, kind=kind, size=size, short_side=short_side, scales=scales,
                   flip=bool(_get(view, "flip", False)))
  if kind in ("center", "ten_view"):
    check_min_size(f"view {name!r} size", size, data.min_size)
    if short_side is not None and short_side < size:
      raise ValueError(f"view {name!r}: short_side={short_side} is smaller than size={size}")
  if kind == "full":
    check_min_size(f"view {name!r} short_side", short_side, data.min_size)
  for s in scales:
    check_min_size(f"view {name!r} scale", s, data.min_size)
  return v
