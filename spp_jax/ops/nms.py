"""Greedy non-maximum suppression (docs/paper.md §6 step 5: IoU 0.3 in the paper).

Greedy rule, as in R-CNN / SPP-net: visit boxes by decreasing score (equal scores in input
order), keep a box unless it overlaps an already kept box by IoU > threshold.
`nms` is numpy (the evaluation path, variable output); `nms_mask` is a jit-able JAX version with
a fixed-size output for use inside compiled code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.ops.boxes import box_iou


def _check(boxes, scores, threshold):
  if np.ndim(boxes) != 2 or np.shape(boxes)[1] != 4:
    raise ValueError(f"boxes must have shape (R, 4), got shape {np.shape(boxes)}")
  if np.shape(scores) != (np.shape(boxes)[0],):
    raise ValueError(f"scores must have shape (R,) = ({np.shape(boxes)[0]},), "
                     f"got shape {np.shape(scores)}")
  if not 0.0 <= float(threshold) <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got threshold={threshold!r}")


def nms(boxes, scores, threshold: float = 0.3, max_output: int | None = None) -> np.ndarray:
  """Indices of the boxes greedy NMS keeps, best first.

  Args:
    boxes: (R, 4) pixel boxes (x0, y0, x1, y1).
    scores: (R,) scores.
    threshold: a box is suppressed by a kept box when their IoU is > threshold.
    max_output: stop after this many kept boxes (None: all).

  Returns:
    (K,) int64 indices into boxes, in decreasing score order.
  """
  _check(boxes, scores, threshold)
  boxes = np.asarray(boxes, np.float32)
  scores = np.asarray(scores)
  order = np.argsort(-scores, kind="stable")
  keep = []
  limit = len(order) if max_output is None else int(max_output)
  while order.size and len(keep) < limit:
    i = order[0]
    keep.append(i)
    rest = order[1:]
    iou = box_iou(boxes[i][None], boxes[rest])[0]
    order = rest[iou <= threshold]
  return np.asarray(keep, np.int64)


@jax.jit
def nms_mask(boxes: jax.Array, scores: jax.Array, threshold: float = 0.3) -> jax.Array:
  """Jit-able greedy NMS: (R, 4), (R,) -> (R,) bool, True for the boxes kept.

  Same result as `nms` (without max_output). O(R^2) memory for the IoU matrix, one pass over
  the boxes in score order.
  """
  r = boxes.shape[0]
  order = jnp.argsort(-scores, stable=True)
  sorted_boxes = boxes[order]
  iou = box_iou(sorted_boxes, sorted_boxes)
  idx = jnp.arange(r)

  def body(i, keep):
    suppressed = jnp.any(keep & (iou[:, i] > threshold) & (idx < i))
    return keep.at[i].set(~suppressed)

  keep_sorted = jax.lax.fori_loop(0, r, body, jnp.zeros((r,), bool))
  return jnp.zeros((r,), bool).at[order].set(keep_sorted)


__all__ = ["nms", "nms_mask"]
