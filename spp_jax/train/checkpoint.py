"""Checkpoints in workdir/checkpoints with orbax's CheckpointManager, verified on restore.

One checkpoint holds four items:
  state     the TrainState (parameters, optimiser state, step, dropout keys) as a nested dict
            of arrays: the tree is flattened by path so any pytree (nnx.State, optax tuples)
            saves the same way, and typed PRNG keys are stored as their raw uint32 data;
  meta      JSON: step, epoch, the epoch's input size;
  data      this process's input position, one JSON file per process (every process reads
            its own slice of the data set, so each has its own position), with its CRC-32;
  manifest  shapes, dtypes and CRC-32s of the state's arrays and of meta (train/integrity.py).
A state holding a NaN or an inf is never saved. A checkpoint that fails to read or to verify
is moved to checkpoints/corrupt/<step>-<time> (never deleted) and the next older one is
tried; when none is left that is an error, not a fresh start.

Saving is asynchronous (orbax's async checkpointing): `save` returns once the state's arrays
are copied to the host, so the next step may donate the device buffers, and the files, the
checksums included (train/manifest_item.py), are written by background threads while training
goes on. A checkpoint counts (steps, restore) only once orbax has finalised it; a save still
being written when the process dies is an unfinished directory, removed on the next start.
`wait` blocks until the last save is finished and raises its error. The directory is an
etils.epath.Path (spp_jax/paths.py): local or gs://. orbax is imported on the first save or
restore (0.15 s), not on the way to a fresh run's first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from spp_jax import paths
from spp_jax.errors import (DamagedCheckpointError, DiskFullError, NonFiniteLossError,
                            is_disk_full, one_line)
from spp_jax.train import integrity
from spp_jax.train.state import TrainState

log = logging.getLogger(__name__)

ITEMS = ("state", "meta", "data", "manifest")
CORRUPT_DIR = "corrupt"

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


def abstract_nested(abstract_tree) -> dict:
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
  step: int


def _ocp():
  """orbax.checkpoint, with the per-process JSON and the manifest items registered."""
  import orbax.checkpoint as ocp

  from spp_jax.train import manifest_item, process_json  # noqa: F401  # register their args
  return ocp


def _has_step_dirs(directory) -> bool:
  """Whether directory holds a step's directory (finished or not), without orbax."""
  try:
    return any(p.name.isdigit() for p in directory.iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return False


def _all_processes_agree(ok: bool) -> bool:
  """True when ok on every process (a damaged file may be read by one host only)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Saves and restores (TrainState, meta, iterator state) in `directory`, keeping `keep`."""

  def __init__(self, directory, keep: int):
    self.directory = paths.path(directory, "checkpoint directory")
    self.corrupt_dir = self.directory / CORRUPT_DIR
    self._keep = keep
    self._created = None
    self._writing: int | None = None  # the step of the save that may still be in flight

  @property
  def _manager(self):
    if self._created is None:
      ocp = _ocp()
      # Removing unfinished saves is safe: the workdir lock excludes a second writer.
      options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True)
      self._created = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=ITEMS)
    return self._created

  def steps(self) -> list[int]:
    """Every finished checkpoint's step, oldest first (not one still being written)."""
    if self._created is None and not _has_step_dirs(self.directory):
      return []  # No checkpoint: no need for orbax yet.
    steps = set(self._manager.all_steps())
    if self._writing is not None and self._manager.is_saving_in_progress():
      steps.discard(self._writing)
    return sorted(steps)

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def last_good(self) -> str:
    """For error messages: where the run can resume from (once the save in flight is done)."""
    try:
      self.wait()
    except Exception as e:  # noqa: BLE001 - that save does not count; the message says which does
      log.warning("the checkpoint being saved could not be finished: %s", one_line(str(e)))
    latest = self.latest_step()
    if latest is None:
      return f"No checkpoint was saved yet in {self.directory}"
    return f"The last good checkpoint is step {latest} in {self.directory}"

  def moved_aside(self) -> list[str]:
    try:
      return sorted(p.name for p in self.corrupt_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
      return []

  def manifest(self, step: int) -> dict | None:
    """The checkpoint's manifest, None when it cannot be read or trusted."""
    ocp = _ocp()
    from spp_jax.train.manifest_item import ManifestRestore
    try:
      got = self._manager.restore(step, args=ocp.args.Composite(manifest=ManifestRestore()))
    except Exception:  # noqa: BLE001 - damage of any kind; restore_latest says which
      return None
    return None if integrity.manifest_problem(got.manifest) else dict(got.manifest)

  def save(self, state: TrainState, meta: dict, data_state: Any) -> int:
    """Starts saving at meta["step"] unless a checkpoint of that step exists or is being
    written; returns once the state is copied to the host (its buffers may then be donated).

    Raises:
      NonFiniteLossError when a floating-point array of the state holds a NaN or an inf.
      DiskFullError when the device of the directory is full (earlier checkpoints are intact),
        for this save or the previous one, which is finished first.
    """
    step = int(meta["step"])
    if step == self._writing or step in self.steps():
      return step  # Already saved at this step (e.g. the end of an epoch that was a save step).
    nested = to_nested(state)
    bad = integrity.non_finite(nested)
    if bad:
      shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
      raise NonFiniteLossError(
          f"the train state became non-finite by step {step} (NaN or inf in {shown}); not "
          f"saved. {self.last_good()}",
          hint="lower optimizer.learning_rate, use float32 parameters, or check the inputs")
    self.wait()  # orbax would wait for it too; here its failure names its own step
    ocp = _ocp()
    from spp_jax.train.manifest_item import ManifestSave
    from spp_jax.train.process_json import ProcessJsonSave
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(nested), meta=ocp.args.JsonSave(meta),
        data=ProcessJsonSave(data_state),
        manifest=ManifestSave(integrity.host_copy(nested), meta))
    with self._disk_full(step):
      self._manager.save(step, args=args, force=True)
    self._writing = step
    log.info("saving checkpoint at step %d in %s", step, self.directory)
    return step

  def wait(self) -> None:
    """Blocks until the last save is finished (it then counts).

    Raises:
      DiskFullError (or the save's own error) when it failed; the step does not count.
    """
    step, self._writing = self._writing, None
    if step is None or self._created is None:
      return
    with self._disk_full(step):
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    log.info("saved checkpoint at step %d in %s", step, self.directory)

  @contextlib.contextmanager
  def _disk_full(self, step: int):
    """ENOSPC (or a quota) while saving step -> DiskFullError."""
    try:
      yield
    except Exception as e:
      if is_disk_full(e):
        raise DiskFullError(os.fspath(self.directory), f"saving the checkpoint at step {step}",
                            hint=f"free space there; checkpoints {self.steps()} are intact "
                                 f"and the next run resumes from the latest") from e
      raise

  def _read(self, step: int, abstract_state: TrainState) -> tuple[Restored | None, str | None]:
    """(restored, None), or (None, why the checkpoint at step cannot be used)."""
    ocp = _ocp()
    from spp_jax.train.process_json import ProcessJsonRestore
    manifest = self.manifest(step)
    if manifest is None:
      return None, "its checksum manifest is missing or damaged"
    target = abstract_nested(abstract_state)
    differences = integrity.shape_differences(manifest, target)
    if differences:  # Not damage: the config builds another network than the one saved.
      from spp_jax.train.config_schema import ConfigError
      raise ConfigError(f"the checkpoint at step {step} in {self.directory} holds arrays of "
                        f"other shapes than this config's: {'; '.join(differences[:3])}")
    try:
      got = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore(),
          data=ProcessJsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many types for bad files
      return None, f"unreadable ({type(e).__name__}: {one_line(str(e))[:200]})"
    problem = integrity.verify(manifest, got.state, dict(got.meta))
    if problem:
      return None, problem
    return Restored(state=from_nested(got.state, abstract_state), meta=dict(got.meta),
                    data=got.data, step=step), None

  def restore(self, step: int, abstract_state: TrainState) -> Restored:
    """The verified checkpoint at step (nothing is moved).

    Raises:
      DamagedCheckpointError saying why it failed.
    """
    restored, problem = self._read(step, abstract_state)
    if problem is not None:
      raise DamagedCheckpointError(
          f"the checkpoint at step {step} in {self.directory} failed verification: {problem}")
    return restored

  def restore_latest(self, abstract_state: TrainState) -> Restored | None:
    """The newest checkpoint that verifies; damaged newer ones are moved aside with a warning.

    Returns:
      None when the directory holds no checkpoint and none was ever moved aside.
    Raises:
      DamagedCheckpointError when checkpoints exist (or were moved aside) but none verifies.
    """
    failed = []
    for step in reversed(self.steps()):
      restored, problem = self._read(step, abstract_state)
      if _all_processes_agree(problem is None):
        if failed:
          log.warning("resuming from the older checkpoint at step %d", step)
        return restored
      failed.append(f"step {step} ({problem or 'failed on another process'})")
      self._move_aside(step, problem)
    if failed or self.moved_aside():
      raise DamagedCheckpointError(
          f"no good checkpoint left in {self.directory}"
          + (f": {'; '.join(failed)}" if failed else "")
          + f"; damaged checkpoints are in {self.corrupt_dir}",
          hint=f"restore a checkpoint from a backup, or move {self.corrupt_dir} away to train "
               f"this workdir from scratch")
    return None

  def _move_aside(self, step: int, problem: str | None):
    source = self.directory / str(step)
    target = self.corrupt_dir / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    if jax.process_index() == 0:
      paths.move(source, target)
      log.warning("checkpoint at step %d in %s failed verification (%s); moved to %s", step,
                  self.directory, problem or "on another process", target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"spp_jax checkpoint {step} moved aside")
    self._manager.reload()

  def close(self):
    """Finishes the last save and closes orbax's manager. Errors are logged, not raised: the
    caller's `wait` reports a failed save; here another error may be on its way out."""
    if self._created is not None:
      try:
        self.wait()
      except Exception as e:  # noqa: BLE001
        log.warning("the checkpoint being saved could not be finished: %s", one_line(str(e)))
      manager, self._created = self._created, None
      try:
        manager.close()
      except Exception as e:  # noqa: BLE001
        log.debug("closing the checkpoint manager: %s", e)


