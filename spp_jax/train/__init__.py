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

import importlib

# Imported on first use, so that the config schema (read by grain workers through the data
# settings) does not import JAX.
_PUBLIC = {
    "ConfigError": "spp_jax.train.config_schema",
    "default_config": "spp_jax.train.config_schema",
    "view": "spp_jax.train.config_schema",
    "apply_variants": "spp_jax.train.variants",
    "validate_config": "spp_jax.train.validation",
    "NonFiniteLossError": "spp_jax.train.loop",
    "train_and_evaluate": "spp_jax.train.loop",
    "load_model": "spp_jax.train.checkpoint",
    "load_params": "spp_jax.train.checkpoint",
    "results_table": "spp_jax.train.metrics",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'spp_jax.train' has no attribute {name!r}")
