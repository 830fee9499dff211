r"""Scores a trained run's checkpoint on any prepared split or data set, without training.

  python -m spp_jax.evaluate --workdir workdirs/demo
  python -m spp_jax.evaluate --workdir workdirs/demo --split train --views center,full
  python -m spp_jax.evaluate --workdir workdirs/zf5 --step 200000 --data imagenet_v2 \
      --split test --output zf5_v2.json

The run is what the workdir holds: its config.json (network, data, views) and a checkpoint
(the latest, or --step). Evaluation is the training loop's own (spp_jax.train.evaluate), so a
finished run scores exactly what its results.json says. --views takes the config's view names
or the kinds center, full and ten_view (at the data's sizes). The table is printed and the
results are written as JSON to --output (default WORKDIR/eval/<data>-<split>-step<N>.json);
checkpoints/ is only read, with orbax's read-only manager, so a running workdir can be scored.

`open_run` (config, step, parameters, the eval-mode network) is what spp_jax.predict and
spp_jax.export start from too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any

import ml_collections

from spp_jax import errors, paths
from spp_jax.train.config_schema import VIEW_KINDS, ConfigError
from spp_jax.train.config_schema import view as make_view

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


class RunError(ValueError):
  """A workdir, step, split or view that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------- the run


def _root(workdir):
  """The workdir as an epath.Path (local or gs://); a RunError for another scheme."""
  try:
    return paths.path(workdir, "workdir")
  except paths.UnsupportedPathError as e:
    raise RunError(str(e)) from None


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """workdir/config.json as a ConfigDict (views as ConfigDicts), or a RunError."""
  path = _root(workdir) / CONFIG_FILE
  if not path.parent.is_dir():
    raise RunError(f"workdir {workdir!r} does not exist")
  if not path.exists():
    raise RunError(f"{path} not found: {workdir!r} is not a training workdir")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if config.get("task") == "detection":
    raise RunError(f"{workdir!r} holds a detection run; evaluate, predict and export take "
                   f"classification runs")
  config.eval.views = [ml_collections.ConfigDict(v) for v in config.eval.views]
  return config


def checkpoint_steps(workdir: str) -> list[int]:
  """The saved steps of a workdir (finished saves only), oldest first; [] when none."""
  directory = _root(workdir) / CHECKPOINTS
  if not directory.is_dir() or not any(directory.iterdir()):
    return []
  from spp_jax.train.checkpoint import read_only_manager

  with read_only_manager(directory) as manager:
    return sorted(int(s) for s in manager.all_steps())


def _choose_step(workdir: str, step: int | None) -> int:
  steps = checkpoint_steps(workdir)
  if not steps:
    raise RunError(f"no checkpoint in {os.path.join(workdir, CHECKPOINTS)} (has the run "
                   f"saved one yet?)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise RunError(f"no checkpoint at step {step} in {os.path.join(workdir, CHECKPOINTS)}; "
                   f"saved steps: {', '.join(map(str, steps))}")
  return step


def _classes_in(tree: Any) -> int | None:
  """Outputs of the classifier layer of a restored state (params/classifier/kernel)."""
  try:
    node = tree["params"]["classifier"]["kernel"]
  except (KeyError, TypeError):
    return None
  node = node.get("value", node) if isinstance(node, dict) else node
  return int(node.shape[-1]) if hasattr(node, "shape") else None


