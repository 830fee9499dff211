"""Training: `train_and_evaluate(config, workdir)` and the pieces it is built from.

  defaults     the config schema, its defaults and the variants of every config file
  validation   config checks that run before any compilation
  parallel     jax.distributed start-up, the device mesh, host batches made global
  schedules    each epoch's input size, learning-rate schedules, the optimiser
  state        the train state pytree and its creation
  steps        pure train/eval steps
  compiled     one logged compilation per input shape
  program_cache  executables (and initial states) on disk: a warm run neither traces nor compiles
  checkpoint   orbax checkpoints (state, position in the data, random state)
  process_json   the checkpoint item holding each process's input position
  evaluate     masked evaluation over views
  metrics      TensorBoard, metrics.jsonl, progress bar, results table
  loop         train_and_evaluate
"""

from __future__ import annotations

from spp_jax.train.checkpoint import load_model, load_params
from spp_jax.train.defaults import apply_variants, default_config
from spp_jax.train.loop import NonFiniteLossError, train_and_evaluate
from spp_jax.train.metrics import results_table
from spp_jax.train.validation import validate_config

__all__ = ["NonFiniteLossError", "apply_variants", "default_config", "load_model", "load_params",
           "results_table", "train_and_evaluate", "validate_config"]
