"""Pure training and evaluation steps over (graph definition, TrainState, batch).

They are jitted by the loop with replicated state and batch-sharded inputs; XLA inserts the
gradient all-reduce. Nothing here depends on the device layout, so one process with 4 devices
and two processes with 2 devices each compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spp_jax.data import on_device, pipeline, settings
from spp_jax.train import feature_views
from spp_jax.train.state import STATE_FILTERS, TrainState


def step_rngs(rngs, step: jax.Array):
  """Dropout keys for one step: every stream's key with `step` folded in, counters reset.

  A function of (initial keys, step) only: the same masks on any number of devices (jax's
  threefry is partitionable, so a sharded draw equals the unsharded one) and after a resume.
  """
  def per_leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.fold_in(x, step)
    return jnp.zeros_like(x)  # RngCount: each call inside the step still gets its own key.
  return jax.tree.map(per_leaf, rngs)


def _weights(batch, n: int) -> jax.Array:
  mask = batch.get("mask")
  return jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, use_image_sizes: bool,
                    data, augment_key: jax.Array) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics).

  batch: image (B, H, W, 3) uint8 pixels (finished here by data/on_device.py: flips, colour,
  normalisation) or float32 inputs, label (B,) int, image_size (B, 2) int (used when
  use_image_sizes: full-image mode, images zero-padded at bottom/right), optional flip (B,)
  and mask (B,). data: config.data or its DataSettings. augment_key: colour alteration draws
  from fold_in(augment_key, step), so resume and any device count draw the same.
  metrics: loss, top1 (batch means), grad_norm, finite (loss and gradients finite).
  """
  def train_step(state: TrainState, batch):
    batch = on_device.train_batch(batch, data, jax.random.fold_in(augment_key, state.step),
                                  padded=use_image_sizes)
    rngs = step_rngs(state.rngs, state.step)
    labels = batch["label"]
    w = _weights(batch, labels.shape[0])

    def loss_fn(params):
      model = nnx.merge(graphdef, params, rngs, state.other, copy=True)
      sizes = batch["image_size"] if use_image_sizes else None
      logits = model(batch["image"], sizes).astype(jnp.float32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
      other = nnx.split(model, *STATE_FILTERS)[3]
      return loss, (logits, other)

    (loss, (logits, other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    top1 = jnp.sum(w * (jnp.argmax(logits, -1) == labels)) / jnp.maximum(jnp.sum(w), 1.0)
    metrics = dict(loss=loss, top1=top1, grad_norm=grad_norm,
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    new_state = TrainState(step=state.step + 1, params=params, rngs=state.rngs, other=other,
                           opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, *, use_image_sizes: bool, view, data,
                   view_shapes: tuple[tuple[int, int], ...] | None = None) -> Callable:
  """Returns eval_step(state, batch) -> masked sums (top1, top5, loss, count).

  batch: a uint8 batch of `view` (finished here by data/on_device.py) or float32 views:
  image (B, V, H, W, 3) with V views per example, image_size (B, V, 2) used when
  use_image_sizes, label (B,), mask (B,) (0 for padding examples). The scores of an example are
  its softmax probabilities averaged over its V views (10-view testing, docs/paper.md §4).
  A "feature_multiview" view averages over windows of each image's conv maps instead
  (train/feature_views.py; its images always use image_size).
  view_shapes: optional padded (h, w) of each view (multi-scale views are padded to the largest
  scale's shape): view v then runs on image[:, v, :h, :w] only, the same result with fewer
  pixels.
  """
  fv = _feature_views(view, data)

  def eval_step(state: TrainState, batch):
    batch = on_device.eval_batch(batch, view, data)
    model = nnx.merge(graphdef, state.params, state.rngs, state.other, copy=True)
    images = batch["image"]
    b = images.shape[0]
    if fv is not None:
      shapes = view_shapes or _per_scale_shapes(data, view, images.shape[2:4])
      probs = feature_views.average_probs(model, images, batch["image_size"], fv, shapes)
    else:
      logits = _view_logits(model, batch, use_image_sizes, view_shapes)
      probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)
    labels = batch["label"]
    w = _weights(batch, b)
    k = min(5, probs.shape[-1])
    topk = jax.lax.top_k(probs, k)[1]
    top1 = topk[:, 0] == labels
    top5 = jnp.any(topk == labels[:, None], axis=-1)
    nll = -jnp.log(jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0] + 1e-12)
    return dict(top1=jnp.sum(w * top1), top5=jnp.sum(w * top5), loss=jnp.sum(w * nll),
                count=jnp.sum(w))

  return eval_step


def _view_logits(model, batch, use_image_sizes: bool, view_shapes) -> jax.Array:
  """(B, V, classes) float32 logits of every view of a finished eval batch."""
  images = batch["image"]
  b, v = images.shape[:2]
  if view_shapes is not None:
    if len(view_shapes) != v:
      raise ValueError(f"view_shapes has {len(view_shapes)} entries for {v} views")
    return jnp.stack([
        model(images[:, i, :h, :w], batch["image_size"][:, i] if use_image_sizes else None)
        for i, (h, w) in enumerate(view_shapes)], axis=1).astype(jnp.float32)
  x = images.reshape((b * v,) + images.shape[2:])
  sizes = batch["image_size"].reshape(b * v, 2) if use_image_sizes else None
  return model(x, sizes).astype(jnp.float32).reshape(b, v, -1)


def _feature_views(view, data):
  """The static plan of a feature_multiview view, else None."""
  kind = view.get("kind") if hasattr(view, "get") else view.kind
  if kind != "feature_multiview":
    return None
  s = settings.data_settings(data)
  return feature_views.plan(settings.view_settings(view, s))


def _per_scale_shapes(data, view, padded_shape):
  """Each scale's own padded shape when the batch is one of the pipeline's buckets, else None
  (every scale then runs on the whole padded shape: the same scores, more pixels)."""
  try:
    return tuple(tuple(int(x) for x in hw) for hw in pipeline.multiscale_view_shapes(
        data, view, tuple(padded_shape)))
  except ValueError:
    return None
