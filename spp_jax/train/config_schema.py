"""The one config schema: every key, its one default, and the values it allows.

`default_config()` is the paper's ImageNet protocol (docs/paper.md §3) with ZF-5; a config file
starts from it and overrides only what differs (configs/*.py). `check_keys(config)` checks every
value against its key's rule and refuses unknown keys, naming the nearest known one. Checks
that relate several keys or need the network's size facts are in `validation.py`.

A default of None means "decided elsewhere", and the key's description says by what: for the
model options, the architecture's own default (models/arch.py: the small net's levels are
(4, 2, 1) and its fc width 256); for a few data keys, another key.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

VIEW_KINDS = ("center", "full", "ten_view", "multiscale", "feature_multiview")
# The paper's multi-view testing on feature maps (docs/paper.md §4): window scales (short sides)
# for 224-pixel windows; a view of another window size scales them by size / 224.
PAPER_FEATURE_SCALES = (224, 256, 300, 360, 448, 560)
PAPER_WINDOW_SIZE = 224
# Windows per scale: 1 centre; 5 centre and corners; 9 those and the edge midpoints; twice
# each (2, 10, 18) with the flipped image's windows.
WINDOWS_PER_SCALE = (1, 2, 5, 9, 10, 18)
MODES = ("crop", "full_image")
SCHEDULES = ("single", "alternate", "uniform")
LR_SCHEDULES = ("step", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config that cannot run: raised before anything is compiled, read or written."""


