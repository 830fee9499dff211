"""The device half of the input pipeline: uint8 host batches -> the float32 inputs of the steps.

With data.batch_dtype = "uint8" the host sends each image once, as uint8 pixels; conversion,
mean/std normalisation, colour alteration, flips and the test views' crops happen here, inside
the jitted steps. Pure jittable functions; the static parts (mean, std, the view) come from the
checked settings, the per-batch parts from the batch. A float32 batch (data.batch_dtype =
"float32", made on the host as before) passes through unchanged, so a step can call these
unconditionally.

  train_batch(batch, data, key) -> batch     # image (B, H, W, 3) float32
  eval_batch(batch, view, data) -> batch     # image (B, V, H, W, 3) float32, image_size (B, V, 2)

uint8 host layouts (B = batch, V = the view's number of views):
  training:        image (B, H, W, 3), image_size (B, 2), flip (B,) bool: the image is to be
                   mirrored (inside its own width). Padding cells are 0.
  eval center/full: image (B, 1, H, W, 3), image_size (B, 1, 2).
  eval ten_view:   image (B, Hc, Wc, 3): each resized image once (portrait ones transposed, very
                   long ones compacted to the bands its crops use); view_offsets (B, 5, 2) int32
                   (top, left) of the centre and four corner crops in it; transposed (B,) bool;
                   image_size (B, 10, 2).
  eval multiscale: image (B, S, H, W, 3), one image per scale (the flips are made here),
                   image_size (B, S, 2).

What comes out equals what the host made before (data.batch_dtype = "float32") for the same
examples: the same pixels normalised with the same float32 arithmetic, padding cells and padding
examples (mask 0) exactly 0, views in the same order. Colour alteration is the same affine map
per image (`transforms.apply_colors`), with its factors drawn here from `key`.

Randomness: `key` should be a function of (seed, step) only, e.g.
`jax.random.fold_in(base_key, step)`. Example i of the global batch draws from
`fold_in(key, i)`, so the factors do not depend on how the batch is sharded over devices or
processes, and a resumed run draws the same ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax.data.settings import DataSettings, ViewSettings, data_settings, view_settings

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _constants(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """float32 mean and 1 / std, computed exactly as the host path computes them."""
  inv = 1.0 / np.asarray(std, np.float64)
  return np.asarray(mean, np.float64).astype(np.float32), inv.astype(np.float32)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """(x - mean) / std of uint8 (..., 3) images, as float32 (bitwise the host's formula)."""
  m, inv = _constants(mean, std)
  return (images.astype(jnp.float32) - m) * inv


def valid_mask(sizes: jax.Array, height: int, width: int) -> jax.Array:
  """(N, H, W, 1) bool: (y, x) lies inside example i's own (h_i, w_i). sizes: (N, 2) int."""
  sizes = sizes.astype(jnp.int32)
  rows = jnp.arange(height, dtype=jnp.int32)[None, :] < sizes[:, 0:1]
  cols = jnp.arange(width, dtype=jnp.int32)[None, :] < sizes[:, 1:2]
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def flip_within(images: jax.Array, widths: jax.Array, flip: jax.Array | None = None) -> jax.Array:
  """Mirrors each image inside its own width (padding stays at the right).

  images: (N, H, W, C); widths: (N,) int; flip: (N,) bool, or None to flip every image.
  """
  n, _, w, _ = images.shape
  cols = jnp.arange(w, dtype=jnp.int32)[None, :]
  widths = widths.astype(jnp.int32)[:, None]
  do = cols < widths if flip is None else (cols < widths) & flip[:, None]
  index = jnp.where(do, widths - 1 - cols, cols)  # (N, W)
  return jnp.take_along_axis(images, index[:, None, :, None], axis=2)


def colour_factors(key: jax.Array, batch: int, strength: float) -> jax.Array:
  """(B, 3) brightness, contrast, saturation factors, uniform in [1 - s, 1 + s]; row i from
  fold_in(key, i)."""
  def one(i):
    return jax.random.uniform(jax.random.fold_in(key, i), (3,), jnp.float32,
                              1.0 - strength, 1.0 + strength)
  return jax.vmap(one)(jnp.arange(batch, dtype=jnp.uint32))


def jitter_normalize(images: jax.Array, factors: jax.Array, mean, std,
                     sizes: jax.Array | None = None) -> jax.Array:
  """Colour alteration then normalisation as one affine map per image (`apply_colors`).

  images: (B, H, W, 3) uint8, zero outside each image's own size; factors: (B, 3);
  sizes: (B, 2) valid (h, w), or None when every image fills the batch shape.
  """
  b_, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  count = (jnp.full((b_,), h * w, jnp.float32) if sizes is None
           else sizes[:, 0].astype(jnp.float32) * sizes[:, 1].astype(jnp.float32))
  channel_means = jnp.sum(x, axis=(1, 2)) / count[:, None]  # padding cells are 0
  m32, inv = _constants(mean, std)
  b, c, s = factors[:, 0], factors[:, 1], factors[:, 2]
  m = b * (channel_means @ LUMA)
  luma_rows = jnp.asarray(np.outer(LUMA, np.ones(3, np.float32)))
  matrix = ((c * b * (1 - s))[:, None, None] * luma_rows
            + (c * b * s)[:, None, None] * jnp.eye(3, dtype=jnp.float32)) * inv
  offset = ((m * (1 - c))[:, None] - m32) * inv
  return jnp.einsum("bhwc,bcd->bhwd", x, matrix) + offset[:, None, None, :]


def train_images(images: jax.Array, *, mean, std, color_jitter: float, key: jax.Array | None,
                 flip: jax.Array | None = None, image_size: jax.Array | None = None
                 ) -> jax.Array:
  """The training inputs: uint8 (B, H, W, 3) -> float32 (B, H, W, 3).

  flip: (B,) bool, mirrors those images (inside image_size's width when given);
  color_jitter > 0 draws factors from `key`; image_size: (B, 2), cells outside are set to 0.
  """
  if flip is not None:
    if image_size is None:
      images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    else:
      images = flip_within(images, image_size[:, 1], flip)
  if color_jitter > 0:
    factors = colour_factors(key, images.shape[0], color_jitter)
    out = jitter_normalize(images, factors, mean, std, image_size)
  else:
    out = normalize(images, mean, std)
  if image_size is not None:
    out = jnp.where(valid_mask(image_size, *images.shape[1:3]), out, 0.0)
  return out


def train_batch(batch: dict, data, key: jax.Array | None, *, padded: bool = True) -> dict:
  """A training batch with float32 images (uint8 in: `train_images`; float32: unchanged).

  data: config.data or its `DataSettings`; key: from (seed, step), see the module doc.
  padded: False when every image fills the batch shape (crop batches): flips and
  normalisation then skip the per-example sizes, which cost a gather and a mask per step
  (about 2 GB of memory traffic for a ZF-5 step at 224 on TPU, `python -m spp_jax.plan`).
  """
  if batch["image"].dtype != jnp.uint8:
    return batch
  s = data if isinstance(data, DataSettings) else data_settings(data)
  out = {k: v for k, v in batch.items() if k != "flip"}
  out["image"] = train_images(batch["image"], mean=s.mean, std=s.std,
                              color_jitter=s.color_jitter, key=key, flip=batch.get("flip"),
                              image_size=batch.get("image_size") if padded else None)
  return out


# ----------------------------------------------------------------------------- test views


def ten_view_crops(canvas: jax.Array, offsets: jax.Array, transposed: jax.Array, size: int
                   ) -> jax.Array:
  """The 10 views (centre, 4 corners, the same 5 mirrored) cut from each image's canvas.

  canvas: (B, Hc, Wc, C); offsets: (B, 5, 2) int (top, left) in the canvas; transposed: (B,)
  bool, the canvas holds the image transposed. Returns (B, 10, size, size, C).
  """
  c = canvas.shape[-1]

  def crops_of(image, offs):
    return jax.vmap(lambda o: lax.dynamic_slice(image, (o[0], o[1], 0), (size, size, c)))(offs)

  crops = jax.vmap(crops_of)(canvas, offsets.astype(jnp.int32))
  crops = jnp.where(transposed[:, None, None, None, None], jnp.swapaxes(crops, 2, 3), crops)
  return jnp.concatenate([crops, crops[:, :, :, ::-1]], axis=1)


def eval_images(batch: dict, view: ViewSettings, *, mean, std) -> tuple[jax.Array, jax.Array]:
  """(image (B, V, H, W, 3) float32, image_size (B, V, 2)) of a uint8 eval batch."""
  images, sizes = batch["image"], batch["image_size"]
  if view.kind == "ten_view":
    images = ten_view_crops(images, batch["view_offsets"], batch["transposed"], view.size)
  elif view.kind == "multiscale" and view.flip:
    b, n = images.shape[:2]
    flat = images.reshape((b * n,) + images.shape[2:])
    mirrored = flip_within(flat, sizes.reshape(b * n, 2)[:, 1]).reshape(images.shape)
    images = jnp.concatenate([images, mirrored], axis=1)
    sizes = jnp.concatenate([sizes, sizes], axis=1)
  b, v, h, w = images.shape[:4]
  out = normalize(images, mean, std)
  keep = (batch["mask"] > 0)[:, None, None, None, None]
  if view.bucketed:
    keep = keep & valid_mask(sizes.reshape(b * v, 2), h, w).reshape(b, v, h, w, 1)
  return jnp.where(keep, out, 0.0), sizes


def eval_batch(batch: dict, view, data) -> dict:
  """An eval batch in today's layout: image (B, V, H, W, 3) float32, image_size (B, V, 2).

  view: one config.eval.views entry or its `ViewSettings`; data: config.data or `DataSettings`.
  A float32 batch passes through unchanged.
  """
  if batch["image"].dtype != jnp.uint8:
    return batch
  s = data if isinstance(data, DataSettings) else data_settings(data)
  v = view if isinstance(view, ViewSettings) else view_settings(view, s)
  image, sizes = eval_images(batch, v, mean=s.mean, std=s.std)
  out = {k: x for k, x in batch.items() if k not in ("view_offsets", "transposed")}
  out.update(image=image, image_size=sizes)
  return out
