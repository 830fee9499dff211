r"""Detection time per image: SPP-net (conv once, pool every window) vs R-CNN (conv per window).

  python experiments/benchmarks/detection.py                      # ZF-5, 2,000 windows, s = 688
  python experiments/benchmarks/detection.py --width 0.5 --rcnn-windows 32

Both paths use the same network (`--model`, random weights: speed does not depend on them),
the same image (`--height` x `--width-px`, the short side already at the scale s) and the same
windows (`--windows` random boxes, `--seed`; 20 px .. the whole image, like selective search).

SPP-net path, per image: conv layers once on the whole image, every window projected onto the
conv5 map (SPEC §6 step 3) and pooled with SPP {6,3,2,1} (`roi_spatial_pyramid_pool`), one
compiled function; timed end to end.
R-CNN path, per window: crop the window from the image and warp it to the network's base size
(bilinear, `jax.image.scale_and_translate`), run the conv layers, pool the 13x13 conv5 map with
the same SPP (the same feature length); jit-compiled in batches of `--batch`. Running all
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
from spp_jax.ops.boxes import project_boxes
from spp_jax.ops.roi_pool import roi_spatial_pyramid_pool


def random_boxes(rng: np.random.Generator, count: int, h: int, w: int, min_side: int = 20):
  """(count, 4) pixel boxes (x0, y0, x1, y1) inside an h x w image, sides min_side .. whole."""
  bw = np.exp(rng.uniform(np.log(min_side), np.log(w), count))
  bh = np.exp(rng.uniform(np.log(min_side), np.log(h), count))
  x0 = rng.uniform(0, w - bw)
  y0 = rng.uniform(0, h - bh)
  return np.stack([x0, y0, x0 + bw, y0 + bh], 1).astype(np.float32)


def warp_windows(image: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """R-CNN's warp: each box of image (H, W, 3) resized (anisotropically) to size x size."""

  def one(box):
    x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / (y1 - y0), size / (x1 - x0)])
    translation = -jnp.stack([y0, x0]) * scale
    return jax.image.scale_and_translate(image, (size, size, 3), (0, 1), scale, translation,
                                         method="linear", antialias=False)

  return jax.vmap(one)(boxes)


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv=None):
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
  args = parser.parse_args(argv)

  rngs = nnx.Rngs(params=args.seed, dropout=args.seed + 1)
  model = models.create(args.model, num_classes=21, rngs=rngs, width_multiplier=args.width,
                        dropout_rate=0.0)
  model.eval()
  levels = model.spp.levels
  base, stride = model.base_size, model.feature_stride
  h, w = args.height, args.width_px
  rng = np.random.default_rng(args.seed)
  image = jnp.asarray(rng.uniform(-1, 1, (h, w, 3)).astype(np.float32))
  boxes = random_boxes(rng, args.windows, h, w)
  fh, fw = model.feature_size((h, w))

  graphdef, state = nnx.split(model)

  @jax.jit
  def spp_path(state, image, boxes):
    m = nnx.merge(graphdef, state)
    fmap, _ = m.features(image[None])
    windows = project_boxes(boxes, stride, (fh, fw))
    return roi_spatial_pyramid_pool(fmap, windows, levels)

  @jax.jit
  def conv_only(state, image):
    return nnx.merge(graphdef, state).features(image[None])[0]

  @jax.jit
  def rcnn_batch(state, image, boxes):
    m = nnx.merge(graphdef, state)
    crops = warp_windows(image, boxes, base)
    fmap, _ = m.features(crops)
    return m.pool(fmap)

  @jax.jit
  def fc_path(state, pooled):
    return nnx.merge(graphdef, state).embed(pooled)

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
  t_compile_spp = time.perf_counter() - t0
  t0 = time.perf_counter()
  rcnn_pooled = jax.block_until_ready(rcnn_batch(state, image, rcnn_boxes[0]))
  t_compile_rcnn = time.perf_counter() - t0
  assert pooled.shape[1] == rcnn_pooled.shape[1], (pooled.shape, rcnn_pooled.shape)
  jax.block_until_ready(fc_path(state, pooled))
  jax.block_until_ready(conv_only(state, image))

  spp_t, rcnn_t, fc_t, conv_t = [], [], [], []
  for _ in range(args.repeats):
    spp_t.append(_timed(spp_path, state, image, boxes_j))
    conv_t.append(_timed(conv_only, state, image))
    rcnn_t.append(_timed(rcnn_subset, state, image))
    fc_t.append(_timed(fc_path, state, pooled))
  spp_s = statistics.median(spp_t)
  per_window = statistics.median(rcnn_t) / n_rcnn
  rcnn_s = per_window * args.windows
  fc_s = statistics.median(fc_t)

  arch = model.arch
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  print(f"model: {args.model} width_multiplier={args.width} (conv5 channels "
        f"{arch.out_channels}), SPP levels {[lv[0] if lv[0] == lv[1] else lv for lv in levels]}, "
        f"feature length {pooled.shape[1]}")
  print(f"image: {h}x{w} px -> conv5 map {fh}x{fw} (stride {stride}); windows: {args.windows} "
        f"random boxes; R-CNN warp size {base}x{base}")
  print(f"compile: SPP path {t_compile_spp:.1f} s, R-CNN batch {t_compile_rcnn:.1f} s")
  print(f"SPP-net path (conv once + pool {args.windows} windows): {spp_s:.3f} s per image "
        f"(runs: {', '.join(f'{t:.3f}' for t in spp_t)}); conv alone "
        f"{statistics.median(conv_t):.3f} s")
  print(f"R-CNN path: {per_window * 1e3:.1f} ms per window measured on {n_rcnn} windows in "
        f"batches of {batch}; x {args.windows} windows = {rcnn_s:.1f} s per image "
        f"(extrapolated)")
  print(f"speed-up, conv + pooling: {rcnn_s / spp_s:.1f}x")
  print(f"fc6+fc7 for {args.windows} windows (same in both paths): {fc_s:.3f} s; speed-up with "
        f"fc: {(rcnn_s + fc_s) / (spp_s + fc_s):.1f}x")


if __name__ == "__main__":
  main()