def read_only_manager(directory):
  """orbax's read-only CheckpointManager over a checkpoints directory (it writes nothing, so a
  running workdir can be read)."""
  ocp = _ocp()
  from spp_jax.train.process_json import ProcessJsonHandler
  handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
              "data": ProcessJsonHandler(), "manifest": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True, create=False, save_interval_steps=0))


def read_verified(directory, step: int | None = None, sharding=None) -> tuple[int, dict, dict]:
  """(step, nested state, meta) of the checkpoint at `step` (None: the latest), read with the
  shapes it was saved with (no model, mesh or config needed) and verified against its
  manifest. sharding: every array's (default: the first local device).

  Raises:
    DamagedCheckpointError when there is no checkpoint, it cannot be read, or it fails
    verification.
  """
  ocp = _ocp()
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    with read_only_manager(directory) as manager:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise DamagedCheckpointError(f"no checkpoint in {directory}")
      meta = manager.item_metadata(step)["state"]
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            meta, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
      got = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore(),
          manifest=ocp.args.JsonRestore()))
  except DamagedCheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many types for bad files
    raise DamagedCheckpointError(f"cannot read the checkpoint in {directory}: "
                                 f"{type(e).__name__}: {one_line(str(e))[:200]}") from e
  problem = integrity.verify(got.manifest, got.state, dict(got.meta))
  if problem:
    raise DamagedCheckpointError(f"the checkpoint at step {step} in {directory} failed "
                                 f"verification: {problem}")
  return step, got.state, dict(got.meta)


def load_params(workdir: str, step: int | None = None) -> dict:
  """The saved parameters as a nested dict of numpy arrays, e.g. params["fc6"]["kernel"].

  Needs no model or mesh. For comparing runs and for notebooks; `step` None means the latest
  checkpoint. The checkpoint is verified against its checksums.

  Raises:
    DamagedCheckpointError when there is no checkpoint or it fails verification.
  """
  _, state, _ = read_verified(paths.path(workdir, "workdir") / "checkpoints", step)
  return _strip_value(jax.tree.map(np.asarray, state["params"]))


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
  checkpointer = Checkpointer(paths.path(workdir, "workdir") / "checkpoints", keep=1_000)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise DamagedCheckpointError(f"no checkpoint in {checkpointer.directory}")
    state = checkpointer.restore(step, abstract).state
  finally:
    checkpointer.close()
  defs = state_lib.model_defs(models, config.model, num_classes)
  return state_lib.merge(defs.eval, state)
