r"""Detection time per image: SPP-net (conv once, pool every window) vs R-CNN (conv per window).

  python experiments/benchmarks/detection.py                      # ZF-5, 2,000 windows, s = 688
  python experiments/benchmarks/detection.py --width 0.5 --rcnn-windows 32

Both paths use the same network (`--model`, random weights: speed does not depend on them),
the same image (`--height` x `--width-px`, the short side already at the scale s) and the same
windows (`--windows` random boxes, `--seed`; 20 px .. the whole image, like selective search).

SPP-net path, per image: conv layers once on the whole image, every window projected onto the
conv5 map (docs/paper.md §6 step 3) and pooled with SPP {6,3,2,1} (`roi_spatial_pyramid_pool`),
one compiled function; timed end to end.
R-CNN path, per window: crop the window from the image and warp it to the network's base size
(`spp_jax.detection.features.warp`, bilinear, without antialiasing), run the conv layers, pool
the 13x13 conv5 map with the same SPP (the same feature length); jit-compiled in batches of
`--batch`. Running all
2,000 windows would take minutes on 2 CPU cores, so `--rcnn-windows` of them are timed (whole
batches) and the per-window cost is multiplied by `--windows`: the conv work per window is
the same for every window (every warp has the base size), so this extrapolation is linear.
The fc layers cost the same in both paths (one fc6/fc7 pass per window); they are timed once
and reported separately, and included in the "with fc" ratio.

Paths alternate `--repeats` times in one process; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spp_jax import models
from spp_jax.detection.features import warp
from spp_jax.ops.boxes import project_boxes
from spp_jax.ops.roi_pool import roi_spatial_pyramid_pool


def random_boxes(rng: np.random.Generator, count: int, h: int, w: int, min_side: int = 20):
  """(count, 4) pixel boxes (x0, y0, x1, y1) inside an h x w image, sides min_side .. whole."""
  bw = np.exp(rng.uniform(np.log(min_side), np.log(w), count))
  bh = np.exp(rng.uniform(np.log(min_side), np.log(h), count))
  x0 = rng.uniform(0, w - bw)
  y0 = rng.uniform(0, h - bh)
  return np.stack([x0, y0, x0 + bw, y0 + bh], 1).astype(np.float32)


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="zf5")
  parser.add_argument("--width", type=float, default=1.0, help="width_multiplier of the net")
  parser.add_argument("--height", type=int, default=688, help="image height (short side = s)")
  parser.add_argument("--width-px", type=int, default=917, help="image width in pixels")
  parser.add_argument("--windows", type=int, default=2000)
  parser.add_argument("--rcnn-windows", type=int, default=64,
                      help="windows actually run through the R-CNN path (whole batches)")
  parser.add_argument("--batch", type=int, default=16, help="R-CNN warp+conv batch size")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def _paths(model, feature_size):
  """The jitted functions: SPP-net (conv once, pool all windows), conv alone, one R-CNN batch
  (warp, conv, SPP) and the fc layers. Each takes the model state first."""
  graphdef, state = nnx.split(model)
  levels, stride, base = model.spp.levels, model.feature_stride, model.base_size

  @jax.jit
  def spp_path(state, image, boxes):
    m = nnx.merge(graphdef, state)
    fmap, _ = m.features(image[None])
    return roi_spatial_pyramid_pool(fmap, project_boxes(boxes, stride, feature_size), levels)

  @jax.jit
  def conv_only(state, image):
    return nnx.merge(graphdef, state).features(image[None])[0]

  @jax.jit
  def rcnn_batch(state, image, boxes):
    m = nnx.merge(graphdef, state)
    # No antialiasing: the cheaper warp, so the R-CNN time is not inflated by it.
    return m.pool(m.features(warp(image, boxes, base, antialias=False))[0])

  @jax.jit
  def fc_path(state, pooled):
    return nnx.merge(graphdef, state).embed(pooled)

  return state, spp_path, conv_only, rcnn_batch, fc_path


def _report(args, model, pooled, times, n_rcnn, compile_s, image_hw, feature_size):
  spp_t, rcnn_t, fc_t, conv_t = times
  spp_s = statistics.median(spp_t)
  per_window = statistics.median(rcnn_t) / n_rcnn
  rcnn_s = per_window * args.windows
  fc_s = statistics.median(fc_t)
  levels, base = model.spp.levels, model.base_size
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  print(f"model: {args.model} width_multiplier={args.width} (conv5 channels "
        f"{model.arch.out_channels}), SPP levels "
        f"{[lv[0] if lv[0] == lv[1] else lv for lv in levels]}, feature length {pooled.shape[1]}")
  print(f"image: {image_hw[0]}x{image_hw[1]} px -> conv5 map {feature_size[0]}x{feature_size[1]} "
        f"(stride {model.feature_stride}); windows: {args.windows} random boxes; R-CNN warp "
        f"size {base}x{base}")
  print(f"compile: SPP path {compile_s[0]:.1f} s, R-CNN batch {compile_s[1]:.1f} s")
  print(f"SPP-net path (conv once + pool {args.windows} windows): {spp_s:.3f} s per image "
        f"(runs: {', '.join(f'{t:.3f}' for t in spp_t)}); conv alone "
        f"{statistics.median(conv_t):.3f} s")
  print(f"R-CNN path: {per_window * 1e3:.1f} ms per window measured on {n_rcnn} windows in "
        f"batches of {args.batch}; x {args.windows} windows = {rcnn_s:.1f} s per image "
        f"(extrapolated)")
  print(f"speed-up, conv + pooling: {rcnn_s / spp_s:.1f}x")
  print(f"fc6+fc7 for {args.windows} windows (same in both paths): {fc_s:.3f} s; speed-up with "
        f"fc: {(rcnn_s + fc_s) / (spp_s + fc_s):.1f}x")


def main(argv=None):
  args = _parse(argv)
  rngs = nnx.Rngs(params=args.seed, dropout=args.seed + 1)
  model = models.create(args.model, num_classes=21, rngs=rngs, width_multiplier=args.width,
                        dropout_rate=0.0)
  model.eval()
  h, w = args.height, args.width_px
  rng = np.random.default_rng(args.seed)
  image = jnp.asarray(rng.uniform(-1, 1, (h, w, 3)).astype(np.float32))
  boxes = random_boxes(rng, args.windows, h, w)
  feature_size = model.feature_size((h, w))
  state, spp_path, conv_only, rcnn_batch, fc_path = _paths(model, feature_size)

  batch = args.batch
  n_rcnn = max(batch, (args.rcnn_windows // batch) * batch)
  rcnn_boxes = jnp.asarray(boxes[:n_rcnn]).reshape(-1, batch, 4)
  boxes_j = jnp.asarray(boxes)

  def rcnn_subset(state, image):
    out = [rcnn_batch(state, image, b) for b in rcnn_boxes]
    return out[-1]

  # Same feature vectors? Not expected (warping changes the input); only shapes must agree.
  t0 = time.perf_counter()
  pooled = jax.block_until_ready(spp_path(state, image, boxes_j))
  compile_spp = time.perf_counter() - t0
  t0 = time.perf_counter()
  rcnn_pooled = jax.block_until_ready(rcnn_batch(state, image, rcnn_boxes[0]))
  compile_rcnn = time.perf_counter() - t0
  assert pooled.shape[1] == rcnn_pooled.shape[1], (pooled.shape, rcnn_pooled.shape)
  jax.block_until_ready(fc_path(state, pooled))
  jax.block_until_ready(conv_only(state, image))

  spp_t, rcnn_t, fc_t, conv_t = [], [], [], []
  for _ in range(args.repeats):   # the paths alternate (docs/performance.md §4)
    spp_t.append(_timed(spp_path, state, image, boxes_j))
    conv_t.append(_timed(conv_only, state, image))
    rcnn_t.append(_timed(rcnn_subset, state, image))
    fc_t.append(_timed(fc_path, state, pooled))
  _report(args, model, pooled, (spp_t, rcnn_t, fc_t, conv_t), n_rcnn,
          (compile_spp, compile_rcnn), (h, w), feature_size)

if __name__ == "__main__":
  main()