# ----------------------------------------------------------------------------- value rules


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a key allows: `text` for people, `ok(value)` for the check; None allowed if optional."""
  text: str
  ok: Callable[[Any], bool]
  type: type
  optional: bool = False

  def allows(self, value) -> bool:
    return (self.optional and value is None) or (value is not None and self.ok(value))

  def describe(self) -> str:
    return self.text + (" or None" if self.optional else "")


def integer(minimum: int = 0, optional: bool = False) -> Rule:
  return Rule(f"an int >= {minimum}", lambda v: _is_int(v) and v >= minimum, int, optional)


def number(low: float, high: float, *, low_open=False, high_open=False,
           optional: bool = False) -> Rule:
  def ok(v):
    return (_is_number(v) and (v > low if low_open else v >= low)
            and (v < high if high_open else v <= high))
  text = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  return Rule(text, ok, float, optional)


def one_of(*choices, optional: bool = False) -> Rule:
  return Rule("one of " + ", ".join(map(repr, choices)), lambda v: v in choices,
              type(choices[0]), optional)


def boolean() -> Rule:
  return Rule("True or False", lambda v: isinstance(v, bool), bool)


def text(optional: bool = False) -> Rule:
  return Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v), str, optional)


def ints(length: int | None = None, minimum: int = 1, optional: bool = False,
         what: str = "ints") -> Rule:
  def ok(v):
    return (isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0
            and (length is None or len(v) == length)
            and all(_is_int(x) and x >= minimum for x in v))
  count = f"{length} " if length else "one or more "
  return Rule(f"{count}{what} >= {minimum}", ok, tuple, optional)


def numbers(length: int, low: float, *, low_open: bool = False) -> Rule:
  def ok(v):
    return (isinstance(v, Sequence) and len(v) == length
            and all(_is_number(x) and (x > low if low_open else x >= low) for x in v))
  return Rule(f"{length} numbers {'>' if low_open else '>='} {low}", ok, tuple)


def levels() -> Rule:
  def ok(v):
    return isinstance(v, Sequence) and len(v) > 0 and all(
        (_is_int(x) and x >= 1) or (isinstance(x, Sequence) and len(x) == 2
                                    and all(_is_int(y) and y >= 1 for y in x)) for x in v)
  return Rule("pyramid levels, each n (n x n bins) or (nh, nw), e.g. (6, 3, 2, 1)", ok, tuple,
              optional=True)


def pairs() -> Rule:
  def ok(v):
    return isinstance(v, Sequence) and len(v) > 0 and all(
        isinstance(p, Sequence) and len(p) == 2 and all(_is_int(x) and x >= 1 for x in p)
        for p in v)
  return Rule("one or more (h, w) pairs of ints >= 1", ok, tuple)


def views() -> Rule:
  return Rule("a list of views (schema VIEW)", lambda v: isinstance(v, Sequence) and len(v) > 0,
              list)


@dataclasses.dataclass(frozen=True)
class Key:
  default: Any
  rule: Rule
  doc: str


# ----------------------------------------------------------------------------- the schema

VIEW = {
    "name": Key(None, text(), "the results key, e.g. 'ten_view'"),
    "kind": Key(None, one_of(*VIEW_KINDS), "center crop, full image, 10-view, multiscale, or "
                "multi-view on feature maps (docs/paper.md §4)"),
    "size": Key(None, integer(1, optional=True),
                "crop side of center/ten_view, window side of feature_multiview; None: "
                "data.crop_size"),
    "short_side": Key(None, integer(1, optional=True),
                      "resize before cropping (center/ten_view; None: data.resize_short) or "
                      "the full image's short side (full, and feature_multiview's full-image "
                      "views; None: data.full_image.short_side)"),
    "scales": Key(None, ints(optional=True), "multiscale: the short sides; feature_multiview: "
                  "the short sides its windows are taken at (None: PAPER_FEATURE_SCALES x "
                  "size / 224, rounded)"),
    "flip": Key(False, boolean(), "multiscale: also the flipped image at every scale"),
    "windows": Key(None, one_of(*WINDOWS_PER_SCALE, optional=True),
                   "feature_multiview: windows per scale (WINDOWS_PER_SCALE); None: 18"),
    "full_views": Key(None, one_of(0, 1, 2, optional=True),
                      "feature_multiview: full-image views, the whole map and (2) its flip; "
                      "None: 2"),
}

SCHEMA: dict[str, Any] = {
    "seed": Key(0, integer(0), "parameters, dropout and (unless data.shuffle_seed) shuffling"),
    "init_from": Key(None, text(optional=True), "another run's workdir: a fresh run starts "
                     "from its parameters, matched by name (train/init_from.py)"),
    "init_from_step": Key(None, integer(0, optional=True),
                          "the step of init_from's checkpoint; None: its latest"),
    "compilation_cache_dir": Key(
        None, Rule("a directory", lambda v: isinstance(v, str), str, optional=True),
        "JAX's persistent compilation cache; None: $SPP_JAX_CACHE_DIR or "
        "~/.cache/spp_jax/jax; '': off"),
    "allow_config_change": Key(False, boolean(), "continue a workdir whose saved config differs "
                               "in a training key (main.py --force)"),
    "distributed": {
        "mode": Key("auto", one_of("auto", "single", "explicit"),
                    "'auto': a Cloud TPU VM, SLURM or Open MPI launch is recognised, else one "
                    "process; 'single'; 'explicit': the three keys below (train/cluster.py)"),
        "coordinator_address": Key(None, text(optional=True), "host:port of process 0"),
        "num_processes": Key(None, integer(1, optional=True), "number of processes"),
        "process_id": Key(None, integer(0, optional=True), "this process's index"),
    },
    "model": {
        "name": Key("zf5", text(), "a registered network: spp_jax.models.names()"),
        "head": Key("spp", one_of("spp", "fixed"), "SPP, or the no-SPP baseline's fixed pool"),
        "spp_levels": Key(None, levels(), "None: the architecture's own"),
        "width_multiplier": Key(None, number(0, 64, low_open=True, optional=True),
                                "channel width factor; None: 1"),
        "fc_width": Key(None, integer(1, optional=True), "fc6/fc7 width; None: the "
                        "architecture's own (4096 for the paper's nets)"),
        "dropout_rate": Key(None, number(0, 1, high_open=True, optional=True),
                            "dropout on fc6 and fc7; None: the architecture's own (0.5)"),
        "base_size": Key(None, integer(1, optional=True),
                         "the input the fixed head is built for; None: the architecture's own "
                         "(224 for the paper's nets)"),
        "dtype": Key(None, one_of(*DTYPES, optional=True),
                     "compute dtype; None: bfloat16 on GPU/TPU, float32 on CPU"),
        "param_dtype": Key(None, one_of(*DTYPES, optional=True),
                           "parameter dtype; None: float32"),
    },
    "data": {
        "name": Key("imagenet2012", text(), "a TFDS builder name[/config]"),
        "data_dir": Key(None, text(optional=True), "TFDS data_dir; None: TFDS's default"),
        "source_dir": Key(None, text(optional=True), "where manual downloads are (prepare)"),
        "train_split": Key("train", text(), "the training split"),
        "eval_split": Key("validation", text(), "the split the views evaluate"),
        "num_workers": Key(0, Rule("an int >= 0 or 'auto'", lambda v: v == "auto" or (
            _is_int(v) and v >= 0), int), "grain worker processes; 0: the main process; "
                           "'auto': one per available core but one"),
        "prefetch": Key(2, integer(0), "batches buffered ahead"),
        "decoder": Key("pillow", one_of("pillow", "opencv", "tfds"),
                       "image decoder; opencv (the detection extra) also resamples, faster "
                       "but not bitwise Pillow's"),
        "batch_dtype": Key("uint8", one_of("uint8", "float32"),
                           "host batches: uint8 pixels finished on the device "
                           "(data/on_device.py), or float32 made on the host"),
        "shuffle_seed": Key(None, integer(0, optional=True), "None: seed"),
        "resize_short": Key(256, integer(1, optional=True),
                            "short side before cropping; None: crop from the stored image"),
        "crop_size": Key(224, integer(1), "the base training and eval crop"),
        "flip": Key(True, boolean(), "random horizontal flips in training"),
        "color_jitter": Key(0.1, number(0, 1), "strength of the paper's colour alteration "
                            "(after Krizhevsky's PCA lighting); 0: off"),
        "mean": Key((123.68, 116.78, 103.94), numbers(3, float("-inf")),
                    "per-channel mean at pixel scale 0..255"),
        "std": Key((58.39, 57.12, 57.38), numbers(3, 0, low_open=True),
                   "per-channel std at pixel scale 0..255"),
        "full_image": {
            "short_side": Key(256, integer(1), "full-image training and view short side"),
            "buckets": Key(((256, 256), (256, 320), (320, 256), (256, 384), (384, 256)), pairs(),
                           "padded (h, w) shapes of full-image batches"),
        },
        "bad_image": Key("skip", one_of("skip", "error"), "an undecodable image"),
        "small_image": Key("resize", one_of("resize", "reject"),
                           "an image below the network's minimum input"),
    },
    "train": {
        "batch_size": Key(128, integer(1), "global, over all devices and processes"),
        "num_epochs": Key(70, integer(1), "epochs"),
        "mode": Key("crop", one_of(*MODES), "crops, or whole images in padded buckets"),
        "sizes": Key((224,), ints(what="sizes"), "training input sizes"),
        "schedule": Key("single", one_of(*SCHEDULES), "one size; one epoch per size in turn "
                        "(multi-size training); or each epoch's size drawn from size_range"),
        "size_range": Key((180, 224), ints(2, what="sizes"), "'uniform': (low, high)"),
        "size_step": Key(1, integer(1), "'uniform' draws multiples of this (fewer shapes)"),
        "log_every_steps": Key(50, integer(1), "steps between log lines"),
        "checkpoint_every_steps": Key(1000, integer(1), "steps between checkpoints"),
        "keep_checkpoints": Key(3, integer(1), "checkpoints kept"),
        "stop_at_step": Key(None, integer(1, optional=True),
                            "stop (as if preempted, after saving) at this global step"),
        "progress_bar": Key(True, boolean(), "tqdm when stdout is a terminal"),
    },
    "optimizer": {
        "learning_rate": Key(0.01, number(0, float("inf"), low_open=True), "base rate"),
        "momentum": Key(0.9, number(0, 1, high_open=True), "SGD momentum"),
        "nesterov": Key(False, boolean(), "Nesterov momentum"),
        "weight_decay": Key(5e-4, number(0, float("inf")), "L2 weight decay"),
        "decay_biases": Key(False, boolean(), "also decay biases (Caffe: decay_mult 0)"),
        "schedule": Key("step", one_of(*LR_SCHEDULES), "step decay or cosine"),
        "decay_epochs": Key((40, 60), Rule("one or more epochs > 0", lambda v: isinstance(
            v, Sequence) and all(_is_number(e) and e > 0 for e in v), tuple),
                            "'step': epochs at which the rate is multiplied by decay_factor"),
        "decay_factor": Key(0.1, number(0, 1, low_open=True), "'step': the factor"),
        "warmup_epochs": Key(0.0, number(0, float("inf")), "linear warm-up"),
    },
    "eval": {
        "batch_size": Key(128, integer(1), "global"),
        "every_epochs": Key(10, integer(0), "0: only at the end"),
        "views": Key(None, views(), "evaluation views; default: center, full, ten_view"),
    },
}


def view(name: str, kind: str, **fields) -> ml_collections.ConfigDict:
  """One evaluation view with every VIEW key: name, kind, and the fields given."""
  unknown = sorted(set(fields) - set(VIEW))
  if unknown:
    raise ConfigError(f"unknown view field(s) {unknown}; known: {sorted(VIEW)}")
  entry = {k: key.default for k, key in VIEW.items()}
  entry.update(name=name, kind=kind, **fields)
  return ml_collections.ConfigDict(entry)


def _build(schema: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for name, key in schema.items():
    if isinstance(key, dict):
      c[name] = _build(key)
    elif key.default is None:
      c[name] = placeholder(key.rule.type)
    else:
      c[name] = key.default
  return c


def default_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, at its default."""
  c = _build(SCHEMA)
  c.eval.views = [view("center", "center"), view("full", "full"), view("ten_view", "ten_view")]
  return c


