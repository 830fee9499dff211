"""What a run checks before it writes anything: the data, the network, the saved shapes.

`prepare` reads the data set's facts (classes, steps per epoch, that both splits can be
opened), builds the network's graph (shapes only), the optimiser and the mesh, and, when the
workdir holds checkpoints, compares the shapes of the state this config would train with the
shapes saved (from the newest checkpoint's manifest, without reading its arrays). Every
failure is an error naming what to change, raised while the workdir is still as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

from spp_jax.errors import DataError, ExpectedError, one_line
from spp_jax.train import integrity, parallel, schedules, state as state_lib
from spp_jax.train import workdir as workdir_lib
from spp_jax.train.checkpoint import Checkpointer, abstract_nested
from spp_jax.train.config_schema import ConfigError
from spp_jax.train.interfaces import DataSource, ModelRegistry, ModelSpec


def prepared_data_config(config, min_input_size: int):
  """config.data plus what the trainer decides: min_size, shuffle_seed, mode."""
  data_cfg = copy.deepcopy(config.data)
  with data_cfg.unlocked():
    data_cfg.min_size = min_input_size  # The data module resizes up or rejects smaller images.
    if data_cfg.get("shuffle_seed") is None:
      data_cfg.shuffle_seed = config.seed
    data_cfg.mode = config.train.mode
  return data_cfg


@dataclasses.dataclass
class RunSetup:
  """What train_and_evaluate needs, all checked."""
  data_cfg: Any
  num_classes: int
  steps_per_epoch: int
  lr_schedule: Any
  tx: Any
  defs: state_lib.ModelDefs
  mesh: Any
  checkpointer: Checkpointer
  abstract_state: Any = None  # when the workdir holds checkpoints


@contextlib.contextmanager
def _data_errors(data_cfg):
  """The data module's errors as one-line DataErrors naming config.data.name (a data set that
  is not prepared is already a DataError with the prepare command as its hint)."""
  prefix = f"config.data.name={data_cfg.name!r}"
  try:
    yield
  except DataError as e:
    raise DataError(f"{prefix}: {one_line(str(e))}", hint=e.hint) from e
  except (ExpectedError, ConfigError):
    raise
  except (ValueError, FileNotFoundError, KeyError, AssertionError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"{prefix}: {one_line(first)}") from e


def _data_facts(config, data: DataSource, data_cfg) -> tuple[int, int]:
  batch = int(config.train.batch_size)
  with _data_errors(data_cfg):
    num_classes = int(data.num_classes(data_cfg))
    steps = int(data.steps_per_epoch(data_cfg, batch, mode=config.train.mode))
    train_examples = data.num_examples(data_cfg, data_cfg.train_split)
    data.num_examples(data_cfg, data_cfg.eval_split)  # read at the end: opened now
  if steps < 1:
    raise ConfigError(f"config.train.batch_size={batch} is larger than the training split "
                      f"({train_examples} examples)")
  return num_classes, steps


def _model_defs(models: ModelRegistry, model_cfg, num_classes: int) -> state_lib.ModelDefs:
  try:
    return state_lib.model_defs(models, model_cfg, num_classes)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model={model_cfg.to_dict()!r} cannot be built: "
                      f"{one_line(str(e))}") from e


def prepare(config, wd: workdir_lib.Workdir, models: ModelRegistry, data: DataSource,
            spec: ModelSpec, saved_config: dict | None) -> RunSetup:
  """Checks the data, the network and the saved shapes; writes nothing.

  Raises:
    DataError (data set not found or not prepared), ConfigError (a network that cannot be
    built, or one whose parameter shapes differ from the workdir's checkpoints).
  """
  data_cfg = prepared_data_config(config, spec.min_input_size)
  num_classes, steps = _data_facts(config, data, data_cfg)
  lr = schedules.learning_rate_schedule(config.optimizer, steps, int(config.train.num_epochs))
  tx = schedules.make_optimizer(config.optimizer, lr)
  setup = RunSetup(data_cfg=data_cfg, num_classes=num_classes, steps_per_epoch=steps,
                   lr_schedule=lr, tx=tx, defs=_model_defs(models, config.model, num_classes),
                   mesh=parallel.make_mesh(),
                   checkpointer=Checkpointer(wd.checkpoints, keep=config.train.keep_checkpoints))
  if setup.checkpointer.steps():
    setup.abstract_state = state_lib.abstract_train_state(
        models, config.model, num_classes, int(config.seed), tx,
        parallel.replicated(setup.mesh))
    _check_saved_shapes(config, setup, saved_config)
  return setup


def _check_saved_shapes(config, setup: RunSetup, saved_config: dict | None):
  """A changed config (--force) may not change the shapes of what the checkpoints hold."""
  checkpointer = setup.checkpointer
  manifest = next((m for m in map(checkpointer.manifest, reversed(checkpointer.steps()))
                   if m is not None), None)
  if manifest is None:
    return  # every checkpoint is damaged: restoring says so
  differences = integrity.shape_differences(manifest, abstract_nested(setup.abstract_state))
  if not differences:
    return
  changed = {}
  if saved_config is not None:
    every = workdir_lib.changed_keys(saved_config, workdir_lib.config_to_dict(config))
    # The network's keys and the data set (its number of classes) decide the shapes.
    changed = {k: v for k, v in every.items() if k.startswith(("model.", "data.name"))} or {
        k: v for k, v in every.items()
        if not k.startswith(workdir_lib.COMPATIBLE_PREFIXES)}
  keys = "; ".join(f"config.{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()) or (
      "this config")
  first = next(iter(changed), None)
  error = ConfigError(
      f"{keys} changes the shapes of the state saved in {checkpointer.directory} "
      f"({'; '.join(differences[:2])}); a run cannot continue with other shapes")
  error.hint = ("use a new workdir" + (f", or keep config.{first}={changed[first][0]!r}"
                                       if first else ""))
  raise error
