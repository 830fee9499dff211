"""Multi-view testing on feature maps (docs/paper.md §4): windows of the conv map, not crops.

The conv layers run once per scale on the whole image (and once on its mirror image); every
view is a window of that conv map, pooled with the window SPP op
(`ops.roi_pool.roi_spatial_pyramid_pool`, the bin rule of §1 on the window's own cells) and
scored by fc6, fc7 and the classifier. An example's score is its softmax averaged over all its
distinct views.

Per window scale s (the image resized so its short side is s, aspect kept):
- windows of `size` x `size` pixels at 9 positions, the centre, the four corners and the four
  edge midpoints (offsets 0, (L - size) // 2, L - size on each axis, as the 10-view crops);
  `windows` = 1, 5 or 9 takes the first 1 (centre), 5 (and the corners) or all 9, and 2, 10 or
  18 the same positions on the mirrored image too.
- windows that coincide in pixels count once: when the short side equals `size` the 9
  positions are 3 (a square image: 1), so the paper's 6 scales give 5 x 18 + 6 = 96 views.
- a window becomes conv-map cells by the paper's rule (§6 step 3, `ops.boxes.project_boxes`):
  cells [floor(x0 / S), ceil(x1 / S) - 1) with S the network's total stride, clamped to the
  image's own map and at least one cell.
Full-image views (`full_views` = 1 or 2): the whole map at the short side `short_side`, and the
mirror image's whole map; the same as the "full" view.

Flips: the mirror image is run through the conv layers too, at twice the conv cost. Mirroring
the image's conv map instead would save that pass, but it is not the mirror image's map
(padding, even kernels and pooling offsets break the symmetry), so it would not score the
flipped views the network scores. The 9 positions are mirror-symmetric, so the mirror image's
windows at the same 9 positions are the flips of the image's windows (centre <-> centre,
top-left <-> top-right, ...).

The paper's setting, for 224-pixel windows (the view's defaults,
config_schema.PAPER_FEATURE_SCALES): scales (224, 256, 300, 360, 448, 560), 18 windows, 2
full-image views at 256: 96 + 2 = 98 views. For a network of another base size the window is
data.crop_size and the default scales are the paper's times crop_size / 224, rounded (the
demo's crop 64: scales (64, 73, 86, 103, 128, 160)); the full-image views are at
data.full_image.short_side (the demo's 72, the paper's 256).

Layout: the batches are the "multiscale" view's (spp_jax/data/pipeline.py): image (B, S, H, W,
3) with one unflipped image per entry of view.scales (the window scales, then the full views'
short side when it is not one of them), image_size (B, S, 2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.data.on_device import flip_within
from spp_jax.data.settings import ViewSettings
from spp_jax.ops.boxes import project_boxes
from spp_jax.ops.roi_pool import roi_spatial_pyramid_pool

# (row, column) of each position: 0 = start, 1 = middle, 2 = end of the axis. The order makes
# windows=1 the centre, 5 the centre and corners (the 10-view's), 9 all.
POSITIONS = ((1, 1), (0, 0), (0, 2), (2, 0), (2, 2), (0, 1), (2, 1), (1, 0), (1, 2))
POSITION_NAMES = ("centre", "top left", "top right", "bottom left", "bottom right", "top",
                  "bottom", "left", "right")


@dataclasses.dataclass(frozen=True)
class FeatureViews:
  """What the step needs of a feature_multiview view (all static).

  window_index: the indices into the batch's images (view.scales) of the window scales.
  positions: 1, 5 or 9 window positions per scale; mirrored: also the mirror image's.
  full_index: the image whose whole map gives the full-image views (None: no such views).
  """
  size: int
  window_index: tuple[int, ...]
  positions: int
  mirrored: bool
  full_index: int | None
  full_views: int

  @property
  def runs_mirror(self) -> bool:
    return self.mirrored or self.full_views == 2

  @property
  def nominal_views(self) -> int:
    """Views per example before coinciding windows are merged (the paper's: 6 x 18 + 2)."""
    return len(self.window_index) * self.positions * (2 if self.mirrored else 1) + \
        self.full_views


def plan(view: ViewSettings) -> FeatureViews:
  """The static plan of a checked feature_multiview view."""
  if view.kind != "feature_multiview":
    raise ValueError(f"view {view.name!r} is {view.kind!r}, not feature_multiview")
  mirrored = view.windows % 2 == 0 and view.windows > 1
  positions = view.windows // 2 if mirrored else view.windows
  full_index = view.scales.index(view.short_side) if view.full_views else None
  return FeatureViews(size=view.size,
                      window_index=tuple(view.scales.index(s) for s in view.window_scales),
                      positions=positions, mirrored=mirrored, full_index=full_index,
                      full_views=view.full_views)


# ----------------------------------------------------------------------------- geometry


def window_boxes(image_size: jax.Array, size: int, positions: int = 9):
  """Pixel windows of each image and which of them are distinct.

  image_size: (N, 2) int (h, w) of each image at this scale.
  Returns (boxes (N, P, 4) int32 (x0, y0, x1, y1), distinct (N, P) bool): P = positions; a
  window is distinct when no earlier one has the same box. A side shorter than `size` (an
  image shrunk to fit its bucket) gives windows the image's whole length on that axis.
  """
  if positions not in (1, 5, 9):
    raise ValueError(f"positions must be 1, 5 or 9, got {positions}")
  xp = jnp if isinstance(image_size, jax.Array) else np
  hw = xp.asarray(image_size).astype(xp.int32)
  side = xp.minimum(hw, size)                                   # (N, 2) window h, w
  span = hw - side
  starts = xp.stack([xp.zeros_like(span), span // 2, span], axis=1)   # (N, 3, 2)
  rows = xp.asarray([p[0] for p in POSITIONS[:positions]])
  cols = xp.asarray([p[1] for p in POSITIONS[:positions]])
  y0, x0 = starts[:, rows, 0], starts[:, cols, 1]                # (N, P)
  boxes = xp.stack([x0, y0, x0 + side[:, None, 1], y0 + side[:, None, 0]], axis=-1)
  same = xp.all(boxes[:, :, None, :] == boxes[:, None, :, :], axis=-1)   # (N, P, P)
  earlier = xp.tril(xp.ones((positions, positions), bool), k=-1)
  distinct = ~xp.any(same & earlier[None], axis=-1)
  return boxes.astype(xp.int32), distinct


def window_cells(boxes: jax.Array, stride: int, map_shape: tuple[int, int],
                 map_sizes: jax.Array) -> jax.Array:
  """Pixel windows -> conv-map cells by the paper's rule (`project_boxes`), per image's map.

  boxes: (N, P, 4) pixel (x0, y0, x1, y1); map_shape: the padded (fh, fw) of the maps;
  map_sizes: (N, 2) each image's own map (h, w). Returns (N, P, 4) int32 (y0, x0, y1, x1),
  clamped to the image's own map as project_boxes clamps to a map: start inside it, end in
  start + 1 .. size.
  """
  n, p = boxes.shape[:2]
  cells = project_boxes(boxes.reshape(n * p, 4), stride, map_shape).reshape(n, p, 4)
  lim = jnp.asarray(map_sizes, jnp.int32)[:, None, :]            # (N, 1, 2) (h, w)
  start = jnp.minimum(cells[..., :2], lim - 1)
  end = jnp.clip(cells[..., 2:], start + 1, lim)
  return jnp.concatenate([start, end], axis=-1)


# ----------------------------------------------------------------------------- scoring


def _conv_maps(model, images, sizes, mirror: bool):
  """(maps (M, fh, fw, C), map sizes (M, 2)); M = N, or 2N with the mirror images after."""
  if mirror:
    images = jnp.concatenate([images, flip_within(images, sizes[:, 1])], axis=0)
    sizes = jnp.concatenate([sizes, sizes], axis=0)
  return model.features(images, sizes)


def _scale_windows(fv: FeatureViews, stride: int, fmap_shape, fsizes, sizes, n: int,
                   windows: bool, full: bool):
  """Windows of one scale's maps: (cells (R, 4), map index (R,), example (R,), weight (R,))."""
  out = []
  example = jnp.arange(n, dtype=jnp.int32)
  if windows:
    boxes, distinct = window_boxes(sizes, fv.size, fv.positions)
    p = fv.positions
    for copy in range(2 if fv.mirrored else 1):
      maps = example + copy * n
      cells = window_cells(boxes, stride, fmap_shape, fsizes[maps])
      out.append((cells.reshape(n * p, 4), jnp.repeat(maps, p), jnp.repeat(example, p),
                  distinct.reshape(n * p).astype(jnp.float32)))
  if full:
    for copy in range(fv.full_views):
      maps = example + copy * n
      whole = jnp.concatenate([jnp.zeros((n, 2), jnp.int32), fsizes[maps]], axis=1)
      out.append((whole, maps, example, jnp.ones((n,), jnp.float32)))
  return [jnp.concatenate(parts) for parts in zip(*out)]


def pooled_views(model, images: jax.Array, image_size: jax.Array, fv: FeatureViews,
                 view_shapes=None):
  """Every view of every example, pooled: (pooled (R, D), example (R,), weight (R,)).

  images: (N, S, H, W, 3) float32 inputs (normalised, zero outside each image);
  image_size: (N, S, 2); view_shapes: optional padded (h, w) per image (image v then runs on
  images[:, v, :h, :w]). weight 0 marks a window that coincides with an earlier one.
  """
  if getattr(model, "head_kind", "spp") != "spp":
    raise ValueError("multi-view testing on feature maps needs the SPP head: the windows' "
                     "maps have other sizes than the base size's")
  n, s = images.shape[:2]
  shapes = view_shapes or [images.shape[2:4]] * s
  pooled, example, weight = [], [], []
  for i, (h, w) in enumerate(shapes):
    windows, full = i in fv.window_index, i == fv.full_index
    if not (windows or full):
      continue
    sizes = image_size[:, i].astype(jnp.int32)
    mirror = (windows and fv.mirrored) or (full and fv.full_views == 2)
    fmap, fsizes = _conv_maps(model, images[:, i, :h, :w], sizes, mirror)
    cells, maps, ex, wt = _scale_windows(fv, model.feature_stride, fmap.shape[1:3], fsizes,
                                         sizes, n, windows, full)
    pooled.append(roi_spatial_pyramid_pool(fmap, cells, model.spp.levels, batch_index=maps))
    example.append(ex)
    weight.append(wt)
  return jnp.concatenate(pooled), jnp.concatenate(example), jnp.concatenate(weight)


def average_probs(model, images: jax.Array, image_size: jax.Array, fv: FeatureViews,
                  view_shapes=None) -> jax.Array:
  """(N, classes) softmax averaged over each example's distinct views (see `pooled_views`)."""
  pooled, example, weight = pooled_views(model, images, image_size, fv, view_shapes)
  probs = jax.nn.softmax(model.head(pooled).astype(jnp.float32), axis=-1)
  n = images.shape[0]
  total = jax.ops.segment_sum(probs * weight[:, None], example, num_segments=n)
  count = jax.ops.segment_sum(weight, example, num_segments=n)
  return total / jnp.maximum(count, 1.0)[:, None]


def view_counts(image_size, fv: FeatureViews) -> np.ndarray:
  """(N,) distinct views per example (numpy): what `average_probs` averages over."""
  sizes = np.asarray(image_size)
  count = np.zeros(sizes.shape[0], np.int64)
  for i in fv.window_index:
    _, distinct = window_boxes(sizes[:, i], fv.size, fv.positions)
    count += distinct.sum(-1) * (2 if fv.mirrored else 1)
  return count + fv.full_views


__all__ = ["FeatureViews", "plan", "window_boxes", "window_cells", "pooled_views",
           "average_probs", "view_counts", "POSITIONS", "POSITION_NAMES"]
