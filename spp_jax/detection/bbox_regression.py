"""Bounding-box regression on pooled conv features (R-CNN's ridge regressors; docs/paper.md §6
step 5).

One linear regressor per class maps a window's pooled conv5 features to the R-CNN offsets
(tx, ty, tw, th) towards its ground-truth box (spp_jax.ops.boxes.encode_boxes). Trained on
windows with IoU >= min_iou (0.5 in SPP-net) in closed form: ridge regression with penalty lam
on features rescaled so their mean L2 norm is 20 (R-CNN's normalisation), targets standardised
per class, a free bias. Solved in whichever of the primal (D x D) or dual (n x n) forms is
smaller.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spp_jax.ops.boxes import decode_boxes, encode_boxes

_TARGET_NORM = 20.0


@dataclasses.dataclass
class BoxRegressor:
  """weights (K, D, 4), bias (K, 4), target mean/std (K, 4), feature_scale; `fitted` (K,) bool
  (classes without training windows leave boxes unchanged)."""
  weights: np.ndarray
  bias: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  feature_scale: float
  fitted: np.ndarray

  def deltas(self, features: np.ndarray) -> np.ndarray:
    """(R, D) -> (R, K, 4) predicted offsets for every class."""
    x = np.asarray(features, np.float32) * self.feature_scale
    t = np.einsum("rd,kdo->rko", x, self.weights) + self.bias[None]
    t = t * self.std[None] + self.mean[None]
    return np.where(self.fitted[None, :, None], t, 0.0).astype(np.float32)

  def refine(self, features: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(R, D) features, (R, 4) boxes -> (R, K, 4) boxes moved by each class's regressor."""
    d = self.deltas(features)
    r, k = d.shape[:2]
    rep = np.repeat(np.asarray(boxes, np.float32), k, axis=0)
    return np.asarray(decode_boxes(rep, d.reshape(-1, 4))).reshape(r, k, 4)


def fit_box_regressor(features: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray,
                      classes: np.ndarray, iou: np.ndarray, num_classes: int, *,
                      min_iou: float = 0.5, lam: float = 1000.0) -> BoxRegressor:
  """Fits one ridge regressor per class.

  Args:
    features: (M, D) pooled features of training windows.
    boxes: (M, 4) the windows; gt_boxes: (M, 4) their best-overlapping ground-truth boxes.
    classes: (M,) class 0..K-1 of that ground truth; iou: (M,) the overlap.
    num_classes: K.
    min_iou: windows used have iou >= min_iou.
    lam: ridge penalty.
  """
  x_all = np.asarray(features, np.float32)
  d = x_all.shape[1]
  use = np.asarray(iou) >= min_iou
  norms = np.linalg.norm(x_all[use], axis=1) if use.any() else np.ones(1)
  scale = float(_TARGET_NORM / max(norms.mean(), 1e-12))
  weights = np.zeros((num_classes, d, 4), np.float32)
  bias = np.zeros((num_classes, 4), np.float32)
  mean = np.zeros((num_classes, 4), np.float32)
  std = np.ones((num_classes, 4), np.float32)
  fitted = np.zeros(num_classes, bool)
  for c in range(num_classes):
    sel = use & (np.asarray(classes) == c)
    if sel.sum() < 2:
      continue
    t = np.asarray(encode_boxes(boxes[sel], gt_boxes[sel]), np.float64)
    mean[c], std[c] = t.mean(0), np.maximum(t.std(0), 1e-6)
    t = (t - mean[c]) / std[c]
    x = x_all[sel].astype(np.float64) * scale
    xm = x.mean(0)
    xc = x - xm
    n = len(x)
    if n < d:   # dual: W = Xc^T (Xc Xc^T + lam I)^-1 T
      w = xc.T @ np.linalg.solve(xc @ xc.T + lam * np.eye(n), t)
    else:       # primal: W = (Xc^T Xc + lam I)^-1 Xc^T T
      w = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ t)
    weights[c] = w
    bias[c] = -(xm @ w)          # targets are centred: the bias undoes the feature mean
    fitted[c] = True
  return BoxRegressor(weights, bias, mean, std, scale, fitted)
