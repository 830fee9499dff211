"""The train state as a plain pytree, and its creation on the mesh.

An nnx model is split once into a static graph definition and three states: parameters
(trained), RNG state (dropout keys, constant during training: each step folds the step number
into them) and everything else (e.g. batch statistics). Only arrays cross `jax.jit`, which
keeps the step a pure function that shards with ordinary NamedShardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from spp_jax.train.interfaces import ModelRegistry
from spp_jax.train.model import build_model

# Split order used everywhere: params, rng state, the rest.
STATE_FILTERS = (nnx.Param, nnx.RngState, ...)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """step: () int32; params / rngs / other: nnx.State; opt_state: optax state over params."""
  step: jax.Array
  params: Any
  rngs: Any
  other: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelDefs:
  """Graph definitions of the same network in train mode (dropout on) and eval mode."""
  train: Any
  eval: Any


def model_defs(models: ModelRegistry, model_cfg, num_classes: int) -> ModelDefs:
  """Graph definitions from a shape-only instance (nothing is computed or compiled)."""
  model = nnx.eval_shape(lambda: build_model(models, model_cfg, num_classes=num_classes, seed=0))
  model.train()
  train_def = nnx.split(model, *STATE_FILTERS)[0]
  model.eval()
  eval_def = nnx.split(model, *STATE_FILTERS)[0]
  return ModelDefs(train=train_def, eval=eval_def)


def _init_fn(models: ModelRegistry, model_cfg, num_classes: int, seed: int,
             tx: optax.GradientTransformation):
  def init_state() -> TrainState:
    model = build_model(models, model_cfg, num_classes=num_classes, seed=seed)
    model.train()
    _, params, rngs, other = nnx.split(model, *STATE_FILTERS)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rngs=rngs, other=other,
                      opt_state=tx.init(params))
  return init_state


def create_train_state(models: ModelRegistry, model_cfg, num_classes: int, seed: int,
                       tx: optax.GradientTransformation, sharding: NamedSharding) -> TrainState:
  """Initialises parameters and optimiser state in one jitted call, replicated by `sharding`."""
  return jax.jit(_init_fn(models, model_cfg, num_classes, seed, tx), out_shardings=sharding)()


def abstract_train_state(models: ModelRegistry, model_cfg, num_classes: int, seed: int,
                         tx: optax.GradientTransformation, sharding: NamedSharding) -> TrainState:
  """Shapes, dtypes and shardings of the train state without computing it."""
  shapes = jax.eval_shape(_init_fn(models, model_cfg, num_classes, seed, tx))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def merge(defs_graph, state: TrainState):
  """The nnx model of `state` (for notebooks: `merge(defs.eval, state)(images)`)."""
  return nnx.merge(defs_graph, state.params, state.rngs, state.other)
