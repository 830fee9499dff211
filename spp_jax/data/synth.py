"""Composes the multi-scale Fashion-MNIST images: one item, rescaled and tinted, on clutter.

Pure numpy + Pillow, deterministic for (seed, split, index). Every example draws its own
`np.random.Generator` from that triple, so examples can be made in any order, in any process,
and a subset of a split equals the first examples of the full split.

An example:
- canvas height and width in [min_side, max_side], size log-uniform, aspect ratio log-uniform in
  [1/max_aspect, max_aspect] (both sides clipped to the range);
- background: a random base colour, a smooth low-frequency colour field, blocky pixel noise
  (2x2 blocks keep PNG files small) and fragments of other items (random crops, tinted,
  half-transparent, any scale, may leave the canvas);
- the item: the 28x28 image rescaled so its side spans a fraction of the canvas's short side
  (log-uniform in `item_fraction`), tinted with a colour that contrasts with the background, and
  pasted at a random position with its grey levels as opacity;
- box: the tight box of the item's visible pixels, (x0, y0, x1, y1) in pixels, ends exclusive
  (the project's convention, spp_jax.ops.boxes). The TFDS data set stores it as TFDS's
  BBoxFeature does, normalised (ymin, xmin, ymax, xmax): `tfds_bbox` converts, once, in
  `make_encoded`.

The drawing pieces (`background`, `paste_fragment`, `item_alpha`, `item_color`, `visible_box`,
...) are pure functions of numbers the caller draws; the detection scenes use them too.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import zlib

import numpy as np
from PIL import Image

SPLIT_CODES = {"train": 0, "test": 1}
_ITEM_SIDE = 28
_VISIBLE = 24  # grey level above which an item pixel counts for the box


@dataclasses.dataclass(frozen=True)
class SynthOptions:
  """How the canvases are drawn; every field is data the builder config can hold."""
  min_side: int = 40
  max_side: int = 160
  max_aspect: float = 2.5
  item_fraction: tuple[float, float] = (0.3, 0.95)
  num_fragments: tuple[int, int] = (2, 5)  # inclusive range
  noise_std: tuple[float, float] = (2.0, 10.0)

  def __post_init__(self):
    if not 8 <= self.min_side <= self.max_side:
      raise ValueError(f"need 8 <= min_side <= max_side, got min_side={self.min_side}, "
                       f"max_side={self.max_side}")
    if self.max_aspect < 1:
      raise ValueError(f"max_aspect must be >= 1, got max_aspect={self.max_aspect}")
    lo, hi = self.item_fraction
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"item_fraction must satisfy 0 < lo <= hi <= 1, got {self.item_fraction}")
    if not 0 <= self.num_fragments[0] <= self.num_fragments[1] <= _MAX_FRAGMENTS:
      raise ValueError(f"num_fragments must satisfy 0 <= lo <= hi <= {_MAX_FRAGMENTS}, "
                       f"got num_fragments={self.num_fragments}")


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of one example; independent of the order examples are made in."""
  if split not in SPLIT_CODES:
    raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got split={split!r}")
  return np.random.default_rng((int(seed), SPLIT_CODES[split], int(index)))


# ----------------------------------------------------------------------------- drawing
# Pure pieces shared with the detection scenes (spp_jax/detection/scenes.py): each caller draws
# its own random numbers and passes them in.


def canvas_size(u_size: float, u_aspect: float, min_side: int, max_side: int,
                max_aspect: float) -> tuple[int, int]:
  """(height, width) from two uniforms in [0, 1): size log-uniform in [min_side, max_side],
  aspect ratio log-uniform in [1/max_aspect, max_aspect], both sides clipped to the range."""
  log_lo, log_hi = np.log(min_side), np.log(max_side)
  size = np.exp(log_lo + u_size * (log_hi - log_lo))
  aspect = max_aspect ** (2 * u_aspect - 1)
  h = int(np.clip(round(size * np.sqrt(aspect)), min_side, max_side))
  w = int(np.clip(round(size / np.sqrt(aspect)), min_side, max_side))
  return h, w


