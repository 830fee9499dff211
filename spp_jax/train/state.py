"""The train state as a plain pytree, and its creation on the mesh.

An nnx model is split once into a static graph definition and three states: parameters
(trained), RNG state (dropout keys, constant during training: each step folds the step number
into them) and everything else (e.g. batch statistics). Only arrays cross `jax.jit`, which
keeps the step a pure function that shards with ordinary NamedShardings.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from spp_jax.train.compiled import CompileRecord
from spp_jax.train.validation import model_options

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


def _build(models_lib, model_cfg, num_classes: int, seed: int):
  return models_lib.create(model_cfg.name, num_classes=num_classes,
                           rngs=nnx.Rngs(params=seed, dropout=seed + 1),
                           **model_options(model_cfg))


def model_defs(models_lib, model_cfg, num_classes: int) -> ModelDefs:
  """Graph definitions from a shape-only instance (nothing is computed or compiled)."""
  model = nnx.eval_shape(lambda: _build(models_lib, model_cfg, num_classes, 0))
  model.train()
  train_def = nnx.split(model, *STATE_FILTERS)[0]
  model.eval()
  eval_def = nnx.split(model, *STATE_FILTERS)[0]
  return ModelDefs(train=train_def, eval=eval_def)


def _init_fn(models_lib, model_cfg, num_classes: int, seed: int, tx: optax.GradientTransformation):
  def init() -> TrainState:
    model = _build(models_lib, model_cfg, num_classes, seed)
    model.train()
    _, params, rngs, other = nnx.split(model, *STATE_FILTERS)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rngs=rngs, other=other,
                      opt_state=tx.init(params))
  return init


def create_train_state(models_lib, model_cfg, num_classes: int, seed: int,
                       tx: optax.GradientTransformation, sharding: NamedSharding, *,
                       programs=None, on_compile=None) -> TrainState:
  """Initialises parameters and optimiser state in one jitted call, replicated by `sharding`.

  programs: optional ProgramCache; its context must determine `tx` (the other arguments are
  part of the key). on_compile: called with the CompileRecord of the init program ("loaded":
  the initial state was read from the cache).
  """
  init = _init_fn(models_lib, model_cfg, num_classes, seed, tx)
  # Eager nnx init compiles op by op (seconds); one jit is one compilation.
  jitted = jax.jit(init, out_shardings=sharding)
  start = time.perf_counter()
  if programs is None:
    state, source = jitted(), "traced"
  else:
    static = dict(model=model_cfg.to_dict(), num_classes=num_classes, seed=seed,
                  sharding=repr(sharding), devices=[int(i) for i in sharding.mesh.device_ids.flat])

    def compute():
      compiled, source = programs.compile("init_state", (), jitted.lower, static=static)
      return compiled(), source
    # The networks' initialisers call back into Python (host draws), which no executable file
    # holds: the initial state itself is what a warm run reads.
    state, source = programs.value("init_state", compute, sharding, static=static)
  if on_compile is not None:
    on_compile(CompileRecord("init_state", "", time.perf_counter() - start, source))
  return state


def abstract_train_state(models_lib, model_cfg, num_classes: int, seed: int,
                         tx: optax.GradientTransformation, sharding: NamedSharding) -> TrainState:
  """Shapes, dtypes and shardings of the train state without computing it."""
  shapes = jax.eval_shape(_init_fn(models_lib, model_cfg, num_classes, seed, tx))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def merge(defs_graph, state: TrainState):
  """The nnx model of `state` (for notebooks: `merge(defs.eval, state)(images)`)."""
  return nnx.merge(defs_graph, state.params, state.rngs, state.other)
