"""The one path from config.model to a network, used by training, evaluation, loading and
detection.

config.model keys left at None are not passed on, so the registry applies the architecture's
own default (models/arch.py): the small net gets levels (4, 2, 1) and fc width 256, the paper's
nets (6, 3, 2, 1) and 4096. The compute dtype is the exception: None means bfloat16 on GPUs and
TPUs and float32 on CPUs (parameters stay float32 unless model.param_dtype says otherwise).
"""

from __future__ import annotations

from typing import Any

from spp_jax.train.config_schema import SCHEMA, ConfigError
from spp_jax.train.interfaces import ModelRegistry, ModelSpec

# Every model key but the name is an option of registry.create().
OPTIONS = tuple(k for k in SCHEMA["model"] if k != "name")


def default_registry() -> ModelRegistry:
  from spp_jax import models
  return models


def compute_dtype(platform: str) -> str:
  """The default compute dtype on `platform` ("cpu", "gpu", "cuda", "rocm", "tpu")."""
  return "float32" if platform == "cpu" else "bfloat16"


def model_options(model_cfg, platform: str | None = None) -> dict[str, Any]:
  """config.model -> keyword options for registry.create (None: the architecture's own).

  platform: where the model will run, for the default compute dtype; None: JAX's default
  backend.
  """
  out = {}
  for key in OPTIONS:
    value = model_cfg.get(key)
    if value is None and key == "dtype":
      if platform is None:
        import jax
        platform = jax.default_backend()
      value = compute_dtype(platform)
    if value is None:
      continue
    if key == "spp_levels":
      value = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
    out[key] = value
  return out


def model_spec(registry: ModelRegistry, model_cfg) -> ModelSpec:
  """Size facts of config.model's network (no parameters), or a ConfigError naming it."""
  try:
    return registry.spec(model_cfg.name, **model_options(model_cfg))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model={model_cfg.to_dict()!r} cannot be built: {e}") from e


def build_model(registry: ModelRegistry, model_cfg, *, num_classes: int, seed: int):
  """config.model's network with parameters drawn from `seed` (dropout from seed + 1), in
  train mode. Call it inside `jax.jit` or `nnx.eval_shape`: eager initialisation compiles op
  by op."""
  from flax import nnx

  return registry.create(model_cfg.name, num_classes=num_classes,
                         rngs=nnx.Rngs(params=seed, dropout=seed + 1),
                         **model_options(model_cfg))
