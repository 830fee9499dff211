"""Fakes with the trainer's interfaces (spp_jax/train/interfaces.py), for tests and benchmarks.

`TinyModels` builds a one-conv SPP net in milliseconds; `SyntheticData` yields batches in the
data module's format from an in-memory rule (no files). They implement the whole interfaces,
so the training loop can be tested, and its overhead measured, apart from the real networks
and input pipeline.

SyntheticData's global batch b of an epoch is the same examples for any process count: process
p of n reads rows [p*B/n, (p+1)*B/n) of it. That is what makes "2 processes x 2 devices" and
"1 process x 4 devices" train to the same parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spp_jax.layers import SpatialPyramidPooling

# ----------------------------------------------------------------------------- model stand-in


class TinyNet(nnx.Module):
  """conv3x3 (stride 1, SAME) -> ReLU -> SPP -> fc -> dropout -> classifier."""

  min_input_size = 4
  feature_stride = 1

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs, spp_levels=(2, 1), head: str = "spp",
               width_multiplier: float = 1.0, fc_width: int = 16, dropout_rate: float = 0.5,
               dtype="float32", param_dtype="float32", base_size: int = 16):
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    if head not in ("spp", "fixed"):
      raise ValueError(f"head must be 'spp' or 'fixed', got head={head!r}")
    channels = max(1, int(round(8 * width_multiplier)))
    self.head_kind = head
    self.base_size = base_size
    self.dtype = dtype
    self.conv = nnx.Conv(3, channels, (3, 3), padding="SAME", dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    levels = (base_size // 4,) if head == "fixed" else spp_levels
    self.spp = SpatialPyramidPooling(levels)
    self.fc = nnx.Linear(self.spp.output_dim(channels), fc_width, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.classifier = nnx.Linear(fc_width, num_classes, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

  def feature_size(self, hw):
    return tuple(int(v) for v in hw)

  def features(self, images, image_sizes=None):
    if self.head_kind == "fixed" and images.shape[1:3] != (self.base_size, self.base_size):
      raise ValueError(f"head='fixed' accepts only {self.base_size}x{self.base_size} inputs, "
                       f"got {images.shape[1:3]}")
    x = images.astype(self.dtype)
    if image_sizes is not None:  # Zero the padding so the SAME conv sees what it would alone.
      h = jnp.arange(x.shape[1])[None, :, None, None] < image_sizes[:, 0, None, None, None]
      w = jnp.arange(x.shape[2])[None, None, :, None] < image_sizes[:, 1, None, None, None]
      x = jnp.where(h & w, x, 0)
    return nnx.relu(self.conv(x)), image_sizes

  def pool(self, fmap, fmap_sizes=None):
    return self.spp(fmap, fmap_sizes)

  def head(self, pooled):
    return self.classifier(self.dropout(nnx.relu(self.fc(pooled))))

  def __call__(self, images, image_sizes=None):
    return self.head(self.pool(*self.features(images, image_sizes)))


@dataclasses.dataclass(frozen=True)
class TinySpec:
  min_input_size: int
  base_size: int


class TinyModels:
  """Registry fake: names(), spec(name, **options), create(name, *, num_classes, rngs, **options)."""

  @staticmethod
  def names() -> tuple[str, ...]:
    return ("tiny",)

  @staticmethod
  def spec(name: str, **options) -> TinySpec:
    if name != "tiny":
      raise ValueError(f"unknown model name={name!r}; known: tiny")
    base = options.get("base_size") or 16
    return TinySpec(min_input_size=base if options.get("head") == "fixed" else TinyNet.min_input_size,
                    base_size=base)

  @staticmethod
  def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **options) -> TinyNet:
    if name != "tiny":
      raise ValueError(f"unknown model name={name!r}; known: tiny")
    return TinyNet(num_classes=num_classes, rngs=rngs, **options)


# ----------------------------------------------------------------------------- data stand-in


def _example(index: int, h: int, w: int, num_classes: int) -> tuple[np.ndarray, int]:
  """A learnable image: the label picks a colour channel and a bright quadrant, plus noise."""
  rng = np.random.default_rng(index)
  label = index % num_classes
  img = rng.normal(0.0, 0.3, (h, w, 3)).astype(np.float32)
  img[..., label % 3] += 1.0
  q = (label // 3) % 4
  img[(q // 2) * h // 2:(q // 2 + 1) * h // 2, (q % 2) * w // 2:(q % 2 + 1) * w // 2] += 1.0
  return img, label


class EpochIterator:
  """One epoch of batches with get_state/set_state (the position in the epoch).

  `skipped` / `rejected` count what the data module would have left out (undecodable / too
  small images): with left_out_every=k, batch i counts one skipped image when i % k == 0 and
  one rejected when i % k == 1 (the batches themselves are unchanged).
  """

  def __init__(self, make_batch, num_batches: int, left_out_every: int = 0):
    self._make_batch = make_batch
    self._num_batches = num_batches
    self._next = 0
    self._every = left_out_every
    self.skipped = 0
    self.rejected = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next >= self._num_batches:
      raise StopIteration
    batch = self._make_batch(self._next)
    if self._every:
      self.skipped += self._next % self._every == 0
      self.rejected += self._next % self._every == 1
    self._next += 1
    return batch

  def __len__(self) -> int:
    return self._num_batches

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next}

  def set_state(self, state: dict[str, Any]):
    self._next = int(state["next_batch"])


class SyntheticData:
  """Data-module fake: num_train / num_eval examples of num_classes classes.

  Full-image training (data_cfg.mode == "full_image" or train.mode passed as mode=) uses
  data_cfg.full_image.buckets: batch i is padded to bucket i % len(buckets) and its images
  have sizes between half the bucket and the bucket.
  """

  def __init__(self, num_train: int = 64, num_eval: int = 20, num_classes: int = 4,
               left_out_every: int = 0):
    self.sizes = dict(num_train=num_train, num_eval=num_eval, num_classes=num_classes)
    self.left_out_every = left_out_every  # see EpochIterator

  def _get(self, data_cfg, key):
    del data_cfg
    return self.sizes[key]

  def num_classes(self, data_cfg) -> int:
    return self._get(data_cfg, "num_classes")

  def num_examples(self, data_cfg, split: str) -> int:
    return self._get(data_cfg, "num_train" if split == data_cfg.train_split else "num_eval")

  def steps_per_epoch(self, data_cfg, batch_size: int, *, mode: str) -> int:
    del mode
    return self._get(data_cfg, "num_train") // batch_size

  def multiscale_view_shapes(self, data_cfg, view, padded_shape):
    raise NotImplementedError("SyntheticData has no multiscale views")

  def train_iterator(self, data_cfg, *, batch_size: int, image_size: int, epoch: int, seed: int,
                     process_index: int = 0, process_count: int = 1, mode: str = "crop"):
    n = self._get(data_cfg, "num_train")
    c = self.num_classes(data_cfg)
    global_batch = batch_size * process_count
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    buckets = [tuple(b) for b in data_cfg.full_image.buckets]

    def make_batch(b: int) -> dict[str, np.ndarray]:
      rows = perm[b * global_batch:(b + 1) * global_batch]
      rows = rows[process_index * batch_size:(process_index + 1) * batch_size]
      if mode == "full_image":
        bh, bw = buckets[b % len(buckets)]
        images = np.zeros((batch_size, bh, bw, 3), np.float32)
        sizes = np.zeros((batch_size, 2), np.int32)
        labels = np.zeros((batch_size,), np.int32)
        for i, r in enumerate(rows):
          h = bh // 2 + int(r) % (bh - bh // 2 + 1)
          w = bw // 2 + int(r * 7) % (bw - bw // 2 + 1)
          images[i, :h, :w], labels[i] = _example(int(r), h, w, c)
          sizes[i] = (h, w)
      else:
        pairs = [_example(int(r), image_size, image_size, c) for r in rows]
        images = np.stack([p[0] for p in pairs])
        labels = np.array([p[1] for p in pairs], np.int32)
        sizes = np.full((batch_size, 2), image_size, np.int32)
      return dict(image=images, label=labels, image_size=sizes,
                  mask=np.ones((batch_size,), np.float32))

    return EpochIterator(make_batch, n // global_batch, self.left_out_every)

  def eval_iterator(self, data_cfg, view, *, batch_size: int, process_index: int = 0,
                    process_count: int = 1):
    n = self._get(data_cfg, "num_eval")
    c = self.num_classes(data_cfg)
    mine = np.arange(n)[process_index::process_count]
    num_batches = math.ceil(math.ceil(n / process_count) / batch_size)
    num_views = 10 if view.kind == "ten_view" else 1
    size = int(view.size or view.short_side or data_cfg.crop_size)

    def make_batch(b: int) -> dict[str, np.ndarray]:
      images = np.zeros((batch_size, num_views, size, size, 3), np.float32)
      sizes = np.full((batch_size, num_views, 2), size, np.int32)
      labels = np.zeros((batch_size,), np.int32)
      mask = np.zeros((batch_size,), np.float32)
      for i, r in enumerate(mine[b * batch_size:(b + 1) * batch_size]):
        h = size if view.kind != "full" else size // 2 + int(r) % (size - size // 2 + 1)
        img, labels[i] = _example(1_000_000 + int(r), h, size, c)
        for v in range(num_views):
          images[i, v, :h] = img[:, ::-1] if v % 2 else img
        sizes[i, :, 0] = h
        mask[i] = 1.0
      return dict(image=images, label=labels, image_size=sizes, mask=mask)

    return EpochIterator(make_batch, num_batches, self.left_out_every)


def tiny_config(**overrides):
  """A complete config for TinyModels + SyntheticData that trains in about a second."""
  from spp_jax.train import default_config, view

  c = default_config()
  c.model.name = "tiny"
  c.model.spp_levels = (2, 1)
  c.model.fc_width = 16
  c.model.dropout_rate = 0.25
  c.data.name = "synthetic"
  c.data.resize_short = None
  c.data.crop_size = 16
  c.data.color_jitter = 0.0
  c.data.full_image.short_side = 12
  c.data.full_image.buckets = ((16, 16), (12, 20))
  c.train.batch_size = 8
  c.train.num_epochs = 2
  c.train.sizes = (16, 12)
  c.train.schedule = "alternate"
  c.train.log_every_steps = 4
  c.train.checkpoint_every_steps = 5
  c.train.keep_checkpoints = 2
  c.optimizer.learning_rate = 0.05
  c.optimizer.decay_epochs = (1,)
  c.eval.batch_size = 8
  c.eval.every_epochs = 1
  c.eval.views = [view("center", "center", size=16), view("full", "full", short_side=16),
                  view("ten_view", "ten_view", size=16)]
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return c


class SlowData(SyntheticData):
  """SyntheticData that sleeps `delay` seconds per training batch (time to send a signal)."""

  def __init__(self, delay: float, **kwargs):
    super().__init__(**kwargs)
    self.delay = delay

  def train_iterator(self, *args, **kwargs):
    import time

    inner = super().train_iterator(*args, **kwargs)
    make_batch = inner._make_batch  # noqa: SLF001

    def slow(b):
      time.sleep(self.delay)
      return make_batch(b)

    inner._make_batch = slow  # noqa: SLF001
    return inner


def main(argv=None) -> int:
  """Worker for subprocess tests: trains tiny_config with the fakes.

  python tests/fakes.py --workdir W [--set train.batch_size=16 ...] [--delay S]
      [--coordinator host:port --num-processes N --process-id I]
  Prints one line "RESULT <json>" with the results; an expected failure is main.py's
  "error: ..." (and "hint: ...") on stderr with exit status 1; SIGINT exits with 130.
  """
  import argparse
  import json
  import logging
  import sys

  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", action="append", default=[], help="key=json_value")
  parser.add_argument("--delay", type=float, default=0.0)
  parser.add_argument("--coordinator")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("spp_jax").setLevel(logging.INFO)
  from spp_jax import errors

  errors.quiet_library_errors()

  overrides = {}
  for item in args.set:
    key, _, value = item.partition("=")
    overrides[key] = json.loads(value)
  for key in ("model.spp_levels", "train.sizes", "train.size_range"):
    if isinstance(overrides.get(key), list):
      overrides[key] = tuple(overrides[key])
  config = tiny_config(**overrides)
  if args.coordinator:
    config.distributed.coordinator_address = args.coordinator
    config.distributed.num_processes = args.num_processes
    config.distributed.process_id = args.process_id

  from spp_jax.train import train_and_evaluate

  data = SlowData(args.delay) if args.delay else SyntheticData()
  try:
    results = train_and_evaluate(config, args.workdir, models=TinyModels(), data=data)
  except errors.InterruptedRun as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    return 130
  except Exception as e:  # noqa: BLE001 - as main.py: expected failures are one line
    if not errors.expected(e):
      raise
    errors.report(e)
    return 1
  print("RESULT " + json.dumps(results), flush=True)
  return 0

if __name__ == "__main__":
  raise SystemExit(main())
