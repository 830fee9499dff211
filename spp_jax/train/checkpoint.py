"""Checkpoints in workdir/checkpoints with orbax's CheckpointManager.

One checkpoint holds three items:
  state  the TrainState (parameters, optimiser state, step, dropout keys) as a nested dict of
         arrays: the tree is flattened by path so any pytree (nnx.State, optax tuples) saves the
         same way, and typed PRNG keys are stored as their raw uint32 data;
  meta   JSON: step, epoch, batches done in that epoch, the epoch's input size;
  data   this process's input iterator state, one JSON file per process (every process reads
         its own slice of the data set, so each has its own position).
Saving is synchronous: the next step donates the state's buffers. orbax is imported on the
first save or restore (0.15 s), not on the way to a fresh run's first step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np

from spp_jax.train.state import TrainState

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- pytree <-> dict


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _is_prng_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _paths(tree) -> list[tuple[tuple[str, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(_key_name(e) for e in path), leaf) for path, leaf in flat]


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
  out: dict = {}
  for path, leaf in items:
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    if path[-1] in node:
      raise ValueError(f"two leaves of the train state share the path {'/'.join(path)}")
    node[path[-1]] = leaf
  return out


def _lookup(nested: dict, path: tuple[str, ...]):
  for k in path:
    nested = nested[k]
  return nested


def to_nested(tree) -> dict:
  """Any pytree -> nested dict of arrays keyed by path; PRNG keys become their uint32 data."""
  return _nest([(p, jax.random.key_data(x) if _is_prng_key(x) else x) for p, x in _paths(tree)])


def _abstract_nested(abstract_tree) -> dict:
  def leaf(x):
    if _is_prng_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return x
  return _nest([(p, leaf(x)) for p, x in _paths(abstract_tree)])


def from_nested(nested: dict, abstract_tree):
  """Inverse of to_nested, shaped like abstract_tree (ShapeDtypeStructs or arrays)."""
  flat, treedef = jax.tree.flatten(abstract_tree)
  leaves = []
  for (path, ref), _ in zip(_paths(abstract_tree), flat):
    value = _lookup(nested, path)
    if _is_prng_key(ref):
      value = jax.random.wrap_key_data(value, impl=_key_impl(ref))
    leaves.append(value)
  return jax.tree.unflatten(treedef, leaves)


def _key_impl(ref):
  impl = getattr(ref.dtype, "_impl", None)
  return getattr(impl, "name", None) or None


# ----------------------------------------------------------------------------- manager


@dataclasses.dataclass
class Restored:
  state: TrainState
  meta: dict
  data: Any


def _ocp():
  """orbax.checkpoint, with the per-process JSON item registered."""
  import orbax.checkpoint as ocp

  from spp_jax.train import process_json  # noqa: F401  # registers ProcessJson{Save,Restore}
  return ocp


class Checkpointer:
  """Saves and restores (TrainState, meta, iterator state) in `directory`, keeping `keep`."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._created = None

  @property
  def _manager(self):
    if self._created is None:
      ocp = _ocp()
      options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                             enable_async_checkpointing=False)
      self._created = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta", "data"))
    return self._created

  def latest_step(self) -> int | None:
    if not os.path.isdir(self.directory) or not os.listdir(self.directory):
      return None  # A fresh run: no need for orbax yet.
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: TrainState, meta: dict, data_state: Any) -> int:
    step = int(meta["step"])
    if step in self._manager.all_steps():
      return step  # Already saved at this step (e.g. the end of an epoch that was a save step).
    ocp = _ocp()
    from spp_jax.train.process_json import ProcessJsonSave
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(to_nested(state)),
        meta=ocp.args.JsonSave(meta),
        data=ProcessJsonSave(data_state)), force=True)
    self._manager.wait_until_finished()
    log.info("saved checkpoint at step %d in %s", step, self.directory)
    return step

  def restore(self, step: int, abstract_state: TrainState) -> Restored:
    ocp = _ocp()
    from spp_jax.train.process_json import ProcessJsonRestore
    got = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_nested(abstract_state)),
        meta=ocp.args.JsonRestore(),
        data=ProcessJsonRestore()))
    return Restored(state=from_nested(got.state, abstract_state), meta=dict(got.meta),
                    data=got.data)

  def close(self):
    if self._created is not None:
      self._created.wait_until_finished()
      self._created.close()


def load_params(workdir: str, step: int | None = None) -> dict:
  """The saved parameters as a nested dict of numpy arrays, e.g. params["fc6"]["kernel"].

  Needs no model or mesh.

  For comparing runs and for notebooks; `step` None means the latest checkpoint.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  ocp = _ocp()
  from spp_jax.train.process_json import ProcessJsonHandler
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
              "data": ProcessJsonHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers,
                             options=ocp.CheckpointManagerOptions(
                                 read_only=True, create=False, save_interval_steps=0)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {directory}")
    meta = manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    got = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  return _strip_value(jax.tree.map(np.asarray, got.state["params"]))


def _strip_value(tree):
  """{"kernel": {"value": x}} (an nnx Variable's path) -> {"kernel": x}."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return tree["value"]
    return {k: _strip_value(v) for k, v in tree.items()}
  return tree


def load_model(config, workdir: str, *, step: int | None = None, models=None,
               num_classes: int | None = None):
  """The network of config as saved in workdir's checkpoint, in eval mode (for notebooks).

  Args:
    config: the run's config (workdir/config.json holds it too).
    step: a saved step; None means the latest.
    models: the model registry (default spp_jax.models).
    num_classes: default from the data module (spp_jax.data.num_classes(config.data)).
  Returns:
    An nnx.Module: model(images, image_sizes=None) -> logits.
  """
  from spp_jax.train import parallel, schedules, state as state_lib
  from spp_jax.train.model import default_registry

  models = default_registry() if models is None else models
  if num_classes is None:
    from spp_jax import data
    num_classes = data.num_classes(config.data)
  # Any callable schedule gives the optimiser state the structure that was saved.
  tx = schedules.make_optimizer(config.optimizer, lambda count: 0.0)
  rep = parallel.replicated(parallel.make_mesh())
  abstract = state_lib.abstract_train_state(models, config.model, num_classes,
                                            int(config.seed), tx, rep)
  checkpointer = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), keep=1_000)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {checkpointer.directory}")
    state = checkpointer.restore(step, abstract).state
  finally:
    checkpointer.close()
  defs = state_lib.model_defs(models, config.model, num_classes)
  return state_lib.merge(defs.eval, state)
