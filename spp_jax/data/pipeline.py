"""Training and evaluation batches with grain: plan -> read -> decode (Pillow) -> views -> batch.

The pipeline is a `grain.MapDataset` over the steps of a batch plan (`plan.py`), mapped by a
picklable `BatchMaker` that reads the step's records from the TFDS array_record source,
decodes them with Pillow, applies the training transforms or the test views, and pads them
into one host-local numpy batch. `to_iter_dataset` prefetches in threads; with
data.num_workers > 0, `mp_prefetch` makes batches in worker processes.

Batch layouts (B = the host-local batch size, `batch_size` in the functions below):
  training, crop:       image (B, S, S, 3), S = the epoch's size; image_size (B, 2) = S
  training, full image: image (B, Hb, Wb, 3), the step's bucket; image_size (B, 2) true sizes
  evaluation:           image (B, V, H, W, 3); image_size (B, V, 2); V = 1 (center, full),
                        10 (ten_view), len(scales) (multiscale, x2 with flip;
                        feature_multiview: its images, one per scale, unflipped)
  all:                  label (B,) int32; mask (B,) float32, 0 for padding slots and for
                        skipped (undecodable or rejected) examples.
Images are normalised ((x - mean) / std) and zero-padded at the bottom and right. Padding slots
(eval) are zeros with label 0 and image_size = their view's padded shape; a skipped training
example's slot repeats a good example of the batch with mask 0.

data.batch_dtype = "uint8": the batches carry uint8 pixels, each image once, and the steps
finish them with `on_device.train_batch` / `on_device.eval_batch` (layouts in `on_device.py`):
training adds flip (B,) bool; ten_view sends one canvas per image with its crop offsets;
multiscale sends one image per scale (the device mirrors them). The device's output equals the
float32 batches above.

Multi-scale layout: view v is the whole image resized so its short side is scales[v], in the
step's bucket scaled to that scale (with view.flip, views V/2.. are the same images flipped);
all views of a batch are padded to the largest scale's bucket (H, W). `multiscale_view_shapes`
gives each view's own padded shape, so an evaluator can slice `image[:, v, :h_v, :w_v]` and
run fewer pixels per scale.

Randomness: the plan's shuffle comes from (seed, epoch); each example's augmentation from
(seed, epoch, step, global slot), so batches are the same for any number of workers and the
same examples get the same crops for any number of processes.

Iterator state: {"step": k, ...}. Batch k is a pure function of the plan and k, so restoring
rebuilds the pipeline from step k (also with a different number of workers).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from spp_jax.data import assemble, examples, plan as plan_lib, sources, transforms
from spp_jax.data.buckets import example_buckets
from spp_jax.data.iterator import BatchIterator
from spp_jax.data.settings import (DataSettings, ViewSettings, check_min_size, data_settings,
                                   view_settings)


# ----------------------------------------------------------------------------- batch maker


@dataclasses.dataclass
class BatchMaker:
  """Makes the host-local batch of one plan step. Pickled to grain workers (not the source).

  kind: "train_crop", "train_full" or "eval".
  """
  settings: DataSettings
  split: str
  kind: str
  seed: int
  epoch: int
  slot_offset: int  # global slot of this process's first column
  out_size: int = 0  # train_crop: the epoch's size
  short_side: int = 0  # train_full: the epoch's short side
  buckets: tuple[tuple[int, int], ...] = ()  # train_full: buckets at short_side
  view: ViewSettings | None = None
  view_buckets: tuple[tuple[tuple[int, int], ...], ...] = ()  # eval: per view scale
  process_count: int = 1
  shared_memory: bool = False  # uint8 images allocated in shared memory (grain workers)

  def __post_init__(self):
    self._source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # reopened in each process
    return state

  def source(self) -> sources.Source:
    if self._source is None:
      self._source = sources.open_source(self.settings, self.split,
                                         process_count=self.process_count)
    return self._source

  # -- reading

  def _draft(self) -> int | None:
    """The smallest short side the transforms need: JPEGs may decode at reduced size."""
    s = self.settings
    if self.kind == "train_crop":
      # The crop (crop_size of the image at resize_short) is resampled to out_size: the source
      # needs a short side of resize_short * out_size / crop_size at most.
      if s.resize_short is None:
        return None
      return math.ceil(s.resize_short * min(1.0, self.out_size / s.crop_size))
    if self.kind == "train_full":
      return self.short_side
    v = self.view
    if v.per_scale:
      return max(v.scales)
    return v.short_side

  def _decode(self, source, record, index):
    """uint8 image and label, or raises sources.ReadError naming the example."""
    try:
      decode = (transforms.decode_cv2 if self.settings.decoder == "opencv"
                else transforms.decode_pil)
      image = decode(record[source.image_key], draft_short_side=self._draft())
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
      raise sources.ReadError(source.describe(index), e) from e
    return image, int(record[source.label_key])

  def _records(self, source, indices):
    """Records of `indices`, None where reading fails (or raises under bad_image="error")."""
    try:
      return source.read(indices)
    except sources.ReadError:
      out = []
      for i in indices:
        try:
          out.append(source.read_one(i))
        except sources.ReadError as e:
          if self.settings.bad_image == "error":
            raise ValueError(f"unreadable example: {e} (data.bad_image='error')") from e
          out.append(e)
      return out

  # -- per example

  @property
  def pixels(self) -> bool:
    return self.settings.batch_dtype == "uint8"

  def _pixel_views(self, image, rng, bucket):
    """(views, extra) of the uint8 layout."""
    s = self.settings
    if self.kind == "train_crop":
      out, flip = examples.train_crop_pixels(image, s, self.out_size, rng)
      return [out], {"flip": flip}
    if self.kind == "train_full":
      out, flip = examples.full_image_pixels(image, s, self.short_side, self.buckets[bucket], rng)
      return [out], {"flip": flip}
    if self.view.kind == "ten_view":
      out, offsets, transposed = examples.ten_view_canvas(image, s, self.view)
      return [out], {"view_offsets": offsets, "transposed": transposed}
    return examples.eval_pixels(image, s, self.view, [b[bucket] for b in self.view_buckets]), {}

  def _views(self, image, rng, bucket):
    s = self.settings
    if self.kind == "train_crop":  # uint8 + colour factors: coloured per batch in _assemble
      return [examples.train_crop_uint8(image, s, self.out_size, rng)]
    if self.kind == "train_full":
      return [examples.full_image(image, s, self.short_side, self.buckets[bucket], rng)]
    return examples.eval_views(image, s, self.view, [b[bucket] for b in self.view_buckets])

  def view_shapes(self, bucket: int) -> list[tuple[int, int]]:
    """The padded shape of each view (multiscale: the bucket at that view's scale)."""
    if self.kind == "train_crop":
      return [(self.out_size, self.out_size)]
    if self.kind == "train_full":
      return [self.buckets[bucket]]
    if self.view.kind in ("center", "ten_view"):
      return [(self.view.size, self.view.size)] * self.view.num_views
    shapes = [b[bucket] for b in self.view_buckets]
    return shapes * (2 if self.view.flip and not self.pixels else 1)

  def __call__(self, item) -> dict:
    t, row, bucket = item
    source = self.source()
    valid = [j for j in range(len(row)) if row[j] >= 0]
    records = self._records(source, [int(row[j]) for j in valid])
    outputs: dict[int, tuple[list[np.ndarray], int]] = {}
    skipped, rejected = [], []
    for j, record in zip(valid, records):
      index = int(row[j])
      rng = (np.random.default_rng((self.seed, self.epoch, t, self.slot_offset + j))
             if self.kind != "eval" else None)
      try:
        if isinstance(record, Exception):
          raise record
        image, label = self._decode(source, record, index)
      except sources.ReadError as e:
        if self.settings.bad_image == "error":
          raise ValueError(f"undecodable image: {e} (data.bad_image='error')") from e
        skipped.append(str(e))
        continue
      try:
        if self.pixels:
          views, extra = self._pixel_views(image, rng, bucket)
          outputs[j] = (views, label, extra)
        else:
          outputs[j] = (self._views(image, rng, bucket), label)
      except examples.SmallImage as e:
        rejected.append(f"{source.describe(index)}: {e}")
    return self._assemble(row, bucket, outputs, skipped, rejected)

  def _assemble(self, row, bucket, outputs, skipped, rejected) -> dict:
    b = len(row)
    shapes = self.view_shapes(bucket)
    if not self.pixels:
      batch = assemble.float_batch(self.kind, b, shapes, outputs, self.settings)
    else:
      kind, canvas = self.kind, None
      if kind == "eval" and self.view.kind == "ten_view":
        kind, canvas = "ten_view", examples.ten_view_canvas_shape(self.view)
      batch = assemble.pixel_batch(kind, b, shapes, outputs, shared=self.shared_memory,
                                   canvas=canvas)
    batch["_skipped"] = skipped or None  # popped by BatchIterator (names for the log)
    batch["_rejected"] = rejected or None
    return batch

  @property
  def bucketed(self) -> bool:
    return self.kind == "train_full" or (self.kind == "eval" and self.view.bucketed)


# ----------------------------------------------------------------------------- buckets


def full_short_side(settings: DataSettings, image_size: int) -> int:
  """Full-image training at the epoch's size: short side scaled by image_size / crop_size."""
  return max(1, round(settings.full_short_side * image_size / settings.crop_size))


def multiscale_view_shapes(data_cfg, view, padded_shape: tuple[int, int]
                           ) -> list[tuple[int, int]]:
  """Per view of a multi-scale batch, the padded shape that holds that view's images
  (feature_multiview: per image sent, one per scale).

  padded_shape: the batch's (H, W) (image.shape[2:4]), i.e. its bucket at the largest scale.
  """
  s = data_settings(data_cfg)
  v = view_settings(view, s)
  if not v.per_scale:
    raise ValueError(f"view {v.name!r} is {v.kind!r}, not multiscale or feature_multiview")
  top = transforms.scale_buckets(s.buckets, s.full_short_side, max(v.scales))
  matches = [k for k, b in enumerate(top) if tuple(b) == tuple(padded_shape)]
  if not matches:
    raise ValueError(f"padded_shape={padded_shape} is not a bucket of view {v.name!r} at "
                     f"scale {max(v.scales)}: {top}")
  k = matches[0]
  shapes = [transforms.scale_buckets(s.buckets, s.full_short_side, sc)[k] for sc in v.scales]
  return shapes * (2 if v.flip else 1)


# ----------------------------------------------------------------------------- public API


def _shared(s: DataSettings) -> bool:
  """uint8 batches made in grain workers are written straight into shared memory."""
  return s.num_workers > 0 and s.batch_dtype == "uint8"


def _check_batch(batch_size: int, process_index: int, process_count: int):
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size (per process) must be an int >= 1, got {batch_size!r}")
  plan_lib._check_process(process_index, process_count)


def train_iterator(data_cfg, *, batch_size: int, image_size: int, epoch: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   mode: str | None = None) -> BatchIterator:
  """One training epoch of host-local batches (the remainder is dropped).

  Args:
    data_cfg: config.data.
    batch_size: examples per batch on this process (global batch / process_count).
    image_size: the epoch's size. Crop mode: crops of data.crop_size are resized to it (the
      paper's multi-size training: 224 and 180). Full-image mode: the short side is
      data.full_image.short_side * image_size / crop_size, buckets scaled alike.
    epoch, seed: the shuffle and the augmentation are functions of both.
    process_index, process_count: this process's share (jax.process_index/count).
    mode: "crop" or "full_image"; None reads data.mode (default "crop").
  """
  s = data_settings(data_cfg)
  _check_batch(batch_size, process_index, process_count)
  mode = s.mode if mode is None else mode
  if mode not in ("crop", "full_image"):
    raise ValueError(f"mode must be 'crop' or 'full_image', got mode={mode!r}")
  check_min_size("image_size", int(image_size), s.min_size)
  global_batch = batch_size * process_count
  split = s.train_split
  n = len(sources.open_source(s, split, process_count=process_count))
  common = dict(settings=s, split=split, seed=int(seed), epoch=int(epoch),
                slot_offset=process_index * batch_size, process_count=process_count,
                shared_memory=_shared(s))
  if mode == "crop":
    full = plan_lib.train_plan(n, global_batch, seed=seed, epoch=epoch)
    maker = BatchMaker(kind="train_crop", out_size=int(image_size), **common)
  else:
    buckets = example_buckets(s, split, process_count=process_count)
    full = plan_lib.train_plan(n, global_batch, seed=seed, epoch=epoch, buckets=buckets)
    short = full_short_side(s, int(image_size))
    check_min_size("full-image short side", short, s.min_size)
    maker = BatchMaker(kind="train_full", short_side=short,
                       buckets=transforms.scale_buckets(s.buckets, s.full_short_side, short),
                       **common)
  identity = dict(kind=maker.kind, split=split, epoch=int(epoch), seed=int(seed),
                  image_size=int(image_size), global_batch=global_batch)
  return BatchIterator(maker, full.local(process_index, process_count), identity=identity)


def eval_iterator(data_cfg, view, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> BatchIterator:
  """Batches of one evaluation view over data.eval_split: every example exactly once over all
  processes, the last batch (of each bucket) padded with mask 0. `len(it)` batches on every
  process."""
  s = data_settings(data_cfg)
  v = view_settings(view, s)
  _check_batch(batch_size, process_index, process_count)
  global_batch = batch_size * process_count
  split = s.eval_split
  n = len(sources.open_source(s, split, process_count=process_count))
  buckets, view_buckets = None, ()
  if v.bucketed:
    buckets = example_buckets(s, split, process_count=process_count)
    scales = (v.short_side,) if v.kind == "full" else v.scales
    view_buckets = tuple(transforms.scale_buckets(s.buckets, s.full_short_side, sc)
                         for sc in scales)
  full = plan_lib.eval_plan(n, global_batch, buckets=buckets)
  maker = BatchMaker(settings=s, split=split, kind="eval", seed=0, epoch=0,
                     slot_offset=process_index * batch_size, view=v,
                     view_buckets=view_buckets, process_count=process_count,
                     shared_memory=_shared(s))
  identity = dict(kind="eval", view=v.name, split=split, global_batch=global_batch)
  return BatchIterator(maker, full.local(process_index, process_count), identity=identity)


def steps_per_epoch(data_cfg, batch_size: int, *, mode: str | None = None) -> int:
  """Training steps per epoch for a global batch size (full-image mode: per-bucket remainders
  are dropped, so it depends on the image shapes)."""
  s = data_settings(data_cfg)
  mode = s.mode if mode is None else mode
  n = num_examples(s, s.train_split)
  if mode == "crop":
    return n // int(batch_size)
  buckets = example_buckets(s, s.train_split)
  counts = collections.Counter(buckets.tolist())
  return sum(c // int(batch_size) for c in counts.values())


def num_eval_batches(data_cfg, view, batch_size: int, *, process_count: int = 1) -> int:
  """len(eval_iterator(...)) without building it (batch_size per process)."""
  s = data_settings(data_cfg)
  v = view_settings(view, s)
  global_batch = batch_size * process_count
  n = num_examples(s, s.eval_split)
  if not v.bucketed:
    return -(-n // global_batch)
  counts = collections.Counter(example_buckets(s, s.eval_split).tolist())
  return sum(-(-c // global_batch) for c in counts.values())


def num_examples(data_cfg, split: str) -> int:
  return sources.num_examples(data_cfg, split)


def num_classes(data_cfg) -> int:
  return sources.num_classes(data_cfg)
