"""Warm starts and fine-tuning: a fresh run's parameters taken from another run, by name.

  config.init_from = "workdirs/imagenette"   # that run's latest checkpoint
  config.init_from_step = 12000              # or a saved step of it

Every parameter of the new network is looked up by its path (conv1/kernel, fc6/bias, ...) in
the other run's checkpoint:
  same path, same shape      copied (cast to the new network's dtype);
  classifier, another shape  kept as initialised and logged: another class count, the
                             transfer case (e.g. Oxford flowers from an Imagenette run);
  anything else              a ConfigError naming the parameters: missing on either side, or
                             of another shape (another architecture, width or pyramid).
Only parameters come over: the optimiser state is initialised for them, the step is 0, and
dropout keys and the data order come from this config's seed. A resumed run restores its own
checkpoint and does not read init_from again. Detection takes its backbone the same way
(`transfer`, keeping its own classifier).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np

from spp_jax import paths
from spp_jax.train.config_schema import ConfigError

log = logging.getLogger(__name__)

# Layers that may differ in shape between the two runs: re-initialised, not refused.
REINIT_LAYERS = ("classifier",)
_SHOWN = 8  # names listed per kind of mismatch


def _name(path) -> str:
  """A tree path as "fc6/kernel" (an nnx Variable's trailing "value" left out)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def flatten(tree) -> dict[str, object]:
  """Nested parameters (an nnx State or nested dicts) -> {"fc6/kernel": array}."""
  return {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@dataclasses.dataclass
class Report:
  """What a transfer did: parameter names copied and re-initialised."""
  copied: list[str]
  reinitialised: list[str]


def _listed(names: list[str]) -> str:
  more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more


def match(target: Mapping[str, object], source: Mapping[str, object], *, where: str,
          reinit_layers: tuple[str, ...] = REINIT_LAYERS, fresh: tuple[str, ...] = ()
          ) -> tuple[dict, Report]:
  """The source value of every target parameter, by name.

  target, source: flat {"layer/param": array} (see `flatten`). Returns ({name: value} for
  every target name: the source's array, or the target's own where it is re-initialised) and
  the report. Raises ConfigError naming every mismatch outside `reinit_layers`. Layers in
  `fresh` keep the target's values even where the shapes agree.
  """
  def reinit_ok(name):
    return name.split("/")[0] in reinit_layers

  missing = [n for n in target if n not in source and not reinit_ok(n)]
  extra = [n for n in source if n not in target and not reinit_ok(n)]
  shapes = [f"{n} {tuple(np.shape(source[n]))} vs {tuple(np.shape(target[n]))}" for n in target
            if n in source and np.shape(source[n]) != np.shape(target[n]) and not reinit_ok(n)]
  problems = []
  if missing:
    problems.append(f"missing in {where}: {_listed(missing)}")
  if extra:
    problems.append(f"not in this network: {_listed(extra)}")
  if shapes:
    problems.append(f"other shapes (theirs vs ours): {_listed(shapes)}")
  if problems:
    raise ConfigError(f"config.init_from={where!r}: the parameters do not match this "
                      f"network's by name; " + "; ".join(problems))
  out, report = {}, Report(copied=[], reinitialised=[])
  for name, value in target.items():
    if (name in source and np.shape(source[name]) == np.shape(value)
        and name.split("/")[0] not in fresh):
      out[name] = source[name]
      report.copied.append(name)
    else:
      out[name] = value
      report.reinitialised.append(name)
  return out, report


def saved_steps(workdir: str, what: str = "config.init_from") -> list[int]:
  """The steps of workdir/checkpoints/<step> directories, oldest first (what: the workdir's
  name in an error)."""
  directory = paths.path(workdir, what) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def source_params(workdir: str, step: int | None) -> dict[str, np.ndarray]:
  """Flat parameters of another run's checkpoint, or a ConfigError saying why there are none."""
  from spp_jax.train.checkpoint import load_params

  steps = saved_steps(workdir)
  if not steps:
    raise ConfigError(f"config.init_from={workdir!r}: no checkpoint in "
                      f"{paths.path(workdir) / 'checkpoints'}")
  if step is not None and step not in steps:
    raise ConfigError(f"config.init_from_step={step}: {workdir!r} has checkpoints at steps "
                      f"{', '.join(map(str, steps))}")
  return flatten(load_params(workdir, step))


def transfer(params, workdir: str, step: int | None = None, *, fresh: tuple[str, ...] = ()):
  """params (an nnx State, or any pytree of arrays) with every leaf taken by name from the
  checkpoint of `workdir` at `step` (None: latest) under the rules above, each placed where the
  leaf it replaces was; layers in `fresh` stay as they are. Returns (params, Report).

  Detection takes its backbone this way: `nnx.update(model, transfer(nnx.state(model,
  nnx.Param), workdir, fresh=("classifier",))[0])` keeps its (classes + 1)-way classifier.
  """
  values, report = match(flatten(params), source_params(workdir, step), where=workdir,
                         fresh=fresh)

  def take(path, old):
    new = values[_name(path)]
    if new is old:
      return old
    new = np.asarray(new).astype(old.dtype)
    return jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new

  return jax.tree_util.tree_map_with_path(take, params), report


def warm_start(state, config, tx, *, event: Callable[[dict], None] | None = None):
  """A fresh TrainState with its parameters from config.init_from (unchanged if unset).

  state: from state.create_train_state (replicated); tx: the run's optimiser, whose state is
  initialised again for the loaded parameters. `event` receives a summary for metrics.jsonl.
  """
  workdir = config.get("init_from")
  if not workdir:
    return state
  workdir = os.fspath(paths.path(workdir, "config.init_from"))
  step = config.get("init_from_step")
  params, report = transfer(state.params, workdir, step)
  sharding = jax.tree.leaves(state.params)[0].sharding
  opt_state = jax.jit(tx.init, out_shardings=sharding)(params)
  log.info("init_from %s (step %s): copied %d parameters; re-initialised %s", workdir,
           "latest" if step is None else step, len(report.copied),
           _listed(report.reinitialised) if report.reinitialised else "none")
  if event is not None:
    event(dict(event="init_from", workdir=workdir, step=step, copied=len(report.copied),
               reinitialised=report.reinitialised))
  return dataclasses.replace(state, params=params, opt_state=opt_state)
