"""Registry of network architectures and the factory that builds a model from a name and options.

  model = create("zf5", num_classes=1000, rngs=nnx.Rngs(params=0, dropout=1), width_multiplier=0.25)
  spec("zf5").min_input_size   # size facts without building parameters
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from spp_jax.models.arch import Architecture
from spp_jax.models.net import HEADS, SPPNet
from spp_jax.ops.spp import normalize_levels, spp_output_dim

_REGISTRY: dict[str, Callable[[], Architecture]] = {}

# Options every network takes; a network's Architecture.defaults may override some.
DEFAULT_OPTIONS: dict[str, Any] = {
    "spp_levels": (6, 3, 2, 1),
    "head": "spp",
    "width_multiplier": 1.0,
    "fc_width": 4096,
    "dropout_rate": 0.5,
    "base_size": None,  # None: the architecture's own (224 for the paper's nets)
    "dtype": jnp.float32,
    "param_dtype": jnp.float32,
}


def register(name: str):
  """Decorator: registers a zero-argument function returning the full-width Architecture."""

  def wrap(fn: Callable[[], Architecture]):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn

  return wrap


def names() -> tuple[str, ...]:
  """Registered model names, in registration order."""
  return tuple(_REGISTRY)


def architecture(name: str, width_multiplier: float = 1.0) -> Architecture:
  """The (width-scaled) Architecture registered under `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model name={name!r}; known: {', '.join(names())}")
  return _REGISTRY[name]().scaled(width_multiplier)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything about a configured network that needs no parameters."""
  arch: Architecture
  options: tuple[tuple[str, Any], ...]

  def option(self, key: str):
    return dict(self.options)[key]

  @property
  def name(self) -> str:
    return self.arch.name

  @property
  def base_size(self) -> int:
    return self.option("base_size")

  @property
  def head(self) -> str:
    return self.option("head")

  @property
  def min_input_size(self) -> int:
    """Smallest accepted input side (the base size for the fixed head)."""
    return self.base_size if self.head == "fixed" else self.arch.min_input_size

  @property
  def feature_stride(self) -> int:
    return self.arch.feature_stride

  @property
  def out_channels(self) -> int:
    return self.arch.out_channels

  def feature_size(self, size) -> tuple[int, int]:
    return self.arch.feature_size(size)

  @property
  def pooled_dim(self) -> int:
    if self.head == "spp":
      return spp_output_dim(self.option("spp_levels"), self.out_channels)
    return self.out_channels * self.arch.fixed_map_size(self.base_size) ** 2


def spec(name: str, **options) -> ModelSpec:
  """Validated options and size facts of a network, without building it."""
  arch = architecture(name)  # name check first
  merged = {**DEFAULT_OPTIONS, **dict(arch.defaults)}
  unknown = sorted(set(options) - set(merged))
  if unknown:
    raise ValueError(f"unknown model option(s) {unknown} for {name!r}; known: {sorted(merged)}")
  merged.update(options)
  opts = _validate(merged)
  arch = arch.scaled(opts["width_multiplier"])
  if opts["base_size"] is None:
    opts["base_size"] = arch.base_size
  arch.feature_size(opts["base_size"])  # ValueError naming the minimum if too small
  if opts["head"] == "fixed":
    arch.fixed_map_size(opts["base_size"])
  return ModelSpec(arch, tuple(sorted(opts.items())))


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **options) -> SPPNet:
  """Builds the network `name` (see names()) with fresh parameters.

  Args:
    name: registry name, e.g. "zf5".
    num_classes: classifier outputs.
    rngs: nnx.Rngs with a `params` (or default) stream; dropout draws from its `dropout` stream.
    **options: spp_levels, head ("spp" | "fixed"), width_multiplier, fc_width, dropout_rate,
      base_size, dtype (compute; a dtype or its name, e.g. "bfloat16"), param_dtype.

  Returns:
    An SPPNet in training mode (call .eval() to turn dropout off).
  """
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got num_classes={num_classes!r}")
  s = spec(name, **options)
  opts = dict(s.options)
  opts.pop("width_multiplier")
  # Weights come from flax initialisers (jax.random): call create inside one jit, as the
  # trainer does, so XLA:CPU compiles every draw as one program (cold, 2 cores: 1.5 s for
  # "small", 2.6-3.5 s for "zf5"); eagerly each draw is its own program (2.2 s and 3.5 s).
  return SPPNet(s.arch, num_classes=num_classes, rngs=rngs, **opts)


def _validate(opts: dict) -> dict:
  out = dict(opts)
  out["spp_levels"] = normalize_levels(opts["spp_levels"])
  if opts["head"] not in HEADS:
    raise ValueError(f"head must be one of {HEADS}, got head={opts['head']!r}")
  wm = opts["width_multiplier"]
  if isinstance(wm, bool) or not isinstance(wm, (int, float)) or not wm > 0:
    raise ValueError(f"width_multiplier must be a number > 0, got width_multiplier={wm!r}")
  out["width_multiplier"] = float(wm)
  for key in ("fc_width",):
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{key} must be a positive int, got {key}={v!r}")
  bs = opts["base_size"]
  if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
    raise ValueError(f"base_size must be a positive int or None, got base_size={bs!r}")
  rate = opts["dropout_rate"]
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise ValueError(f"dropout_rate must be in [0, 1), got dropout_rate={rate!r}")
  out["dropout_rate"] = float(rate)
  for key in ("dtype", "param_dtype"):
    out[key] = _float_dtype(key, opts[key])
  return out


def _float_dtype(key: str, value):
  try:
    dt = jnp.dtype(value)
  except TypeError:
    raise ValueError(f"{key} must be a float dtype or its name, got {key}={value!r}") from None
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{key} must be a float dtype, got {key}={value!r}")
  return dt
