"""The variants every config accepts in its `file.py:arg` argument (comma separated).

  single        one training size, the base crop size (the paper's single-size training)
  multi         two sizes, one epoch each in turn (the paper's multi-size training)
  uniform       each epoch's size drawn from train.size_range
  nospp         the no-SPP baseline: head="fixed", single size, only base-size eval views
  levels=4321   SPP pyramid levels, one digit per level, or separated: levels=6-3-2-1
  full_image    full-image training with padded buckets (data.full_image)
  feature_views also score multi-view testing on feature maps (docs/paper.md §4), the view's
                defaults: the paper's 96 + 2 views; SPP head only
  tiny          (alias runlocal) a seconds-long smoke run of the same plumbing

A config file ends with `apply_variants(config, arg)`, so `--config configs/x.py:multi,levels=4321`
works the same way everywhere.
"""

from __future__ import annotations

import ml_collections

from spp_jax.train.config_schema import ConfigError, view


def parse_arg(arg: str | None) -> dict[str, object]:
  """"multi,levels=4321" -> {"multi": True, "levels": "4321"}; unknown variants raise."""
  known = ("single", "multi", "uniform", "nospp", "levels", "full_image", "feature_views",
           "tiny", "runlocal")
  out: dict[str, object] = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in known:
      raise ConfigError(f"unknown config variant {key!r} in arg={arg!r}; known: {', '.join(known)}")
    out["tiny" if key == "runlocal" else key] = value.strip() if value else True
  if "single" in out and ("multi" in out or "uniform" in out):
    raise ConfigError(f"'single' cannot be combined with 'multi'/'uniform' in arg={arg!r}")
  return out


def parse_levels(text: str) -> tuple[int, ...]:
  """"4321" -> (4, 3, 2, 1); "6-3-2-1" or "6:3:2:1" or "12.6.1" for levels above 9."""
  for sep in "-:.":
    if sep in text:
      parts = text.split(sep)
      break
  else:
    parts = list(text)
  if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ConfigError(f"levels must be digits like 4321 or 6-3-2-1, got levels={text!r}")
  return tuple(int(p) for p in parts)


_TRAINING_VARIANTS = ("single", "multi", "uniform", "nospp")


def apply_variants(config: ml_collections.ConfigDict, arg: str | None, *,
                   small_size: int | None = None,
                   default: str | None = None) -> ml_collections.ConfigDict:
  """Applies the variants named in `arg` (see module docstring) to `config` in place.

  small_size: the second multi-size training size (the paper: 180 for a base of 224).
  default: a training variant ("multi", ...) applied when `arg` names none of
    single/multi/uniform/nospp.
  """
  variants = parse_arg(arg)
  if default is not None and not variants.keys() & set(_TRAINING_VARIANTS):
    variants = {**parse_arg(default), **variants}
  base = config.data.crop_size
  small = small_size if small_size is not None else max(1, round(base * 180 / 224))
  if variants.get("single"):
    config.train.sizes = (base,)
    config.train.schedule = "single"
  if variants.get("multi"):
    config.train.sizes = (base, small)
    config.train.schedule = "alternate"
  if variants.get("uniform"):
    config.train.sizes = (base, small)
    config.train.size_range = (small, base)
    config.train.schedule = "uniform"
  if "levels" in variants:
    if variants["levels"] is True:
      raise ConfigError("levels needs a value, e.g. levels=4321")
    config.model.spp_levels = parse_levels(str(variants["levels"]))
  if variants.get("full_image"):
    config.train.mode = "full_image"
  if variants.get("nospp"):
    config.model.head = "fixed"
    config.model.base_size = base  # The fixed pooling is built for the base crop.
    config.train.mode = "crop"
    config.train.sizes = (base,)
    config.train.schedule = "single"
    # The fixed head only accepts the base size: keep the crop views at that size.
    config.eval.views = [v for v in config.eval.views
                         if v.kind in ("center", "ten_view") and (v.size or base) == base]
  if variants.get("feature_views"):
    if config.model.head != "spp":
      raise ConfigError(f"feature_views pools windows of the conv map with SPP; the "
                        f"{config.model.head!r} head cannot (arg={arg!r})")
    if not any(v.kind == "feature_multiview" for v in config.eval.views):
      config.eval.views = [*config.eval.views, view("feature_multiview", "feature_multiview")]
  return config


def is_tiny(arg: str | None) -> bool:
  return bool(parse_arg(arg).get("tiny"))


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The "tiny" variant of the ImageNet-scale configs: a narrow copy of the same network
  (1/8 width, fc 64, base size 64) on the embedded data set's "tiny" configuration, float32,
  one epoch per training size, to check the whole pipeline on a CPU in a few minutes."""
  multi = len(c.train.sizes) > 1
  c.model.width_multiplier = 0.125
  c.model.fc_width = 64
  c.model.base_size = 64
  c.model.dtype = "float32"
  c.data.name = "multiscale_fashion_mnist/tiny"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_workers = 0
  c.data.resize_short = 72
  c.data.crop_size = 64
  c.data.color_jitter = 0.0
  c.data.full_image.short_side = 72
  c.data.full_image.buckets = ((72, 72), (72, 112), (112, 72))
  c.train.batch_size = 16
  c.train.num_epochs = 2 if multi else 1
  c.train.sizes = (64, 52) if multi else (64,)
  c.train.size_range = (52, 64)
  c.train.log_every_steps = 8
  c.train.checkpoint_every_steps = 50
  c.optimizer.warmup_epochs = 0
  c.optimizer.decay_epochs = (1,)
  c.eval.batch_size = 16
  c.eval.every_epochs = 0
  feature_views = [v for v in c.eval.views if v.kind == "feature_multiview"]  # kept
  c.eval.views = [v for v in [view("center", "center"), view("full", "full"),
                              view("ten_view", "ten_view")]
                   if c.model.head == "spp" or v.kind != "full"] + feature_views
  return c
