"""Input pipeline: TFDS data sets (array_record, no TensorFlow) + grain, SPP-net's protocols.

  train_iterator(data_cfg, *, batch_size, image_size, epoch, seed, process_index, process_count,
                 mode) -> BatchIterator   one epoch of host-local training batches
  eval_iterator(data_cfg, view, *, batch_size, process_index, process_count) -> BatchIterator
  num_examples(data_cfg, split), num_classes(data_cfg), steps_per_epoch(data_cfg, global_batch),
  num_eval_batches(data_cfg, view, batch_size, process_count=...)

Batch layouts, randomness and iterator state: see `pipeline.py`. With data.batch_dtype =
"uint8" the steps finish the batches on the device with `spp_jax.data.on_device` (imported on
its own: it needs JAX, the host pipeline does not). Full-image buckets: `buckets.py`
(`python -m spp_jax.data.buckets`). Importing this package registers the embedded TFDS builder
`multiscale_fashion_mnist` (prepared on first use).
"""

from spp_jax.data import _tfds_compat

_tfds_compat.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
from spp_jax.data import multiscale_fashion_mnist  # noqa: E402,F401  (registers the builder)
from spp_jax.data.idx import read_idx  # noqa: E402
from spp_jax.data.pipeline import (  # noqa: E402
    BatchIterator, eval_iterator, multiscale_view_shapes, num_classes, num_eval_batches,
    num_examples, steps_per_epoch, train_iterator)
from spp_jax.data.settings import data_settings, view_settings  # noqa: E402

__all__ = [
    "BatchIterator", "data_settings", "eval_iterator", "multiscale_view_shapes", "num_classes",
    "num_eval_batches", "num_examples", "read_idx", "steps_per_epoch", "train_iterator",
    "view_settings",
]
