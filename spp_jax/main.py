r"""Trains and evaluates an SPP network from a config file.

  python -m spp_jax.main --config configs/demo.py --workdir workdirs/demo
  python -m spp_jax.main --config configs/zf5_imagenet.py:multi,levels=4321 \
      --workdir workdirs/zf5_multi --config.train.batch_size=256

`--config FILE.py[:ARG]` calls FILE's get_config(ARG); `--config.a.b=value` overrides one key.
Running again with the same --workdir resumes from its latest checkpoint. SIGTERM saves a
checkpoint and exits with status 0. Multi-host: start one process per host with the same
flags; jax.distributed finds the cluster (SLURM, Open MPI, TPU pods, Kubernetes), or pass
--coordinator_address, --num_processes and --process_id.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/demo.py or "
    "configs/zf5_imagenet.py:multi. Keys can be overridden with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results; "
                               "an existing one is resumed.")
_FORCE = flags.DEFINE_bool("force", False, "Continue in a workdir whose saved config differs "
                           "(sets config.allow_config_change).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for "
                                   "jax.distributed (multi-host without cluster detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the INFO logs of jax and orbax too.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Our progress lines at INFO; the libraries' (orbax logs every save) only with --verbose.
  absl_logging.set_verbosity(absl_logging.INFO if _VERBOSE.value else absl_logging.WARNING)
  logging.getLogger("spp_jax").setLevel(logging.INFO)
  from spp_jax import runtime

  runtime.configure_cpu_flags()  # Before anything starts the backend.

  config = _CONFIG.value
  if _FORCE.value:
    with config.unlocked():
      config.allow_config_change = True

  if config.get("task") == "detection":  # configs/detect_*.py: SPP-net detection (docs/paper.md §6)
    from spp_jax.detection.run import run  # after flags: imports jax

    run(config, _WORKDIR.value, log=lambda m: print(m, flush=True))
    return

  from spp_jax.train import ConfigError, loop, results_table

  from spp_jax.train import cluster

  cluster.initialize(config.distributed, coordinator_address=_COORDINATOR.value,
                     num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:
    results = loop.train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, loop.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  import jax

  if results and jax.process_index() == 0:
    print(f"\nFinal evaluation ({_WORKDIR.value}/results.json):")
    print(results_table(results))


if __name__ == "__main__":
  app.run(main)