@dataclasses.dataclass
class Run:
  """A trained run at one checkpoint.

  state: the TrainState (replicated on `mesh`); defs: train/eval graph definitions;
  data_cfg: config.data as the trainer prepared it (min_size = the network's minimum).
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  num_classes: int
  min_input_size: int
  base_size: int
  data_cfg: ml_collections.ConfigDict
  defs: Any
  state: Any
  mesh: Any

  def model(self):
    """The network in eval mode (dropout off): model(images, image_sizes=None) -> logits."""
    from spp_jax.train import state as state_lib
    return state_lib.merge(self.defs.eval, self.state)


def open_run(workdir: str, step: int | None = None, *, models=None, data=None) -> Run:
  """Loads a workdir's config and the parameters of its checkpoint at `step` (None: latest).

  models, data: the model registry and data module (default spp_jax.models, spp_jax.data);
  tests pass the fakes of tests/fakes.py. Raises RunError (one line) for a workdir that is
  not a run, has no checkpoint, or lacks the step.
  """
  from spp_jax.train import parallel, schedules, state as state_lib
  from spp_jax.train.checkpoint import from_nested, read_verified
  from spp_jax.train.loop import prepared_data_config
  from spp_jax.train.model import default_registry, model_spec

  workdir = os.fspath(_root(workdir))  # local: absolute; gs://: as given
  config = saved_config(workdir)
  step = _choose_step(workdir, step)
  models = default_registry() if models is None else models
  spec = model_spec(models, config.model)
  mesh = parallel.make_mesh()
  rep = parallel.replicated(mesh)
  try:
    step, saved, _ = read_verified(_root(workdir) / CHECKPOINTS, step, sharding=rep)
  except errors.DamagedCheckpointError as e:
    raise RunError(f"{e}; score another step with --step") from None
  num_classes = _classes_in(saved)
  if num_classes is None:
    if data is None:
      from spp_jax import data
    num_classes = int(data.num_classes(config.data))
  tx = schedules.make_optimizer(config.optimizer, lambda count: 0.0)  # the saved structure
  abstract = state_lib.abstract_train_state(models, config.model, num_classes,
                                            int(config.seed), tx, rep)
  try:
    state = from_nested(saved, abstract)
  except (KeyError, TypeError) as e:
    raise RunError(f"the checkpoint at step {step} in {workdir} does not hold the network of "
                   f"its config.json ({e!r} missing)") from None
  return Run(workdir=workdir, config=config, step=step, num_classes=num_classes,
             min_input_size=int(spec.min_input_size), base_size=int(spec.base_size),
             data_cfg=prepared_data_config(config, int(spec.min_input_size)),
             defs=state_lib.model_defs(models, config.model, num_classes), state=state,
             mesh=mesh)


# ----------------------------------------------------------------------------- evaluating


def select_views(config, names: list[str] | None) -> list:
  """The config's views, or those named: a config view's name, or a kind at the data's sizes."""
  views = list(config.eval.views)
  if not names:
    return views
  by_name = {v.name: v for v in views}
  out = []
  for name in names:
    if name in by_name:
      out.append(by_name[name])
    elif name in VIEW_KINDS and name != "multiscale":
      out.append(make_view(name, name))
    else:
      known = sorted(set(by_name) | (set(VIEW_KINDS) - {"multiscale"}))
      raise RunError(f"unknown view {name!r}; this run has: {', '.join(known)}")
  return out


def evaluate_run(run: Run, *, split: str | None = None, data_name: str | None = None,
                 data_dir: str | None = None, views: list[str] | None = None,
                 batch_size: int | None = None, data=None) -> dict:
  """Scores `run` on a split (default data.eval_split) of its data set or of `data_name`.

  Returns {"workdir", "step", "data", "split", "results": {"<view>/top1": f, ...},
  "details": {view: {top1, top5, loss, count, seconds}}}.
  """
  from spp_jax.train.evaluate import Evaluator

  if data is None:
    from spp_jax import data
  data_cfg = run.data_cfg.copy_and_resolve_references()
  with data_cfg.unlocked():
    if data_name:
      data_cfg.name = data_name
    if data_dir:
      data_cfg.data_dir = data_dir
    if split:
      data_cfg.eval_split = split
  if data_name:
    classes = int(data.num_classes(data_cfg))
    if classes != run.num_classes:
      raise RunError(f"data set {data_name!r} has {classes} classes, the network of "
                     f"{run.workdir} has {run.num_classes} outputs")
  eval_cfg = ml_collections.ConfigDict(dict(
      batch_size=int(batch_size or run.config.eval.batch_size),
      views=select_views(run.config, views)))
  evaluator = Evaluator(run.defs.eval, run.mesh, data, data_cfg, eval_cfg)
  start = time.perf_counter()
  results, details = evaluator.evaluate(run.state)
  return dict(workdir=run.workdir, step=run.step, data=data_cfg.name,
              split=data_cfg.eval_split, seconds=round(time.perf_counter() - start, 3),
              results=results, details=details)


