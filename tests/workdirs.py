"""Workdirs for the tests of evaluate, predict and export, made in seconds.

`untrained_run` writes what a training run leaves behind (config.json and one checkpoint) for
a config's freshly initialised network, without training: the outputs of evaluate, predict and
export can then be compared with the in-process network exactly.
"""

from __future__ import annotations

import json
import os

from spp_jax import configs


def demo_config(arg: str = "tiny"):
  """configs/demo.py's config (the "small" network on the embedded data set)."""
  return configs.load("demo.py", arg)


def untrained_run(workdir, config=None, *, num_classes: int = 10, step: int = 1, models=None
                  ) -> str:
  """workdir with config.json and a checkpoint at `step` of config's initial parameters."""
  from spp_jax.train import parallel, schedules, state as state_lib
  from spp_jax.train.checkpoint import Checkpointer
  from spp_jax.train.model import default_registry
  from spp_jax.train.workdir import config_to_dict

  config = demo_config() if config is None else config
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config_to_dict(config), f)
  tx = schedules.make_optimizer(config.optimizer, lambda count: 0.0)
  rep = parallel.replicated(parallel.make_mesh())
  state = state_lib.create_train_state(models or default_registry(), config.model, num_classes,
                                       int(config.seed), tx, rep)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5)
  try:
    checkpointer.save(state, dict(step=step, epoch=0, size=None), None)
  finally:
    checkpointer.close()
  return workdir


def tree_snapshot(directory) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file and directory below `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out
