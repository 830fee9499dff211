"""VOC 2007 AP on hand-computed examples: duplicates, difficult boxes, both AP variants."""

from __future__ import annotations

import numpy as np
import pytest

from spp_jax.metrics.voc import average_precision, voc_ap, voc_detection_ap

# Image 0: g0 (0, 0, 10, 10) and a difficult g1 (20, 20, 30, 30); image 1: g2 (0, 0, 10, 10).
GT = {0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([False, True])),
      1: (np.array([[0, 0, 10, 10]]), np.array([False]))}
DETS = [  # image, score, box, outcome
    (0, 0.9, (0, 0, 10, 10)),      # TP on g0
    (0, 0.8, (0, 0, 10, 10)),      # duplicate of g0: FP
    (0, 0.7, (20, 20, 30, 30)),    # on the difficult g1: ignored
    (1, 0.6, (50, 50, 60, 60)),    # no overlap: FP
    (1, 0.5, (1, 0, 10, 10)),      # IoU 0.9 with g2: TP
]


def _run(metric):
  ids = [d[0] for d in DETS]
  scores = [d[1] for d in DETS]
  boxes = [d[2] for d in DETS]
  return average_precision(ids, scores, boxes, GT, metric=metric)


def test_hand_example_area():
  r = _run("area")
  assert r["npos"] == 2
  np.testing.assert_array_equal(r["tp"], [1, 0, 0, 0, 1])
  np.testing.assert_array_equal(r["fp"], [0, 1, 0, 1, 0])
  np.testing.assert_allclose(r["recall"], [0.5, 0.5, 0.5, 0.5, 1.0])
  np.testing.assert_allclose(r["precision"], [1, 0.5, 0.5, 1 / 3, 0.5])
  # Envelope: precision 1 up to recall 0.5, then 0.5 up to recall 1.
  assert r["ap"] == pytest.approx(0.5 * 1 + 0.5 * 0.5)


def test_hand_example_11_point():
  # Recall thresholds 0..0.5 (6 of them) see precision 1, 0.6..1 (5) see 0.5.
  assert _run("11point")["ap"] == pytest.approx((6 * 1 + 5 * 0.5) / 11)


def test_order_of_detections_does_not_matter_and_threshold_is_inclusive():
  perm = [4, 2, 0, 3, 1]
  r = average_precision([DETS[i][0] for i in perm], [DETS[i][1] for i in perm],
                        [DETS[i][2] for i in perm], GT)
  assert r["ap"] == pytest.approx(0.75)
  # IoU exactly 0.5 matches (VOCevaldet: ovmax >= 0.5).
  gt = {0: (np.array([[0, 0, 10, 10]]), np.array([False]))}
  assert average_precision([0], [1.0], [(0, 0, 10, 5)], gt)["ap"] == pytest.approx(1.0)
  assert average_precision([0], [1.0], [(0, 0, 10, 4.9)], gt)["ap"] == pytest.approx(0.0)


def test_voc_ap_curves():
  assert voc_ap([1.0], [1.0], "area") == pytest.approx(1.0)
  assert voc_ap([1.0], [1.0], "11point") == pytest.approx(1.0)
  assert voc_ap([], [], "area") == 0.0
  # Precision dips then recovers: the envelope takes the later, higher precision.
  rec, prec = [0.25, 0.25, 0.5, 0.75], [1.0, 0.5, 2 / 3, 0.75]
  assert voc_ap(rec, prec, "area") == pytest.approx(0.25 * 1 + 0.25 * 0.75 + 0.25 * 0.75)
  with pytest.raises(ValueError, match="metric"):
    voc_ap(rec, prec, "12point")


def test_voc_detection_ap_over_classes():
  gts = [dict(boxes=np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), labels=np.array([0, 0]),
              difficult=np.array([False, True])),
         dict(boxes=np.array([[0, 0, 10, 10], [40, 40, 50, 50]]), labels=np.array([0, 2]))]
  dets = [dict(boxes=np.array([d[2] for d in DETS if d[0] == 0]),
               scores=np.array([d[1] for d in DETS if d[0] == 0]), labels=np.zeros(3, int)),
          dict(boxes=np.array([d[2] for d in DETS if d[0] == 1] + [(0, 0, 5, 5)]),
               scores=np.array([d[1] for d in DETS if d[0] == 1] + [0.99]),
               labels=np.array([0, 0, 1]))]
  r = voc_detection_ap(dets, gts, num_classes=3)
  assert r["ap"][0] == pytest.approx(0.75)
  assert np.isnan(r["ap"][1])              # class 1 has no ground truth
  assert r["ap"][2] == 0.0                 # class 2 has ground truth, no detection
  assert r["map"] == pytest.approx(0.375)
  np.testing.assert_array_equal(r["npos"], [2, 0, 1])
  with pytest.raises(ValueError, match="one entry per image"):
    voc_detection_ap(dets[:1], gts, 3)