def default_output(run: Run, report: dict) -> str:
  safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{report['data']}-{report['split']}")
  return os.path.join(run.workdir, "eval", f"{safe}-step{run.step}.json")


def write_json(path: str, obj) -> None:
  """Writes obj to path atomically; a RunError naming the path if it cannot be written."""
  path = os.fspath(_root(path))
  if os.sep + CHECKPOINTS + os.sep in path + os.sep:
    raise RunError(f"--output {path!r} is inside a checkpoints/ directory; choose another path")
  try:
    paths.path(path).parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(path, json.dumps(obj, indent=2))
  except OSError as e:
    raise RunError(f"cannot write {path}: {e.strerror or e}") from None


def check_writable(path: str) -> None:
  """Fails early (before minutes of evaluation) when `path` cannot be created (a gs:// path
  is only checked for its scheme: a bucket says no when written)."""
  if paths.is_remote(path):
    _root(path)
    return
  directory = os.path.dirname(os.path.abspath(path)) or "."
  probe = directory
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise RunError(f"cannot write {os.path.abspath(path)}: {probe} is not a writable directory")
  if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise RunError(f"cannot write {os.path.abspath(path)}: not a writable file")


# ----------------------------------------------------------------------------- command line


def quiet_logs(level: int = logging.INFO) -> None:
  """spp_jax's own messages at `level`; jax's, orbax's and TFDS's only when they warn."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("spp_jax").setLevel(level)
  # orbax warns that a read-only manager's directory is read-only: that is the intent here.
  logging.getLogger("absl").addFilter(
      lambda record: "directory is read only" not in record.getMessage())


def _define_flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).",
                      required=True)
  flags.DEFINE_integer("step", None, "A saved step; default the latest checkpoint.")
  flags.DEFINE_string("split", None, "A prepared split; default the config's data.eval_split.")
  flags.DEFINE_string("data", None, "Another TFDS data set (name[/config]) with the same "
                      "classes; default the run's own.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir for --data; default the run's.")
  flags.DEFINE_list("views", None, "Views to score: the config's view names, or center, full, "
                    "ten_view; default every view of the config.")
  flags.DEFINE_integer("batch_size", None, "Global eval batch; default config.eval.batch_size.")
  flags.DEFINE_string("output", None, "JSON file for the results; default "
                      "WORKDIR/eval/<data>-<split>-step<N>.json.")


def main(argv):
  from absl import flags

  from spp_jax import runtime
  from spp_jax.train.metrics import results_table

  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  quiet_logs()
  runtime.configure_cpu_flags()
  try:
    if f.output:
      check_writable(f.output)
    run = open_run(f.workdir, f.step)
    report = evaluate_run(run, split=f.split, data_name=f.data, data_dir=f.data_dir,
                          views=f.views, batch_size=f.batch_size)
    path = f.output or default_output(run, report)
    write_json(path, report)
  except (RunError, ConfigError, errors.ExpectedError, ValueError) as e:
    errors.report(e)
    return 1
  print(f"{report['data']} split {report['split']!r}, step {run.step} of {run.workdir}:")
  print(results_table(report["results"]))
  print(f"written to {path}")
  return 0


def run_cli(argv=None):
  """Console script spp-evaluate."""
  from absl import app

  _define_flags()
  app.run(main, argv=argv)


if __name__ == "__main__":
  run_cli()
