"""Per-example outputs -> one host-local numpy batch (the layouts of `pipeline.py`).

`float_batch` makes today's float32 batches (data.batch_dtype = "float32"); `pixel_batch` the
uint8 ones that `on_device.py` finishes inside the steps. Both pad at the bottom and right with
zeros, fill padding slots (eval) with zeros, label 0 and each view's padded shape, and fill a
skipped training slot with a good example of the batch under mask 0.

In grain worker processes the uint8 image array is allocated in shared memory: grain hands
such an array to the main process by name, without pickling or copying it.
"""

from __future__ import annotations

import math

import numpy as np

from spp_jax.data import examples


def allocate(shape, dtype, *, shared: bool, zero: bool = True) -> np.ndarray:
  """An array for a batch; shared: a grain SharedMemoryArray (zero-filled by the OS)."""
  if shared:
    from grain.multiprocessing import SharedMemoryArray
    return SharedMemoryArray(tuple(shape), dtype=dtype)
  return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)


_PIXEL = np.dtype((np.void, 3))  # one RGB pixel as a single element


def put(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[:h, :w] = src for uint8 (h, w, 3) images. A transposed view (ten_view portraits) is
  copied pixel by pixel as 3-byte elements: about 2.5x faster than numpy's strided byte copy."""
  h, w = src.shape[:2]
  if src.flags.c_contiguous or src.dtype != np.uint8 or src.strides[2] != 1:
    dst[:h, :w] = src
  else:
    dst[:h, :w].view(_PIXEL)[..., 0] = src.view(_PIXEL)[..., 0]


def _common(b: int, nv: int, shapes, outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  sizes = np.empty((b, nv, 2), np.int32)
  sizes[:] = shapes[:nv]  # padding slots: each view's padded shape (valid for any pooling)
  label = np.zeros((b,), np.int32)
  mask = np.zeros((b,), np.float32)
  for j, out in outputs.items():
    label[j] = out[1]
    mask[j] = 1.0
  return sizes, label, mask


def float_batch(kind: str, b: int, shapes, outputs, settings) -> dict:
  """outputs: {slot: (views, label)}; train_crop views are (uint8 crop, colour factors)."""
  if kind == "train_crop" and outputs:
    # One batched colour transform for the same-size crops (skipped slots: any crop).
    order = sorted(outputs)
    fill = outputs[order[0]][0][0][0]
    crops = np.stack([outputs[j][0][0][0] if j in outputs else fill for j in range(b)])
    factors = [outputs[j][0][0][1] if j in outputs else None for j in range(b)]
    coloured = examples.finish(crops, factors, settings)
    outputs = {j: ([coloured[j]], lab) for j, (_, lab) in outputs.items()}
  h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
  nv = len(shapes)
  image = np.zeros((b, nv, h, w, 3), np.float32)
  sizes, label, mask = _common(b, nv, shapes, outputs)
  for j, (views, _) in outputs.items():
    for v, x in enumerate(views):
      image[j, v, :x.shape[0], :x.shape[1]] = x
      sizes[j, v] = x.shape[:2]
  train = kind != "eval"
  if train:
    _repeat_good(outputs, b, image, sizes, label)
  return {"image": image[:, 0] if train else image,
          "image_size": sizes[:, 0] if train else sizes, "label": label, "mask": mask}


def _repeat_good(outputs, b: int, *arrays):
  """A skipped example's slot repeats a good one with mask 0: the step sees real data whether
  or not it weights by the mask."""
  if outputs and len(outputs) < b:
    first = next(iter(outputs))
    for j in range(b):
      if j not in outputs:
        for a in arrays:
          a[j] = a[first]


def pixel_batch(kind: str, b: int, shapes, outputs, *, shared: bool,
                canvas: tuple[int, int] | None = None) -> dict:
  """uint8 batch.

  kind: "train_crop", "train_full", "ten_view" or "eval" (the other views).
  shapes: the padded (h, w) of each image sent (multiscale: one per scale); ten_view: of
    each of its 10 views, with canvas = the (Hc, Wc) its images travel in.
  outputs: {slot: (views, label, extra)}: training views are one unflipped image and
    extra = {"flip": bool}; ten_view: one canvas image and extra = {"view_offsets",
    "transposed"}; other eval views: one image per entry of shapes.
  """
  train = kind.startswith("train")
  nv = len(shapes)
  h, w = canvas or (max(s[0] for s in shapes), max(s[1] for s in shapes))
  crop = kind == "train_crop"
  shape = (b, h, w, 3) if train or kind == "ten_view" else (b, nv, h, w, 3)
  image = allocate(shape, np.uint8, shared=shared, zero=not crop)
  sizes, label, mask = _common(b, nv, shapes, outputs)
  flip = np.zeros((b,), np.bool_)
  offsets = np.zeros((b, 5, 2), np.int32)
  transposed = np.zeros((b,), np.bool_)
  for j, (views, _, extra) in outputs.items():
    if train:
      x = views[0]
      put(image[j], x)
      sizes[j, 0] = x.shape[:2]
      flip[j] = extra["flip"]
    elif "view_offsets" in extra:
      put(image[j], views[0])
      offsets[j], transposed[j] = extra["view_offsets"], extra["transposed"]
    else:
      for v, x in enumerate(views):
        put(image[j, v], x)
        sizes[j, v] = x.shape[:2]
  if crop and len(outputs) < b:
    image[[j for j in range(b) if j not in outputs]] = 0  # np.empty: no stale bytes
  if train:
    _repeat_good(outputs, b, image, sizes, label, flip)
    return {"image": image, "image_size": sizes[:, 0], "label": label, "mask": mask,
            "flip": flip}
  batch = {"image": image, "image_size": sizes, "label": label, "mask": mask}
  if kind == "ten_view":
    batch.update(view_offsets=offsets, transposed=transposed)
  return batch


def padding_counts(image_size: np.ndarray, mask: np.ndarray, shapes) -> tuple[int, int]:
  """(padding pixels, batch pixels) over the real examples (mask > 0) of a bucketed batch.

  image_size: (B, 2) or (B, V, 2); shapes: each view's padded (h, w).
  """
  sizes = np.asarray(image_size).reshape(len(mask), -1, 2)
  real = np.asarray(mask) > 0
  total = padding = 0
  for v in range(sizes.shape[1]):
    area = math.prod(shapes[v])
    valid = sizes[real, v].prod(axis=-1).sum()
    total += area * int(real.sum())
    padding += area * int(real.sum()) - int(valid)
  return padding, total
