"""Spatial pyramid pooling of many windows of shared feature maps (SPP-net detection,
docs/paper.md §6).

`roi_spatial_pyramid_pool` pools R windows, each a rectangle of feature-map cells of one image,
into R fixed-length vectors. Row r is exactly `spatial_pyramid_pool(features[b, y0:y1, x0:x1][None],
levels)`: the bin rule of docs/paper.md §1 applied to the window's own height and width.

How max pooling is computed, and why:
- The bins of thousands of overlapping windows overlap each other heavily, so reducing every bin
  from scratch (masks or slabs) costs R * bins * bin-area * C. Instead each image's map is turned
  once into a 2-D sparse table: T[l, k][y, x] = max of the 2^k x 2^l cells starting at (y, x).
  The max of any rectangle of a x b cells is the max of the four table entries at level
  (floor(log2 a), floor(log2 b)) whose squares cover it (overlap is harmless for max), so every
  bin of every level costs four gathers of C-vectors whatever its size, and the result is bit
  for bit the max of the bin. Tables go up to the longest bin any window of the map can have.
- Every level is read from the tables directly rather than coarsened from a finer level as
  `spatial_pyramid_pool` does: XLA:CPU fuses the gathers into every consumer of the fine bins
  and repeats them there (measured 5-10x slower), and its YNNPACK reduce_max fusion drops NaN.
- Only cells inside a bin are ever read, so values outside the window (padding, NaN, inf) never
  reach a result or a gradient.
- The gradient has a custom VJP: the tables also carry the position of each maximum, and the
  backward pass adds each bin's gradient at that position. Ties go to the lowest column, then
  the lowest row: the cell `spatial_pyramid_pool` picks for its finest level. (Its coarser
  levels split a tie's gradient between tied fine bins; with ties the two gradients can differ,
  both valid subgradients; without ties they agree.) Without differentiation the position
  tables are never built.

Average pooling is a linear map: rows and columns of every window become (R, n, H) and (R, n, W)
averaging matrices and the pooling two matmuls (O(R * nh * N * H * W * C) work, fine for its
occasional use; max is the detection default). Non-finite values outside a window are
excluded and non-finite values inside one propagate like a plain mean.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.ops.argmax import beats
from spp_jax.ops.spp import Level, Levels, _concat
from spp_jax.ops.spp import bin_edges, check_pooling_input, normalize_levels



# ----------------------------------------------------------------------------- public op


def roi_spatial_pyramid_pool(features: jax.Array, windows: jax.Array, levels: Sequence[Level], *,
                             batch_index: jax.Array | None = None,
                             pooling: str = "max") -> jax.Array:
  """Spatial pyramid pooling of R windows of a batch of feature maps.

  Args:
    features: (N, H, W, C) feature maps, any float dtype.
    windows: (R, 4) ints (y0, x0, y1, x1): window r covers rows y0..y1-1 and columns x0..x1-1
      of its map (half-open, 0 <= y0 < y1 <= H, 0 <= x0 < x1 <= W). May be traced; traced
      windows are not checked and are clipped into the map so they never read out of bounds.
    levels: entries n (n x n bins) or (nh, nw); static.
    batch_index: optional (R,) ints: the image each window belongs to (default 0).
    pooling: "max" (starts from -inf) or "avg".

  Returns:
    (R, C * sum(nh * nw)) in features' dtype, laid out like `spatial_pyramid_pool`: row r equals
    `spatial_pyramid_pool(features[b, y0:y1, x0:x1][None], levels)[0]` (max: bit for bit; avg:
    up to float rounding).
  """
  norm_levels = normalize_levels(levels)
  n, h, w, _ = check_pooling_input("features", features, pooling)
  if n < 1:
    raise ValueError(f"features must hold at least one map, got shape {np.shape(features)}")
  if not isinstance(windows, jax.Array):
    windows = np.asarray(windows)
  if batch_index is not None and not isinstance(batch_index, jax.Array):
    batch_index = np.asarray(batch_index)
  r = _check_windows(windows, h, w)
  if batch_index is None:
    batch_index = jnp.zeros((r,), jnp.int32)
  else:
    _check_batch_index(batch_index, r, n)
  windows = jnp.asarray(windows, jnp.int32)
  batch_index = jnp.asarray(batch_index, jnp.int32)
  return _roi_spp(features, windows, batch_index, norm_levels, pooling)


def _check_windows(windows, h: int, w: int) -> int:
  shape = np.shape(windows)
  if len(shape) != 2 or shape[1] != 4:
    raise ValueError(f"windows must have shape (R, 4) (y0, x0, y1, x1), got shape {shape}")
  if not jnp.issubdtype(windows.dtype, jnp.integer):
    raise ValueError(f"windows must be integer feature-map cells, got dtype {windows.dtype}")
  if isinstance(windows, jax.core.Tracer):
    return shape[0]
  v = np.asarray(windows)
  y0, x0, y1, x1 = v.T
  bad = (y0 < 0) | (x0 < 0) | (y1 <= y0) | (x1 <= x0) | (y1 > h) | (x1 > w)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"windows[{i}] = (y0, x0, y1, x1) = {tuple(int(t) for t in v[i])} is not a non-empty "
        f"window of a {h} x {w} feature map (need 0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w})")
  return shape[0]


def _check_batch_index(batch_index, r: int, n: int):
  shape = np.shape(batch_index)
  if shape != (r,):
    raise ValueError(f"batch_index must have shape (R,) = ({r},), got shape {shape}")
  if not jnp.issubdtype(batch_index.dtype, jnp.integer):
    raise ValueError(f"batch_index must be integers, got dtype {batch_index.dtype}")
  if isinstance(batch_index, jax.core.Tracer):
    return
  v = np.asarray(batch_index)
  bad = (v < 0) | (v >= n)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"batch_index[{i}] = {int(v[i])} is outside 0..{n - 1} (the batch of "
                     f"features)")


@functools.partial(jax.jit, static_argnames=("levels", "pooling"))
def _roi_spp(features, windows, batch_index, levels: Levels, pooling: str):
  n, h, w, c = features.shape
  windows = _clip_windows(windows, h, w)
  batch_index = jnp.clip(batch_index, 0, n - 1)
  if windows.shape[0] == 0:
    return jnp.zeros((0, c * sum(nh * nw for nh, nw in levels)), features.dtype)
  if pooling == "avg":
    return _concat([_avg_level(features, windows, batch_index, lv) for lv in levels])
  return _roi_max(features, windows, batch_index, levels, features.shape)


def _clip_windows(windows, h: int, w: int):
  """Makes any window a valid one (concrete windows were checked already: a no-op for them)."""
  y0 = jnp.clip(windows[:, 0], 0, h - 1)
  x0 = jnp.clip(windows[:, 1], 0, w - 1)
  y1 = jnp.clip(windows[:, 2], y0 + 1, h)
  x1 = jnp.clip(windows[:, 3], x0 + 1, w)
  return jnp.stack([y0, x0, y1, x1], axis=1)


# ----------------------------------------------------------------------------- window bins


def _window_bins(start: jax.Array, size: jax.Array, n: int):
  """Per-window bin edges: (R,) start, size -> (R, n) absolute starts and ends.

  The bin rule of docs/paper.md §1.
  """
  i = jnp.arange(n, dtype=jnp.int32)[None, :]
  s = size[:, None]
  return start[:, None] + (i * s) // n, start[:, None] - ((-(i + 1) * s) // n)


def _max_bin_length(length: int, n: int) -> int:
  """Longest bin over all window sizes 1..length split into n bins."""
  longest = 1
  for a in range(1, length + 1):
    starts, ends = bin_edges(a, n)
    longest = max(longest, int((ends - starts).max()))
  return longest


def _floor_log2(length: int) -> int:
  return int(length).bit_length() - 1


def _table_depths(h: int, w: int, levels: Levels) -> tuple[int, int]:
  """Number of sparse-table levels needed along rows and columns."""
  depth_h = max(_floor_log2(_max_bin_length(h, nh)) for nh, _ in levels) + 1
  depth_w = max(_floor_log2(_max_bin_length(w, nw)) for _, nw in levels) + 1
  return depth_h, depth_w


# ----------------------------------------------------------------------------- max


def _build_tables(x: jax.Array, depth_h: int, depth_w: int, with_keys: bool):
  """Sparse tables of x (N, H, W, C): (depth_w * depth_h * N * H * W, C) maxima (and keys).

  Row ((l * depth_h + k) * N + b) * H * W + y * W + x holds the max over rows y..y+2^k-1 and
  columns x..x+2^l-1 of image b (where these exist; other rows are never queried). Keys number
  cells column-major (x * H + y): the lowest key among tied maxima is the cell that
  `spatial_pyramid_pool` picks (first column, then first row). Each doubling is one scan step
  so XLA materialises every table once instead of recomputing chains inside later ones.
  """
  c = x.shape[-1]
  _, h, w, _ = x.shape
  fills = (jnp.array(-jnp.inf, x.dtype), jnp.iinfo(jnp.int32).max)
  if with_keys:
    pos = jnp.arange(w, dtype=jnp.int32)[None, :] * h + jnp.arange(h, dtype=jnp.int32)[:, None]
    carry = (x, jnp.broadcast_to(pos[None, :, :, None], x.shape))
  else:
    carry = (x,)

  def doubling(axis):
    def step(arrays, offset):
      shifted = []
      for a, fill in zip(arrays, fills):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, a.shape[axis])
        padded = jnp.pad(a, pad, constant_values=fill)
        shifted.append(jax.lax.dynamic_slice_in_dim(padded, offset, a.shape[axis], axis))
      if with_keys:
        (a, ka), (b, kb) = arrays, shifted
        take_b = beats(b, a, kb, ka)
        return (jnp.where(take_b, b, a), jnp.where(take_b, kb, ka)), arrays
      return (jnp.maximum(arrays[0], shifted[0]),), arrays
    return step

  offsets = lambda depth: jnp.asarray([1 << i for i in range(depth)], jnp.int32)
  # Rows first: (depth_h, N, H, W, C); then columns of all of them: (depth_w, depth_h, ...).
  _, tables = jax.lax.scan(doubling(axis=1), carry, offsets(depth_h))
  _, tables = jax.lax.scan(doubling(axis=3), tables, offsets(depth_w))
  tables = tuple(t.reshape(-1, c) for t in tables)
  return tables if with_keys else (tables[0], None)


def _corner_indices(windows, batch_index, levels: Levels, shape, depth_h: int) -> jax.Array:
  """Table rows of the four squares that cover each bin: (4, R, B) int32, B = sum(nh * nw).

  Bins are ordered as in the output: level by level, each level's bins row-major.
  """
  n, h, w, _ = shape
  log2 = jnp.asarray([0] + [_floor_log2(a) for a in range(1, max(h, w) + 1)], jnp.int32)
  y0, x0, y1, x1 = (windows[:, i] for i in range(4))
  b = batch_index[:, None, None]
  r = windows.shape[0]
  out = []
  for nh, nw in levels:
    rs, re = _window_bins(y0, y1 - y0, nh)   # (R, nh)
    cs, ce = _window_bins(x0, x1 - x0, nw)   # (R, nw)
    kr, kc = log2[re - rs], log2[ce - cs]
    rows = (rs, re - (1 << kr))
    cols = (cs, ce - (1 << kc))
    base = ((kc[:, None, :] * depth_h + kr[:, :, None]) * n + b) * (h * w)
    corners = [base + ry[:, :, None] * w + cx[:, None, :] for ry in rows for cx in cols]
    out.append(jnp.stack(corners).reshape(4, r, nh * nw))
  return jnp.concatenate(out, axis=2)


def _gather_max(values, keys, idx):
  """Max of the four table rows of every bin: (4, R, B) idx -> (R, B, C) (and their keys)."""
  take = lambda table, i: table.at[i].get(mode="promise_in_bounds")
  best = take(values, idx[0])
  kbest = None if keys is None else take(keys, idx[0])
  for j in range(1, 4):
    v = take(values, idx[j])
    if keys is None:
      best = jnp.maximum(best, v)
      continue
    kv = take(keys, idx[j])
    take_v = beats(v, best, kv, kbest)
    best, kbest = jnp.where(take_v, v, best), jnp.where(take_v, kv, kbest)
  return best, kbest


def _roi_max_impl(features, windows, batch_index, levels: Levels, with_keys: bool):
  """(R, B * C) pooled windows and, if asked, (R, B, C) keys of the maxima."""
  _, h, w, _ = features.shape
  depth_h, depth_w = _table_depths(h, w, levels)
  values, keys = _build_tables(features, depth_h, depth_w, with_keys)
  idx = _corner_indices(windows, batch_index, levels, features.shape, depth_h)
  pooled, pooled_keys = _gather_max(values, keys, idx)
  return pooled.reshape(pooled.shape[0], -1), pooled_keys


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _roi_max(features, windows, batch_index, levels: Levels, shape):
  del shape  # A static copy of features.shape for the backward pass.
  return _roi_max_impl(features, windows, batch_index, levels, with_keys=False)[0]


def _roi_max_fwd(features, windows, batch_index, levels: Levels, shape):
  del shape
  pooled, keys = _roi_max_impl(features, windows, batch_index, levels, with_keys=True)
  return pooled, (keys, batch_index)


def _roi_max_bwd(levels: Levels, shape, res, g):
  """Adds each bin's gradient at the cell its maximum came from."""
  del levels
  keys, batch_index = res
  n, h, w, c = shape
  y, x = keys % h, keys // h                                   # (R, B, C)
  b = batch_index[:, None, None]
  flat = ((b * h + y) * w + x) * c + jnp.arange(c, dtype=jnp.int32)
  grad = jnp.zeros((n * h * w * c,), g.dtype).at[flat.reshape(-1)].add(
      g.reshape(-1), mode="promise_in_bounds")
  return grad.reshape(shape), None, None