def default(path: str):
  """The schema default of a dotted key, e.g. default("data.crop_size") == 224."""
  node: Any = SCHEMA
  for part in path.split("."):
    node = node[part]
  return node.default


_MISSING = object()


def _value(cfg, name: str):
  if cfg is None:
    return _MISSING
  return cfg.get(name, _MISSING) if hasattr(cfg, "get") else getattr(cfg, name, _MISSING)


def group_values(group: str, cfg) -> dict[str, Any]:
  """Every key of SCHEMA[group] (dotted, e.g. "data") read from cfg (a ConfigDict, dict or
  object), each value checked. A key cfg lacks gets the schema default, and so does None
  where the key's rule does not allow None.

  For modules that take one group of the config on its own (the data pipeline); keys that
  cfg holds beyond the schema are left to the caller.
  Raises:
    ConfigError naming the key, its value and what it allows.
  """
  schema: Any = SCHEMA
  for part in group.split("."):
    schema = schema[part]
  out = {}
  for name, key in schema.items():
    value = _value(cfg, name)
    if isinstance(key, dict):
      out[name] = group_values(f"{group}.{name}", None if value is _MISSING else value)
      continue
    if value is _MISSING or (value is None and not key.rule.optional):
      value = key.default
    if not key.rule.allows(value):
      raise ConfigError(f"config.{group}.{name}={value!r}: must be {key.rule.describe()}")
    out[name] = value
  return out


