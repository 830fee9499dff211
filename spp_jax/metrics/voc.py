"""PASCAL VOC 2007 detection average precision (the devkit's VOCevaldet rules).

Per class: detections of all images sorted by decreasing score (stable for ties); each is
matched to the ground-truth box of its image with the highest IoU; IoU >= 0.5 with a box not
matched before is a true positive, with an already matched box a false positive (duplicate);
a best match that is "difficult" makes the detection neither (ignored); otherwise it is a
false positive. Recall counts only non-difficult boxes. AP is either the VOC 2007 11-point
interpolation (mean of the best precision at recall >= 0, 0.1, ..., 1) or the area under the
monotone precision envelope (VOC 2010+). Boxes use the project convention (continuous
(x0, y0, x1, y1), see spp_jax.ops.boxes), whose IoU equals the devkit's "+1" IoU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from spp_jax.ops.boxes import box_iou

METRICS = ("area", "11point")


def voc_ap(recall, precision, metric: str = "area") -> float:
  """AP from a recall/precision curve (detections in decreasing score order).

  Args:
    recall, precision: (D,) cumulative recall and precision after each detection.
    metric: "11point" (VOC 2007) or "area" (area under the monotone envelope).
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got metric={metric!r}")
  rec = np.asarray(recall, np.float64)
  prec = np.asarray(precision, np.float64)
  if rec.shape != prec.shape or rec.ndim != 1:
    raise ValueError(f"recall and precision must be 1-D of equal length, got shapes "
                     f"{rec.shape} and {prec.shape}")
  if metric == "11point":
    ap = 0.0
    for t in np.linspace(0.0, 1.0, 11):
      above = prec[rec >= t]
      ap += (above.max() if above.size else 0.0) / 11.0
    return float(ap)
  mrec = np.concatenate([[0.0], rec, [1.0]])
  mpre = np.concatenate([[0.0], prec, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]          # precision envelope
  steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
  return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def _ground_truth_table(ground_truth: Mapping) -> tuple[dict, int]:
  """image id -> (boxes (G, 4), difficult (G,), matched (G,) all False), and the number of
  non-difficult boxes."""
  gt = {}
  npos = 0
  for key, (g_boxes, g_difficult) in ground_truth.items():
    g_boxes = np.asarray(g_boxes, np.float32).reshape(-1, 4)
    g_difficult = np.asarray(g_difficult, bool).reshape(-1)
    if len(g_difficult) != len(g_boxes):
      raise ValueError(f"ground_truth[{key!r}]: {len(g_boxes)} boxes but "
                       f"{len(g_difficult)} difficult flags")
    gt[key] = (g_boxes, g_difficult, np.zeros(len(g_boxes), bool))
    npos += int((~g_difficult).sum())
  return gt, npos


def average_precision(image_ids, scores, boxes, ground_truth: Mapping, *,
                      iou_threshold: float = 0.5, metric: str = "area") -> dict:
  """AP of one class.

  Args:
    image_ids: (D,) the image of each detection (any hashable ids).
    scores: (D,) detection scores.
    boxes: (D, 4) detected boxes.
    ground_truth: image id -> (boxes (G, 4), difficult (G,) bool) of this class; images with
      no box of the class may be absent.
    iou_threshold: minimum IoU for a match (VOC: 0.5, >=).
    metric: "11point" or "area".

  Returns:
    dict(ap, recall (D,), precision (D,), tp (D,), fp (D,), npos). ap is NaN when the class
    has no non-difficult ground truth.
  """
  scores = np.asarray(scores, np.float64)
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  image_ids = list(image_ids)
  if not len(image_ids) == len(scores) == len(boxes):
    raise ValueError(f"image_ids, scores and boxes must have one entry per detection, got "
                     f"{len(image_ids)}, {len(scores)}, {len(boxes)}")
  gt, npos = _ground_truth_table(ground_truth)
  order = np.argsort(-scores, kind="stable")
  tp = np.zeros(len(order))
  fp = np.zeros(len(order))
  for d, i in enumerate(order):
    entry = gt.get(image_ids[i])
    if entry is None or len(entry[0]) == 0:
      fp[d] = 1
      continue
    g_boxes, g_difficult, matched = entry
    iou = box_iou(boxes[i][None], g_boxes)[0]
    j = int(np.argmax(iou))
    if iou[j] >= iou_threshold:
      if g_difficult[j]:
        continue
      if matched[j]:
        fp[d] = 1
      else:
        tp[d] = 1
        matched[j] = True
    else:
      fp[d] = 1
  ctp, cfp = np.cumsum(tp), np.cumsum(fp)
  recall = ctp / npos if npos else np.full(len(order), np.nan)
  precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
  ap = voc_ap(recall, precision, metric) if npos else float("nan")
  return dict(ap=ap, recall=recall, precision=precision, tp=tp, fp=fp, npos=npos)


def voc_detection_ap(detections: Sequence[Mapping], ground_truths: Sequence[Mapping],
                     num_classes: int, *, iou_threshold: float = 0.5,
                     metric: str = "area") -> dict:
  """Per-class AP and mAP over a data set.

  Args:
    detections: one dict per image with "boxes" (D, 4), "scores" (D,), "labels" (D,) ints in
      0..num_classes-1 (object classes, no background).
    ground_truths: one dict per image (same order) with "boxes" (G, 4), "labels" (G,) and
      optionally "difficult" (G,) bool.
    num_classes: number of object classes.
    iou_threshold, metric: as in `average_precision`.

  Returns:
    dict(ap=(num_classes,) float64 (NaN for classes without non-difficult ground truth),
    map=mean of the finite APs, npos=(num_classes,) ints).
  """
  if len(detections) != len(ground_truths):
    raise ValueError(f"detections and ground_truths must have one entry per image, got "
                     f"{len(detections)} and {len(ground_truths)}")
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got metric={metric!r}")
  aps = np.full(num_classes, np.nan)
  npos = np.zeros(num_classes, np.int64)
  for c in range(num_classes):
    ids, scores, boxes = [], [], []
    gt = {}
    for i, (det, truth) in enumerate(zip(detections, ground_truths)):
      d_labels = np.asarray(det["labels"]).reshape(-1)
      sel = d_labels == c
      ids.extend([i] * int(sel.sum()))
      scores.append(np.asarray(det["scores"]).reshape(-1)[sel])
      boxes.append(np.asarray(det["boxes"], np.float32).reshape(-1, 4)[sel])
      g_labels = np.asarray(truth["labels"]).reshape(-1)
      g_sel = g_labels == c
      if g_sel.any():
        difficult = np.asarray(truth.get("difficult", np.zeros(len(g_labels), bool)), bool)
        gt[i] = (np.asarray(truth["boxes"], np.float32).reshape(-1, 4)[g_sel],
                 difficult.reshape(-1)[g_sel])
    result = average_precision(ids, np.concatenate(scores) if scores else np.zeros(0),
                               np.concatenate(boxes) if boxes else np.zeros((0, 4)), gt,
                               iou_threshold=iou_threshold, metric=metric)
    aps[c] = result["ap"]
    npos[c] = result["npos"]
  finite = aps[np.isfinite(aps)]
  return dict(ap=aps, map=float(finite.mean()) if finite.size else float("nan"), npos=npos)


__all__ = ["voc_ap", "average_precision", "voc_detection_ap"]
