"""Training: `train_and_evaluate(config, workdir)` and the pieces it is built from.

  config_schema  every config key: its default and the values it allows
  variants     the `file.py:arg` variants every config accepts (multi, nospp, levels=...)
  validation   checks across keys, devices and the network's sizes, before anything runs
  interfaces   what the trainer needs from a model registry and a data module
  model        the one path from config.model to a network
  parallel     jax.distributed start-up, the device mesh, host batches made global
  schedules    each epoch's input size, learning-rate schedules, the optimiser
  state        the train state pytree and its creation
  steps        pure train/eval steps
  compile_log  every compilation: function, shapes, seconds, persistent-cache hit
  checkpoint   orbax checkpoints (state, position in the data, random state)
  process_json   the checkpoint item holding each process's input position
  evaluate     masked evaluation over views
  metrics      TensorBoard, metrics.jsonl, progress bar, results table
  loop         train_and_evaluate
"""

from __future__ import annotations

from spp_jax.train.checkpoint import load_model, load_params
from spp_jax.train.config_schema import ConfigError, default_config, view
from spp_jax.train.loop import NonFiniteLossError, train_and_evaluate
from spp_jax.train.metrics import results_table
from spp_jax.train.validation import validate_config
from spp_jax.train.variants import apply_variants

__all__ = ["ConfigError", "NonFiniteLossError", "apply_variants", "default_config", "load_model",
           "load_params", "results_table", "train_and_evaluate", "validate_config", "view"]
