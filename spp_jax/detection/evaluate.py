"""From window scores to detections (per-class NMS) and their PASCAL VOC 2007 mAP."""

from __future__ import annotations

import numpy as np

from spp_jax.metrics.voc import voc_detection_ap
from spp_jax.ops.boxes import clip_boxes
from spp_jax.ops.nms import nms


def detect(probs: np.ndarray, boxes: np.ndarray, image_hw, *, refined: np.ndarray | None = None,
           nms_iou: float = 0.3, score_threshold: float = 0.01, max_per_class: int = 100,
           max_per_image: int = 100) -> dict:
  """Detections of one image.

  Args:
    probs: (R, K + 1) class probabilities of the windows (column 0: background).
    boxes: (R, 4) the windows.
    image_hw: (h, w) for clipping.
    refined: optional (R, K, 4) class-specific boxes from bounding-box regression.
    nms_iou: per-class NMS threshold (0.3 in the paper).
    score_threshold: windows below it are dropped before NMS.
    max_per_class, max_per_image: caps after NMS (by score).

  Returns:
    dict(boxes (D, 4), scores (D,), labels (D,) in 0..K-1).
  """
  out_b, out_s, out_l = [], [], []
  for c in range(probs.shape[1] - 1):
    s = probs[:, c + 1]
    sel = np.flatnonzero(s >= score_threshold)
    if not len(sel):
      continue
    b = boxes[sel] if refined is None else refined[sel, c]
    b = np.asarray(clip_boxes(b, image_hw))
    keep = nms(b, s[sel], nms_iou, max_output=max_per_class)
    out_b.append(b[keep])
    out_s.append(s[sel][keep])
    out_l.append(np.full(len(keep), c, np.int32))
  if not out_b:
    return dict(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32),
                labels=np.zeros(0, np.int32))
  b, s, l = np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l)
  top = np.argsort(-s, kind="stable")[:max_per_image]
  return dict(boxes=b[top].astype(np.float32), scores=s[top].astype(np.float32), labels=l[top])


def voc_map(detections: list, scenes) -> dict:
  """VOC 2007 AP per class and mAP, both the 11-point and the area variants."""
  truths = [dict(boxes=scenes.boxes[i], labels=scenes.labels[i],
                 difficult=scenes.difficult[i]) for i in range(len(scenes))]
  out = {}
  for metric in ("11point", "area"):
    r = voc_detection_ap(detections, truths, scenes.num_classes, metric=metric)
    out[f"map_{metric}"] = r["map"]
    out[f"ap_{metric}"] = {name: (None if np.isnan(a) else float(a))
                           for name, a in zip(scenes.class_names, r["ap"])}
  return out
