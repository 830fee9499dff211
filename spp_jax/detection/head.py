"""Fine-tuning the fc layers on pooled window features (docs/paper.md §6 step 5), and scoring
windows.

Only fc6, fc7 and a new (classes + 1)-way classifier are trained (class 0 is background); the
conv layers are frozen, so the pooled conv features of the training windows are computed once
and cached (`WindowSet`). Windows: IoU >= fg_iou with a ground-truth box are positives of that
box's class, IoU in [bg_low, fg_iou) negatives, the rest unused; every minibatch holds
`positive_fraction` positives (25 % in the paper), drawn with replacement when there are few.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spp_jax.ops.boxes import box_iou

FC_LAYERS = ("fc6", "fc7", "classifier")


def label_windows(boxes, gt_boxes, gt_labels, *, fg_iou: float = 0.5, bg_low: float = 0.1):
  """Training labels of windows.

  Returns:
    labels (R,) int32: c + 1 for positives (IoU >= fg_iou with a box of class c), 0 for
    negatives (bg_low <= IoU < fg_iou), -1 unused; max IoU (R,); the best box's index (R,).
  """
  r = len(boxes)
  if len(gt_boxes) == 0:
    return np.zeros(r, np.int32), np.zeros(r, np.float32), np.zeros(r, np.int64)
  iou = box_iou(boxes, gt_boxes)
  best = iou.argmax(1)
  max_iou = iou[np.arange(r), best]
  labels = np.full(r, -1, np.int32)
  labels[(max_iou >= bg_low) & (max_iou < fg_iou)] = 0
  fg = max_iou >= fg_iou
  labels[fg] = np.asarray(gt_labels)[best[fg]] + 1
  return labels, max_iou.astype(np.float32), best


@dataclasses.dataclass
class WindowSet:
  """Cached training windows: pooled features (M, D) float16, labels (M,), their boxes and the
  box of the matched ground truth (M, 4), IoU (M,)."""
  features: np.ndarray
  labels: np.ndarray
  boxes: np.ndarray
  gt_boxes: np.ndarray
  iou: np.ndarray


def collect_windows(scenes, proposals, featurize, *, fg_iou: float, bg_low: float,
                    negatives_per_image: int, rng: np.random.Generator,
                    positives_per_image: int | None = None) -> WindowSet:
  """Labels proposals (plus the ground-truth boxes themselves, as in R-CNN) of every image and
  keeps up to positives_per_image positives (None: all; the ground-truth boxes first) and up to
  negatives_per_image random negatives, with their features (held in memory, float16).

  featurize(image, boxes) -> (R, D) pooled features.
  """
  feats, labels, boxes, gts, ious = [], [], [], [], []
  for i in range(len(scenes)):
    g_boxes, g_labels = scenes.boxes[i], scenes.labels[i]
    cand = np.concatenate([g_boxes, proposals[i]]).astype(np.float32)
    lab, iou, best = label_windows(cand, g_boxes, g_labels, fg_iou=fg_iou, bg_low=bg_low)
    pos = np.flatnonzero(lab > 0)
    if positives_per_image is not None and len(pos) > positives_per_image:
      n_gt = int((pos < len(g_boxes)).sum())
      rest = rng.choice(pos[n_gt:], max(positives_per_image - n_gt, 0), replace=False)
      pos = np.concatenate([pos[:n_gt], np.sort(rest)])
    neg = np.flatnonzero(lab == 0)
    if len(neg) > negatives_per_image:
      neg = rng.choice(neg, negatives_per_image, replace=False)
    keep = np.concatenate([pos, neg])
    if not len(keep):
      continue
    feats.append(featurize(scenes.images[i], cand[keep]).astype(np.float16))
    labels.append(lab[keep])
    boxes.append(cand[keep])
    gts.append(g_boxes[best[keep]] if len(g_boxes) else np.zeros((len(keep), 4), np.float32))
    ious.append(iou[keep])
  cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)
  return WindowSet(cat(feats, (0, 0)).astype(np.float16), cat(labels, (0,)).astype(np.int32),
                   cat(boxes, (0, 4)).astype(np.float32), cat(gts, (0, 4)).astype(np.float32),
                   cat(ious, (0,)).astype(np.float32))


def _fc_filter():
  return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(n) for n in FC_LAYERS)))


def finetune(model, windows: WindowSet, *, steps: int, batch_size: int,
             positive_fraction: float, learning_rate: float, momentum: float,
             weight_decay: float, seed: int, log_every: int = 0, log=print) -> list:
  """Trains model.fc6, fc7 and classifier in place on windows; returns the loss curve."""
  pos = np.flatnonzero(windows.labels > 0)
  neg = np.flatnonzero(windows.labels == 0)
  if not len(pos) or not len(neg):
    raise ValueError(f"fine-tuning needs positive and negative windows, got {len(pos)} "
                     f"positives and {len(neg)} negatives")
  n_pos = max(1, int(round(batch_size * positive_fraction)))
  n_neg = batch_size - n_pos
  model.train()
  graphdef, fc, rest = nnx.split(model, _fc_filter(), ...)
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(learning_rate, momentum=momentum))
  opt_state = tx.init(fc)

  @jax.jit
  def step(fc, rest, opt_state, x, y):
    m = nnx.merge(graphdef, fc, rest)

    def loss_fn(m):
      logits = m.head(x.astype(jnp.float32))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # Gradients for the fc layers only; the dropout RNG state advances inside the model.
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, _fc_filter()))(m)
    updates, opt_state = tx.update(grads, opt_state, fc)
    fc = optax.apply_updates(fc, updates)
    _, _, rest = nnx.split(m, _fc_filter(), ...)
    return fc, rest, opt_state, loss

  rng = np.random.default_rng(seed)
  feats = windows.features
  losses = []
  for t in range(steps):
    idx = np.concatenate([rng.choice(pos, n_pos, replace=len(pos) < n_pos),
                          rng.choice(neg, n_neg, replace=len(neg) < n_neg)])
    fc, rest, opt_state, loss = step(fc, rest, opt_state, jnp.asarray(feats[idx]),
                                     jnp.asarray(windows.labels[idx]))
    losses.append(float(loss) if (log_every and (t + 1) % log_every == 0) or t == steps - 1
                  else loss)
    if log_every and (t + 1) % log_every == 0:
      log(f"  fine-tune step {t + 1}/{steps}: loss {float(loss):.4f}")
  nnx.update(model, fc, rest)
  model.eval()
  return [float(v) for v in losses]


class Scorer:
  """Class probabilities (R, classes + 1) of pooled window features with the model's head."""

  def __init__(self, model, block: int = 256):
    model.eval()
    self.graphdef, self.state = nnx.split(model)
    self.block = block
    graphdef = self.graphdef

    @jax.jit
    def probs(state, x):
      return jax.nn.softmax(nnx.merge(graphdef, state).head(x), axis=-1)

    self._probs = probs

  def __call__(self, features: np.ndarray) -> np.ndarray:
    r = len(features)
    rp = max(self.block, -(-r // self.block) * self.block)
    x = np.zeros((rp, features.shape[1]), np.float32)
    x[:r] = features
    return np.asarray(self._probs(self.state, x))[:r]
