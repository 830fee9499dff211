"""Box geometry for detection: projection onto feature maps, scale choice, IoU, box regression.

Conventions (one for the whole project):
- Pixel boxes are (x0, y0, x1, y1) in continuous pixel coordinates of an image: (x0, y0) is the
  top-left corner, (x1, y1) the bottom-right one, so a box covering pixel columns 0..w-1 is
  x0 = 0, x1 = w, and its width is x1 - x0. PASCAL VOC's 1-based inclusive (xmin..xmax) is
  (xmin - 1, xmax) here (TFDS voc stores xmin / width unchanged: subtract 1 pixel when reading
  it, see spp_jax.detection.scenes), and IoU computed here equals the VOC devkit's "+1" IoU on
  the original numbers. TFDS's BBoxFeature order, normalised (ymin, xmin, ymax, xmax), is
  met only at the TFDS boundary: spp_jax.data.synth.tfds_bbox and from_tfds_bbox convert.
- Feature windows are (y0, x0, y1, x1) half-open, 0-based feature-map cells, the format of
  `roi_spatial_pyramid_pool`.

The functions take numpy or JAX arrays and return the same kind.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _check_boxes(name: str, boxes) -> None:
  shape = np.shape(boxes)
  if len(shape) != 2 or shape[1] != 4:
    raise ValueError(f"{name} must have shape (R, 4) (x0, y0, x1, y1), got shape {shape}")


def _float_pair(names: tuple[str, str], a, b):
  """Checks two (R, 4) arrays; returns the array module and both as float32."""
  _check_boxes(names[0], a)
  _check_boxes(names[1], b)
  xp = _xp(a, b)
  return xp, xp.asarray(a, xp.float32), xp.asarray(b, xp.float32)


# ----------------------------------------------------------------------------- projection


def project_boxes(boxes, stride: int, feature_size: Sequence[int]):
  """Pixel boxes -> feature-map windows (docs/paper.md §6 step 3).

  With S = stride, the paper's rule in 1-based feature coordinates is: left/top edge
  x' = floor(x0 / S) + 1, right/bottom edge x' = ceil(x1 / S) - 1, both inclusive. As 0-based
  half-open cells that is

      cells [floor(x0 / S), ceil(x1 / S) - 1)      (the same for y)

  then clamped to the map: start into 0..size-1, end into start+1..size, so every window keeps
  at least one cell (a box narrower than about 2S would otherwise be empty).

  Args:
    boxes: (R, 4) pixel boxes (x0, y0, x1, y1) in the image the feature map was computed from
      (scale them first if the image was resized).
    stride: S, the product of the conv stack's strides (16 for ZF-5).
    feature_size: (fh, fw) of the feature map (the image's own valid part, not padding).

  Returns:
    (R, 4) int32 windows (y0, x0, y1, x1) with 0 <= y0 < y1 <= fh and 0 <= x0 < x1 <= fw.
  """
  _check_boxes("boxes", boxes)
  if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
    raise ValueError(f"stride must be a positive int, got stride={stride!r}")
  if len(feature_size) != 2 or min(int(s) for s in feature_size) < 1:
    raise ValueError(f"feature_size must be (fh, fw) >= 1, got feature_size={feature_size!r}")
  xp = _xp(boxes)
  fh, fw = (int(s) for s in feature_size)
  b = xp.asarray(boxes, xp.float32) / stride
  start = xp.floor(b[:, :2]).astype(xp.int32)        # (x0, y0)
  end = (xp.ceil(b[:, 2:]) - 1).astype(xp.int32)     # (x1, y1), exclusive
  size = xp.asarray([fw, fh], xp.int32)
  start = xp.clip(start, 0, size - 1)
  end = xp.clip(end, start + 1, size)
  return xp.stack([start[:, 1], start[:, 0], end[:, 1], end[:, 0]], axis=1).astype(xp.int32)


def select_scales(boxes, factors: Sequence[float], target: float = 224.0):
  """The scale at which each window's area is closest to target^2 (docs/paper.md §6
  step 2).

  Args:
    boxes: (R, 4) pixel boxes in the original image.
    factors: resize factor of every scale (scaled image = factor x original), e.g.
      short_side_s / short_side_original for the paper's {480, 576, 688, 864, 1200}.
    target: the network's base size (224).

  Returns:
    (R,) int32 index into factors; ties go to the first.
  """
  _check_boxes("boxes", boxes)
  if len(factors) == 0 or min(factors) <= 0:
    raise ValueError(f"factors must be a non-empty sequence of positive floats, got {factors!r}")
  xp = _xp(boxes)
  areas = box_area(boxes)
  f = xp.asarray(factors, xp.float32)
  return xp.argmin(xp.abs(areas[:, None] * f[None, :] ** 2 - target**2), axis=1).astype(xp.int32)


# ----------------------------------------------------------------------------- overlap


def box_area(boxes):
  """(R, 4) -> (R,) areas (x1 - x0) * (y1 - y0), 0 for degenerate boxes."""
  xp = _xp(boxes)
  b = xp.asarray(boxes, xp.float32)
  return xp.maximum(b[:, 2] - b[:, 0], 0) * xp.maximum(b[:, 3] - b[:, 1], 0)


def box_iou(a, b):
  """Intersection over union of every pair: (A, 4), (B, 4) -> (A, B); 0 where the union is 0."""
  xp, a, b = _float_pair(("a", "b"), a, b)
  lo = xp.maximum(a[:, None, :2], b[None, :, :2])
  hi = xp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = xp.maximum(hi - lo, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0).astype(xp.float32)


def clip_boxes(boxes, image_size: Sequence[int]):
  """Clips (R, 4) pixel boxes to an image of (h, w)."""
  xp = _xp(boxes)
  h, w = image_size
  b = xp.asarray(boxes, xp.float32)
  hi = xp.asarray([w, h, w, h], xp.float32)
  return xp.clip(b, 0, hi)


# ----------------------------------------------------------------------------- regression


def _centres_and_sizes(boxes):
  """(R, 4) (x0, y0, x1, y1) -> centre x, centre y, width, height, each (R,)."""
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(proposals, targets):
  """R-CNN box-regression targets (tx, ty, tw, th) of targets relative to proposals.

  tx = (gx - px) / pw, ty = (gy - py) / ph, tw = log(gw / pw), th = log(gh / ph), with centres
  (x0 + x1) / 2 and sizes x1 - x0. proposals, targets: (R, 4) -> (R, 4) float32.
  """
  xp, p, g = _float_pair(("proposals", "targets"), proposals, targets)
  px, py, pw, ph = _centres_and_sizes(p)
  gx, gy, gw, gh = _centres_and_sizes(g)
  if xp is np and ((pw <= 0) | (ph <= 0) | (gw <= 0) | (gh <= 0)).any():
    raise ValueError("encode_boxes needs boxes with positive width and height")
  return xp.stack([(gx - px) / pw, (gy - py) / ph, xp.log(gw / pw), xp.log(gh / ph)], axis=1)


def decode_boxes(proposals, deltas, max_log_scale: float = float(np.log(1000.0 / 16))):
  """Inverse of `encode_boxes`: applies (R, 4) deltas to (R, 4) proposals -> (R, 4) boxes.

  tw, th are clipped at max_log_scale so a wild prediction cannot overflow exp.
  """
  xp, p, d = _float_pair(("proposals", "deltas"), proposals, deltas)
  px, py, pw, ph = _centres_and_sizes(p)
  cx, cy = px + d[:, 0] * pw, py + d[:, 1] * ph
  w = pw * xp.exp(xp.minimum(d[:, 2], max_log_scale))
  h = ph * xp.exp(xp.minimum(d[:, 3], max_log_scale))
  return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)


__all__ = ["project_boxes", "select_scales", "box_area", "box_iou", "clip_boxes", "encode_boxes",
           "decode_boxes"]
