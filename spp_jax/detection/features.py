"""Window features: SPP-net's path (conv once per image per scale) and R-CNN's (conv per window).

SPP-net (docs/paper.md §6 steps 2-4): the image is resized so its short side is each scale s,
run through the conv layers once per scale, and every window is pooled with SPP from the conv
map of the scale at which its area is closest to base_size^2, after projecting it onto that
map. R-CNN (for comparison): every window is cropped from the image, warped (bilinear,
antialiased, no context padding) to base_size x base_size and run through the conv layers;
the conv map is pooled with the same SPP, so both paths give vectors of the same length for
the same fc layers.

Shapes are bucketed so that a data set compiles a handful of functions: a scale's images are
zero-padded to (s, ceil(s * max_aspect)) or its transpose (the conv stack masks the padding),
and window counts are padded to a multiple of `window_block`. Each scale's windows are pooled
from that scale's own map (sparse tables of one map, not of all scales padded to the largest).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from spp_jax.ops.boxes import project_boxes, select_scales
from spp_jax.ops.roi_pool import roi_spatial_pyramid_pool
from spp_jax.ops.spp import spp_output_dim


def _round_up(n: int, block: int) -> int:
  return max(block, -(-n // block) * block)


class WindowFeatures:
  """Pooled conv features of windows, SPP-net's way and R-CNN's way, for one model.

  Args:
    model: an SPPNet (spp_jax.models) with an SPP head.
    scales: short sides s of the image pyramid, e.g. (688,) or (480, 576, 688, 864, 1200).
    mean, std: per-channel pixel normalisation (0..255 scale), as in classification.
    max_aspect: the data's largest long/short side ratio (bucket shapes; larger ones are
      squeezed to fit).
    window_block: window counts are padded to a multiple of this.
  """

  def __init__(self, model, scales, mean, std, *, max_aspect: float = 2.0,
               window_block: int = 128):
    if getattr(model, "head_kind", "spp") != "spp":
      raise ValueError("window features need a model with the SPP head (head='spp')")
    self.scales = tuple(int(s) for s in scales)
    if not self.scales or min(self.scales) < model.min_input_size:
      raise ValueError(f"scales must be non-empty and >= the model's minimum input size "
                       f"{model.min_input_size}, got scales={scales!r}")
    self.levels = model.spp.levels
    self.stride = model.feature_stride
    self.base = model.base_size
    self.feature_size = model.feature_size
    self.channels = model.out_channels
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.max_aspect = float(max_aspect)
    self.window_block = int(window_block)
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef

    @jax.jit
    def conv(state, images, sizes):
      return nnx.merge(graphdef, state).features(images, sizes)[0]

    @jax.jit
    def pool(fmaps, windows, index):
      return roi_spatial_pyramid_pool(fmaps, windows, self.levels, batch_index=index)

    @jax.jit
    def warp_conv_pool(state, image, boxes):
      m = nnx.merge(graphdef, state)
      crops = warp(image, boxes, self.base)
      return m.pool(m.features(crops)[0])

    self._conv, self._pool, self._warp = conv, pool, warp_conv_pool

  def update(self, model) -> None:
    """Takes the model's current parameters (e.g. after loading a checkpoint)."""
    self.graphdef, self.state = nnx.split(model)

  # --------------------------------------------------------------------------- images

  def _bucket(self, s: int, hw) -> tuple[int, int]:
    long = int(math.ceil(s * self.max_aspect))
    return (s, long) if hw[1] >= hw[0] else (long, s)

  def _scaled(self, image: np.ndarray, s: int):
    """The image resized to short side s (long side capped by max_aspect), normalised, padded
    to its bucket. Returns (padded (Hb, Wb, 3), (h, w), factor (fy, fx))."""
    h0, w0 = image.shape[:2]
    f = s / min(h0, w0)
    bh, bw = self._bucket(s, (h0, w0))
    h, w = min(max(int(round(h0 * f)), 1), bh), min(max(int(round(w0 * f)), 1), bw)
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), np.float32)
    padded = np.zeros((bh, bw, 3), np.float32)
    padded[:h, :w] = (resized - self.mean) / self.std
    return padded, (h, w), (h / h0, w / w0)

  def conv_maps(self, image: np.ndarray):
    """Conv maps of every scale: a list of (1, Fh, Fw, C) (zero beyond the valid part), valid
    sizes (S, 2) and factors (S, 2) (fy, fx) from original pixels to each scale's pixels."""
    maps, valid, factors = [], [], []
    for s in self.scales:
      padded, hw, f = self._scaled(image, s)
      maps.append(self._conv(self.state, padded[None], np.array([hw], np.int32)))
      valid.append(self.feature_size(hw))
      factors.append(f)
    return maps, np.array(valid, np.int32), np.array(factors, np.float32)

  # --------------------------------------------------------------------------- windows

  def spp(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """SPP-net features of windows: (H, W, 3) uint8 image, (R, 4) pixel boxes -> (R, D)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    maps, valid, factors = self.conv_maps(image)
    return self.pool_windows(maps, valid, factors, boxes)

  def pool_windows(self, maps, valid, factors, boxes: np.ndarray) -> np.ndarray:
    """Pools boxes from the conv maps made by `conv_maps`, each from its own scale."""
    r = len(boxes)
    # Scale choice on the window's area at each scale (docs/paper.md §6 step 2).
    area_factor = np.sqrt(factors[:, 0] * factors[:, 1])
    scale_idx = select_scales(boxes, area_factor, target=float(self.base))
    out = np.zeros((r, spp_output_dim(self.levels, maps[0].shape[-1])), np.float32)
    for k in range(len(self.scales)):
      sel = np.flatnonzero(scale_idx == k)
      if not len(sel):
        continue
      fy, fx = factors[k]
      scaled = boxes[sel] * np.array([fx, fy, fx, fy], np.float32)
      windows = project_boxes(scaled, self.stride, tuple(valid[k]))
      rp = _round_up(len(sel), self.window_block)
      windows = np.concatenate([windows, np.tile([[0, 0, 1, 1]], (rp - len(sel), 1))])
      pooled = np.asarray(self._pool(maps[k], windows.astype(np.int32),
                                     np.zeros(rp, np.int32)))[:len(sel)]
      out[sel] = pooled
    return out

  def rcnn(self, image: np.ndarray, boxes: np.ndarray, batch: int = 64,
           pad_multiple: int = 64) -> np.ndarray:
    """R-CNN features: each window warped to base x base and run through the conv layers.

    The image is edge-padded to a multiple of pad_multiple a side (a few compiled shapes; edge
    padding keeps the warp's border samples as they were).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    h, w = image.shape[:2]
    ph, pw = _round_up(h, pad_multiple) - h, _round_up(w, pad_multiple) - w
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")
    img = ((img.astype(np.float32) - self.mean) / self.std).astype(np.float32)
    out = [np.zeros((0, spp_output_dim(self.levels, self.channels)), np.float32)]
    for i in range(0, len(boxes), batch):
      b = boxes[i:i + batch]
      pad = batch - len(b)
      b = np.concatenate([b, np.tile([[0, 0, 1, 1]], (pad, 1))]).astype(np.float32)
      out.append(np.asarray(self._warp(self.state, img, b))[:batch - pad])
    return np.concatenate(out)


def warp(image: jax.Array, boxes: jax.Array, size: int, antialias: bool = True) -> jax.Array:
  """R-CNN's warp: each (x0, y0, x1, y1) box of image (H, W, C) resized (anisotropically,
  bilinear) to size x size: (R, 4) -> (R, size, size, C)."""

  def one(box):
    x0, y0 = box[0], box[1]
    bw = jnp.maximum(box[2] - x0, 1.0)
    bh = jnp.maximum(box[3] - y0, 1.0)
    scale = jnp.stack([size / bh, size / bw])
    translation = -jnp.stack([y0, x0]) * scale
    return jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale,
                                         translation, method="linear", antialias=antialias)

  return jax.vmap(one)(boxes)
