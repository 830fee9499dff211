"""Greedy NMS against a hand-worked example and a plain loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.ops.nms import nms, nms_mask

BOXES = np.array([[0, 0, 10, 10],     # A .9
                  [1, 1, 11, 11],     # B .8: IoU(A, B) = 81/119
                  [20, 20, 30, 30],   # C .7: far away
                  [0, 0, 10, 5]],     # D .95: IoU(D, A) = 0.5, IoU(D, B) = 36/114
                 np.float32)
SCORES = np.array([0.9, 0.8, 0.7, 0.95], np.float32)


def _iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _loop_nms(boxes, scores, threshold):
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  keep = []
  for i in order:
    if all(_iou(boxes[i], boxes[k]) <= threshold for k in keep):
      keep.append(i)
  return keep


@pytest.mark.parametrize("threshold, expected", [(0.3, [3, 2]), (0.5, [3, 0, 2]),
                                                 (0.7, [3, 0, 1, 2]), (0.0, [3, 2])])
def test_hand_example(threshold, expected):
  # 0.3: D suppresses A (0.5) and B (0.316); 0.5: A survives D (0.5 is not > 0.5) and
  # suppresses B (0.68); 0.7: B survives too.
  np.testing.assert_array_equal(nms(BOXES, SCORES, threshold), expected)
  mask = np.asarray(nms_mask(jnp.asarray(BOXES), jnp.asarray(SCORES), threshold))
  np.testing.assert_array_equal(np.flatnonzero(mask), sorted(expected))


def test_ties_keep_input_order_and_max_output():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
  scores = np.array([0.5, 0.5, 0.5], np.float32)
  np.testing.assert_array_equal(nms(boxes, scores, 0.3), [0, 2])
  np.testing.assert_array_equal(nms(boxes, scores, 0.3, max_output=1), [0])
  np.testing.assert_array_equal(np.asarray(nms_mask(boxes, scores, 0.3)), [True, False, True])


def test_random_against_loop():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 60, (120, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(3, 40, (120, 2))], 1).astype(np.float32)
  scores = rng.integers(0, 30, 120).astype(np.float32)   # many ties
  for threshold in (0.3, 0.5):
    ref = _loop_nms(boxes, scores, threshold)
    np.testing.assert_array_equal(nms(boxes, scores, threshold), ref)
    mask = np.asarray(nms_mask(jnp.asarray(boxes), jnp.asarray(scores), threshold))
    np.testing.assert_array_equal(np.flatnonzero(mask), sorted(ref))


def test_empty_and_bad_arguments():
  assert nms(np.zeros((0, 4)), np.zeros(0)).shape == (0,)
  with pytest.raises(ValueError, match="scores"):
    nms(BOXES, SCORES[:2])
  with pytest.raises(ValueError, match="threshold"):
    nms(BOXES, SCORES, 1.5)