_roi_max.defvjp(_roi_max_fwd, _roi_max_bwd)


# ----------------------------------------------------------------------------- avg


def _avg_level(features, windows, batch_index, level):
  """(N, H, W, C) -> (R, nh, nw, C): means over each window's bins, two matmuls."""
  n, h, w, c = features.shape
  acc = jnp.promote_types(features.dtype, jnp.float32)
  nh, nw = level
  rows = _window_masks(windows[:, 0], windows[:, 2], nh, h)   # (R, nh, H)
  cols = _window_masks(windows[:, 1], windows[:, 3], nw, w)   # (R, nw, W)
  rows_w = (rows / rows.sum(-1, keepdims=True)).astype(acc)
  cols_w = (cols / cols.sum(-1, keepdims=True)).astype(acc)
  onehot = (batch_index[:, None] == jnp.arange(n)[None, :]).astype(acc)   # (R, N)
  rows_nb = rows_w[:, :, None, :] * onehot[:, None, :, None]              # (R, nh, N, H)
  finite = jnp.isfinite(features)
  xs = jnp.where(finite, features, 0).astype(acc)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("rinh,nhwc->riwc", rows_nb, xs, precision=hp)
  y = jnp.einsum("rjw,riwc->rijc", cols_w, y, precision=hp)
  # Non-finite cells inside a bin make its mean what a plain mean would be: which of NaN, +inf
  # and -inf a bin holds comes from the same bin weights (positive where it holds one).
  y = jax.lax.cond(jnp.any(~finite), lambda: _apply_special(y, features, rows_nb, cols_w),
                   lambda: y)
  return y.astype(features.dtype)


def _apply_special(y, features, rows_nb, cols_w):
  hp = jax.lax.Precision.HIGHEST
  special = jnp.stack([jnp.isnan(features), features == jnp.inf, features == -jnp.inf],
                      axis=-1).astype(y.dtype)                              # (N, H, W, C, 3)
  cnt = jnp.einsum("rinh,nhwcs->riwcs", rows_nb, special, precision=hp)
  cnt = jnp.einsum("rjw,riwcs->rijcs", cols_w, cnt, precision=hp) > 0
  nan = cnt[..., 0] | (cnt[..., 1] & cnt[..., 2])
  y = jnp.where(cnt[..., 1], jnp.inf, y)
  y = jnp.where(cnt[..., 2], -jnp.inf, y)
  return jnp.where(nan, jnp.nan, y)


def _window_masks(start, end, n: int, length: int):
  """(R,) start/end -> (R, n, length) bool: cell p is in bin i of window r."""
  s, e = _window_bins(start, end - start, n)
  p = jnp.arange(length, dtype=jnp.int32)[None, None, :]
  return (p >= s[..., None]) & (p < e[..., None])


__all__ = ["roi_spatial_pyramid_pool"]
