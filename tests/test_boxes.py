"""Box projection (docs/paper.md §6 step 3), scale choice, IoU and box regression on hand-worked
cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.ops.boxes import (box_iou, clip_boxes, decode_boxes, encode_boxes, project_boxes,
                               select_scales)


def _paper_rule(box, stride, fh, fw):
  """The paper's 1-based inclusive rule, written out per edge, converted at the end."""
  x0, y0, x1, y1 = box
  left, top = int(np.floor(x0 / stride)) + 1, int(np.floor(y0 / stride)) + 1
  right, bottom = int(np.ceil(x1 / stride)) - 1, int(np.ceil(y1 / stride)) - 1
  left, top = min(max(left, 1), fw), min(max(top, 1), fh)
  right, bottom = min(max(right, left), fw), min(max(bottom, top), fh)
  return (top - 1, left - 1, bottom, right)     # 0-based half-open (y0, x0, y1, x1)


@pytest.mark.parametrize("box, window", [
    ((0, 0, 160, 160), (0, 0, 9, 9)),           # 10 cells of 16 px: the rule drops the last
    ((20, 35, 100, 60), (2, 1, 3, 6)),          # x: floor(1.25)=1 .. ceil(6.25)-1=6; y: 2 .. 3
    ((0, 0, 16, 16), (0, 0, 1, 1)),             # would be empty: one cell kept
    ((150, 140, 400, 300), (8, 9, 10, 12)),     # clamped at the bottom-right
    ((300, 300, 320, 320), (9, 11, 10, 12)),    # entirely outside: the last cell
    ((17, 33, 47.5, 64.1), (2, 1, 4, 2)),       # fractional (scaled) boxes
])
def test_project_boxes_hand_cases(box, window):
  out = project_boxes(np.array([box], np.float32), 16, (10, 12))
  assert out.dtype == np.int32
  assert tuple(out[0]) == window
  assert _paper_rule(box, 16, 10, 12) == window


def test_project_boxes_matches_paper_rule_and_jax():
  rng = np.random.default_rng(0)
  xy = rng.uniform(-20, 400, size=(500, 2))
  wh = rng.uniform(1, 300, size=(500, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  for stride, (fh, fw) in [(16, (13, 20)), (12, (18, 18)), (1, (5, 7))]:
    out = project_boxes(boxes, stride, (fh, fw))
    ref = np.array([_paper_rule(b, stride, fh, fw) for b in boxes])
    np.testing.assert_array_equal(out, ref)
    assert ((out[:, 0] < out[:, 2]) & (out[:, 2] <= fh) & (out[:, 1] < out[:, 3])
            & (out[:, 3] <= fw) & (out[:, :2] >= 0).all(1)).all()
    np.testing.assert_array_equal(project_boxes(jnp.asarray(boxes), stride, (fh, fw)), out)


def test_project_boxes_bad_arguments():
  with pytest.raises(ValueError, match="boxes"):
    project_boxes(np.zeros((3,)), 16, (4, 4))
  with pytest.raises(ValueError, match="stride"):
    project_boxes(np.zeros((1, 4)), 0, (4, 4))
  with pytest.raises(ValueError, match="feature_size"):
    project_boxes(np.zeros((1, 4)), 16, (0, 4))


def test_select_scales():
  boxes = np.array([[0, 0, 100, 100], [0, 0, 300, 200], [0, 0, 10, 10], [0, 0, 1000, 1000]])
  # areas at factors 1, 2, 3: 100x100 -> 1e4, 4e4, 9e4: closest to 224^2 = 50176 is 4e4.
  np.testing.assert_array_equal(select_scales(boxes, [1.0, 2.0, 3.0]), [1, 0, 2, 0])
  # Ties go to the first factor: 224^2 exactly between the two areas.
  a = 224.0**2
  tie = np.array([[0, 0, 1, 1]], np.float32)
  f1, f2 = np.sqrt(a - 1000), np.sqrt(a + 1000)
  assert select_scales(tie, [f1, f2])[0] == 0
  with pytest.raises(ValueError, match="factors"):
    select_scales(boxes, [])


def test_box_iou_hand_cases():
  a = np.array([[0, 0, 10, 10]], np.float32)
  b = np.array([[5, 5, 15, 15], [10, 0, 20, 10], [0, 0, 10, 10], [2, 2, 4, 4], [3, 3, 3, 9]])
  np.testing.assert_allclose(box_iou(a, b)[0], [25 / 175, 0, 1, 4 / 100, 0], rtol=1e-6)
  # VOC "+1" IoU on 1-based inclusive pixels (1..10 vs 6..15) equals ours on (0, 10), (5, 15).
  iw = min(10, 15) - max(1, 6) + 1
  assert np.isclose(iw * iw / (100 + 100 - iw * iw), box_iou(a, b[:1])[0, 0])
  assert box_iou(jnp.asarray(a), jnp.asarray(b)).shape == (1, 5)


def test_clip_boxes():
  out = clip_boxes(np.array([[-5, 3, 50, 70]], np.float32), (60, 40))
  np.testing.assert_array_equal(out, [[0, 3, 40, 60]])


def test_encode_decode_hand_cases_and_round_trip():
  p = np.array([[0, 0, 10, 20], [0, 0, 10, 20]], np.float32)
  g = np.array([[5, 5, 15, 25], [0, 0, 20, 10]], np.float32)
  np.testing.assert_allclose(encode_boxes(p, g),
                             [[0.5, 0.25, 0, 0], [0.5, -0.25, np.log(2), np.log(0.5)]],
                             rtol=1e-6, atol=1e-7)
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, 100, (50, 2))
  props = np.concatenate([xy, xy + rng.uniform(5, 80, (50, 2))], 1).astype(np.float32)
  xy = rng.uniform(0, 100, (50, 2))
  gts = np.concatenate([xy, xy + rng.uniform(5, 80, (50, 2))], 1).astype(np.float32)
  np.testing.assert_allclose(decode_boxes(props, encode_boxes(props, gts)), gts, rtol=1e-4,
                             atol=1e-3)
  np.testing.assert_allclose(decode_boxes(jnp.asarray(props), jnp.zeros((50, 4))), props,
                             atol=1e-4)
  with pytest.raises(ValueError, match="positive width"):
    encode_boxes(np.array([[0, 0, 0, 5]], np.float32), g[:1])