@functools.lru_cache(maxsize=8192)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) float32 linear-interpolation weights, antialiased when shrinking.

  Output pixel i samples the input at centre (i + 0.5) * n_in / n_out - 0.5 with a triangle
  filter of half-width max(1, n_in / n_out), weights normalised (Pillow's BILINEAR rule).
  Cached: the drawn sizes repeat, and two small matrix products beat a Pillow round trip.
  """
  scale = n_in / n_out
  support = max(1.0, scale)
  centers = (np.arange(n_out) + 0.5) * scale - 0.5
  weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centers[:, None]) / support)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
  """Linear resize of x (h0, w0) or (h0, w0, C) float32 to (h, w[, C])."""
  rows = _interp_matrix(h, x.shape[0])
  cols = _interp_matrix(w, x.shape[1])
  if x.ndim == 2:
    return rows @ x @ cols.T
  y = (rows @ x.reshape(x.shape[0], -1)).reshape(h, *x.shape[1:])  # (h, w0, C)
  return cols @ y  # (w, w0) @ (h, w0, C) -> (h, w, C)


def background(field: np.ndarray, noise: np.ndarray, h: int, w: int) -> np.ndarray:
  """The clutter-free canvas (h, w, 3) float32: a colour field plus blocky noise.

  field: (gh, gw, 3) float32 colours, stretched bilinearly over the canvas; noise:
  (ceil(h / 2), ceil(w / 2)) float32, one value per 2x2 block of pixels (blocks keep PNG files
  small). The canvas is drawn at even size and cropped.
  """
  hh, hw = noise.shape
  canvas = resize(field, 2 * hh, 2 * hw)
  canvas.reshape(hh, 2, hw, 2, 3)[...] += noise[:, None, :, None, None]
  return canvas[:h, :w]


def blend(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray, y: int, x: int) -> None:
  """canvas[y:, x:] = canvas * (1 - alpha) + color * alpha, clipped to the canvas, in place.

  canvas: (H, W, 3) float32; alpha: (h, w) float32 in [0, 1]; color: (3,) float32; (y, x) the
  top-left corner, which may lie off the canvas.
  """
  H, W = canvas.shape[:2]
  h, w = alpha.shape
  y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
  if y0 >= y1 or x0 >= x1:
    return
  a = alpha[y0 - y:y1 - y, x0 - x:x1 - x, None]
  region = canvas[y0:y1, x0:x1]
  region += a * (color - region)


def paste_fragment(canvas: np.ndarray, item: np.ndarray, crop, size, opacity: float, color,
                   at) -> None:
  """Blends a piece of an item into canvas, in place: the clutter of both data sets.

  item: (28, 28) uint8; crop: (top, left, height, width) of the piece; size: (h, w) it is
  resized to; opacity: the opacity of a 255 grey level; color: (3,); at: (y, x) top-left.
  """
  top, left, ch, cw = crop
  piece = item[top:top + ch, left:left + cw].astype(np.float32)
  alpha = resize(piece * np.float32(opacity / 255), *size)
  blend(canvas, alpha, np.asarray(color, np.float32), *at)


def item_alpha(item: np.ndarray, side: int) -> np.ndarray:
  """(28, 28) uint8 item -> (side, side) float32 opacity: its grey levels, a little boosted so
  the item's core is opaque."""
  return np.minimum(resize(item.astype(np.float32) * np.float32(1.25 / 255), side, side), 1.0)


def item_color(rgb, channel: int, on_bright: bool, dark: float, light: float) -> np.ndarray:
  """A saturated colour that contrasts with the background: (3,) float32.

  rgb: (3,) in [0, 1], with `channel` set to 1 so the colour is not grey. On a bright
  background it is darkened to rgb * dark, on a dark one lightened to 255 - (1 - rgb) * light.
  """
  c = np.array(rgb, np.float64)
  c[channel] = 1.0
  return (c * dark if on_bright else 255 - (1 - c) * light).astype(np.float32)


def visible_box(alpha: np.ndarray, y: int, x: int) -> np.ndarray | None:
  """The tight box of an item's visible pixels (opacity above _VISIBLE / 255) pasted at (y, x):
  (4,) int32 (x0, y0, x1, y1) in pixels, ends exclusive (the project's box convention,
  spp_jax.ops.boxes); None when no pixel is visible."""
  visible = alpha > _VISIBLE / 255
  rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
  if len(rows) == 0:
    return None
  return np.array([x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1], np.int32)


def to_uint8(canvas: np.ndarray) -> np.ndarray:
  """Rounds a float canvas to uint8 pixels."""
  canvas += 0.5
  return np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)


