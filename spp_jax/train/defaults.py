"""The training config schema with its defaults, and the variants every config accepts.

Configs in `configs/*.py` start from `default_config()`, set what their experiment needs, and
finish with `apply_variants(config, arg)` so `--config configs/x.py:multi,levels=4321` works the
same way everywhere. Configs are data: nothing here reads a file or touches a device.

Variants (comma separated in the `file.py:arg` argument):
  single        one training size, the base crop size (the paper's single-size training)
  multi         two sizes, one epoch each in turn (the paper's multi-size training)
  uniform       each epoch's size drawn from train.size_range
  nospp         the no-SPP baseline: head="fixed", single size, only base-size eval views
  levels=4321   SPP pyramid levels, one digit per level, or separated: levels=6-3-2-1
  full_image    full-image training with padded buckets (data.full_image)
  tiny          (alias runlocal) a seconds-long smoke run of the same plumbing
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

VIEW_KINDS = ("center", "full", "ten_view", "multiscale")
SCHEDULES = ("single", "alternate", "uniform")
MODES = ("crop", "full_image")
LR_SCHEDULES = ("step", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


def view(name: str, kind: str, **fields) -> ml_collections.ConfigDict:
  """One evaluation view: name (the results key), kind (VIEW_KINDS) and its sizes."""
  return ml_collections.ConfigDict(dict(name=name, kind=kind, **fields))


def default_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with the paper's ImageNet protocol as defaults (SPEC §3)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Persistent XLA compilation cache, and the program cache in its spp_jax_programs/ (a warm run
  # loads its executables untraced); None -> $SPP_JAX_CACHE_DIR or ~/.cache/spp_jax/jax, "" -> off.
  c.compilation_cache_dir = None
  # A workdir whose config.json differs in a key that changes the run is refused unless True.
  c.allow_config_change = False

  c.distributed = ml_collections.ConfigDict()
  # "auto": jax.distributed.initialize() when a coordinator or a cluster environment is found.
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = placeholder(str)
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)

  c.model = ml_collections.ConfigDict()
  c.model.name = "zf5"
  c.model.spp_levels = (6, 3, 2, 1)
  c.model.head = "spp"
  c.model.width_multiplier = 1.0
  c.model.fc_width = 4096
  c.model.dropout_rate = 0.5
  c.model.base_size = placeholder(int)  # None: the network's own (224 for the paper's nets)
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"
  c.data.data_dir = placeholder(str)
  c.data.source_dir = placeholder(str)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_workers = 0
  c.data.shuffle_seed = placeholder(int)  # None -> seed
  c.data.resize_short = 256
  c.data.crop_size = 224
  c.data.flip = True
  c.data.color_jitter = 0.0
  c.data.mean = (123.68, 116.78, 103.94)
  c.data.std = (58.39, 57.12, 57.38)
  c.data.full_image = ml_collections.ConfigDict()
  c.data.full_image.short_side = 256
  c.data.full_image.buckets = ((256, 256), (256, 320), (320, 256), (256, 384), (384, 256))
  c.data.bad_image = "skip"
  c.data.small_image = "resize"
  c.data.min_size = placeholder(int)  # set by the trainer

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global, over all devices and processes
  c.train.num_epochs = 70
  c.train.mode = "crop"
  c.train.sizes = (224,)
  c.train.schedule = "single"
  c.train.size_range = (180, 224)
  c.train.size_step = 1  # "uniform" draws multiples of this: fewer shapes, fewer compilations
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.keep_checkpoints = 3
  # Stop (as if preempted, after saving a checkpoint) once this global step is reached.
  c.train.stop_at_step = placeholder(int)
  c.train.progress_bar = True  # tqdm when stdout is a terminal; plain log lines otherwise

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.decay_biases = False  # weight decay on kernels only (Caffe's decay_mult 0 on biases)
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = (30, 60)
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128  # global
  c.eval.every_epochs = 10  # 0: only at the end
  c.eval.views = [
      view("center", "center", size=224),
      view("full", "full", short_side=256),
      view("ten_view", "ten_view", size=224),
  ]
  return c


def parse_arg(arg: str | None) -> dict[str, object]:
  """"multi,levels=4321" -> {"multi": True, "levels": "4321"}; unknown variants raise."""
  known = ("single", "multi", "uniform", "nospp", "levels", "full_image", "tiny", "runlocal")
  out: dict[str, object] = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in known:
      raise ValueError(f"unknown config variant {key!r} in arg={arg!r}; known: {', '.join(known)}")
    out["tiny" if key == "runlocal" else key] = value.strip() if value else True
  if "single" in out and ("multi" in out or "uniform" in out):
    raise ValueError(f"'single' cannot be combined with 'multi'/'uniform' in arg={arg!r}")
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
    raise ValueError(f"levels must be digits like 4321 or 6-3-2-1, got levels={text!r}")
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
      raise ValueError("levels needs a value, e.g. levels=4321")
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
                         if v.kind in ("center", "ten_view") and v.get("size", base) == base]
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
  c.eval.views = [v for v in [
      view("center", "center", size=64),
      view("full", "full", short_side=72),
      view("ten_view", "ten_view", size=64),
  ] if c.model.head == "spp" or v.kind != "full"]
  return c