# ----------------------------------------------------------------------------- checks


def _unknown(path: str, name: str, known) -> ConfigError:
  close = difflib.get_close_matches(name, list(known), n=1)
  hint = f"; did you mean {path}{close[0]}?" if close else f"; known: {', '.join(sorted(known))}"
  return ConfigError(f"config.{path}{name}: unknown key{hint}")


def _check(node, schema: dict, path: str):
  for name in node.keys():
    if name not in schema:
      raise _unknown(path, name, schema)
  for name, key in schema.items():
    value = node.get(name)
    if isinstance(key, dict):
      if not hasattr(value, "keys"):
        raise ConfigError(f"config.{path}{name}={value!r}: must be a group of keys")
      _check(value, key, f"{path}{name}.")
    elif not key.rule.allows(value):
      raise ConfigError(f"config.{path}{name}={value!r}: must be {key.rule.describe()}")


def check_keys(config) -> None:
  """Every key known and every value allowed by its rule; views checked entry by entry.

  Raises:
    ConfigError naming the first bad key, with its value and what it allows.
  """
  _check(config, SCHEMA, "")
  for i, v in enumerate(config.eval.views):
    if not hasattr(v, "keys"):
      raise ConfigError(f"config.eval.views[{i}]={v!r}: must be a view (schema VIEW)")
    _check(v, VIEW, f"eval.views[{i}].")