def tfds_bbox(box, image_hw) -> tuple[float, float, float, float]:
  """A pixel box (x0, y0, x1, y1) -> TFDS BBoxFeature order (ymin, xmin, ymax, xmax), each
  divided by the image's height or width. The one place the stored `bbox` is made."""
  x0, y0, x1, y1 = (float(v) for v in box)
  h, w = image_hw
  return (y0 / h, x0 / w, y1 / h, x1 / w)


def from_tfds_bbox(bbox: np.ndarray, image_hw) -> np.ndarray:
  """Inverse of `tfds_bbox` for many boxes: (G, 4) normalised (ymin, xmin, ymax, xmax) ->
  (G, 4) float32 pixel boxes (x0, y0, x1, y1)."""
  b = np.asarray(bbox, np.float32).reshape(-1, 4)
  h, w = image_hw
  return np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], 1).astype(np.float32)


# ----------------------------------------------------------------------------- the examples
# Uniform numbers drawn per example, in one call (a call costs more than the numbers): their
# positions in the vector.
_U_SIZE, _U_ASPECT, _U_FIELD, _U_NOISE, _U_NUM, _U_ITEM = 0, 1, 2, 7, 8, 9  # item: 7 numbers
_U_FRAG, _U_PER_FRAG, _MAX_FRAGMENTS = 16, 11, 8
_U_LEN = _U_FRAG + _U_PER_FRAG * _MAX_FRAGMENTS


def _draw_fragment(canvas: np.ndarray, item: np.ndarray, f: np.ndarray, h: int, w: int) -> None:
  """One fragment of `item` from 11 uniforms f: an 8..20 pixel crop scaled to 15..60 % of the
  short side, 30..70 % opaque, any colour, centred anywhere on the canvas."""
  ch, cw = 8 + int(13 * f[0]), 8 + int(13 * f[1])
  cy, cx = int(f[2] * (_ITEM_SIDE - ch + 1)), int(f[3] * (_ITEM_SIDE - cw + 1))
  scale = min(h, w) * (0.15 + 0.45 * f[4]) / max(ch, cw)
  fh, fw = max(int(round(ch * scale)), 2), max(int(round(cw * scale)), 2)
  paste_fragment(canvas, item, (cy, cx, ch, cw), (fh, fw), 0.3 + 0.4 * f[5], 255 * f[6:9],
                 (-(fh // 2) + int(f[9] * h), -(fw // 2) + int(f[10] * w)))


def compose(item: np.ndarray, fragment_items: np.ndarray, rng: np.random.Generator,
            opts: SynthOptions = SynthOptions()) -> tuple[np.ndarray, np.ndarray]:
  """Draws one example.

  Args:
    item: (28, 28) uint8, the item whose class is the label.
    fragment_items: (K, 28, 28) uint8, other items to cut fragments from (fragments are
      skipped when K == 0).
    rng: the example's generator (see `example_rng`).
    opts: drawing options.

  Returns:
    image (H, W, 3) uint8 and box (4,) int32 (x0, y0, x1, y1) in pixels, ends exclusive.
  """
  u = rng.random(_U_LEN)
  h, w = canvas_size(u[_U_SIZE], u[_U_ASPECT], opts.min_side, opts.max_side, opts.max_aspect)
  short = min(h, w)

  # Background: a base colour and a smooth field (a 2..6 x 2..6 grid of colours), then noise.
  base = 20 + 215 * u[_U_FIELD:_U_FIELD + 3]
  gh, gw = 2 + int(5 * u[_U_FIELD + 3]), 2 + int(5 * u[_U_FIELD + 4])
  field = base + rng.standard_normal((gh, gw, 3)) * (10 + 35 * u[_U_FIELD + 3])
  lo, hi = opts.noise_std
  noise = rng.standard_normal(((h + 1) // 2, (w + 1) // 2), dtype=np.float32)
  noise *= np.float32(lo + (hi - lo) * u[_U_NOISE])
  canvas = background(np.clip(field, 0, 255).astype(np.float32), noise, h, w)

  span = opts.num_fragments[1] - opts.num_fragments[0] + 1
  num = opts.num_fragments[0] + min(int(u[_U_NUM] * span), span - 1) if len(fragment_items) else 0
  for k in range(num):
    _draw_fragment(canvas, fragment_items[k % len(fragment_items)],
                   u[_U_FRAG + _U_PER_FRAG * k:_U_FRAG + _U_PER_FRAG * (k + 1)], h, w)

  # The item: log-uniform side, uniform position, saturated colour far from the base's brightness.
  i = u[_U_ITEM:_U_ITEM + 7]
  lo, hi = opts.item_fraction
  side = max(int(round(short * lo * (hi / lo) ** i[0])), 8)
  y, x = int(i[1] * (h - side + 1)), int(i[2] * (w - side + 1))
  alpha = item_alpha(item, side)
  blend(canvas, alpha, item_color(i[3:6], min(int(3 * i[6]), 2), base.mean() > 128,
                                  40 + 70 * i[0], 60 + 90 * i[0]), y, x)
  box = visible_box(alpha, y, x)
  if box is None:  # a blank item: the box is the pasted square
    box = np.array([x, y, x + side, y + side], np.int32)
  return to_uint8(canvas), box


def make_example(images: np.ndarray, labels: np.ndarray, index: int, *, seed: int, split: str,
                 opts: SynthOptions = SynthOptions()) -> dict:
  """Example `index` of a split: its item is images[index], fragments come from other items.

  Args:
    images: (N, 28, 28) uint8, all items of the split.
    labels: (N,) int.

  Returns:
    dict(image=(H, W, 3) uint8, label=int, box=(4,) int32 pixels (x0, y0, x1, y1),
    item_index=int).
  """
  rng = example_rng(seed, split, index)
  num = len(images)
  others = rng.integers(0, num, size=opts.num_fragments[1])
  image, box = compose(images[index], images[others], rng, opts)
  return {"image": image, "label": int(labels[index]), "box": box, "item_index": int(index)}


def encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 (H, W, 3) image.

  Huffman coding only (zlib level 1): faster than Pillow's default for these noisy canvases,
  where string matching finds little, and the files are about the same size.
  """
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1,
                              compress_type=zlib.Z_HUFFMAN_ONLY)
  return buf.getvalue()


# ----------------------------------------------------------------------------- batch making
# Module-level state for worker processes (set once per worker by `init_worker`).
_WORKER: dict = {}


def init_worker(images: np.ndarray, labels: np.ndarray, seed: int, split: str,
                opts: SynthOptions) -> None:
  """Pool initializer: keeps the split's items in the worker."""
  _WORKER.update(images=images, labels=labels, seed=seed, split=split, opts=opts)


def make_encoded(indices) -> list[tuple[int, bytes, int, tuple[float, float, float, float]]]:
  """Examples `indices` of the worker's split as TFDS feature values: (index, png, label,
  bbox), bbox in BBoxFeature order (ymin, xmin, ymax, xmax), normalised (`tfds_bbox`)."""
  out = []
  for i in indices:
    ex = make_example(_WORKER["images"], _WORKER["labels"], int(i), seed=_WORKER["seed"],
                      split=_WORKER["split"], opts=_WORKER["opts"])
    out.append((int(i), encode_png(ex["image"]), ex["label"],
                tfds_bbox(ex["box"], ex["image"].shape[:2])))
  return out
