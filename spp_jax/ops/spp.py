"""Spatial pyramid pooling (He et al., 2014), exact bins for every map size.

Bin rule (SPEC §1): on an axis of length `a` split into `n` bins, bin `i` covers
`[floor(i*a/n), ceil((i+1)*a/n))`. No bin is empty for any a >= 1, bins may overlap,
rows and columns are split independently.

How it is computed, and why:
- Max pooling is separable: the max over a rectangle is the max over its columns of the
  max over its rows. Rows are reduced first (N, H, W, C) -> (N, nh, W, C), then columns.
- Levels nest: when a level (nh, nw) divides a finer one (mh, mw) on both axes, every coarse
  bin is exactly the union of (mh/nh) x (mw/nw) fine bins, so (3, 2, 1) come from the 6x6
  result and the input is read once.
- With static sizes each row belongs to one or two bins, so the forward pass keeps the arg-max
  row/column of every bin and a custom VJP sends each bin's gradient to it in one pass that
  touches every input element about once (autodiff of per-bin slices would scatter once per bin).
- With `valid_sizes` the bins differ per example and may be traced: bins become masks over the
  padded axis, built from the sizes inside the compiled function (one compilation per padded
  shape). Masked cells are replaced by -inf (max) or 0 (avg) before any arithmetic, so padding,
  NaN and inf included, never reaches a result or a gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Level = Union[int, tuple[int, int]]
Levels = tuple[tuple[int, int], ...]

_POOLINGS = ("max", "avg")


# ----------------------------------------------------------------------------- arguments


def normalize_levels(levels: Sequence[Level]) -> Levels:
  """Returns levels as a tuple of (nh, nw) pairs; raises ValueError naming bad entries."""
  if isinstance(levels, (int, np.integer)):
    raise ValueError(f"levels must be a sequence of ints or (nh, nw) pairs, got levels={levels!r}")
  try:
    entries = list(levels)
  except TypeError:
    raise ValueError(
        f"levels must be a sequence of ints or (nh, nw) pairs, got levels={levels!r}") from None
  if not entries:
    raise ValueError(f"levels must not be empty, got levels={levels!r}")
  out = []
  for entry in entries:
    pair = (entry, entry) if _is_int(entry) else entry
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
        or not all(_is_int(v) for v in pair)):
      raise ValueError(
          f"each entry of levels must be an int n or a pair (nh, nw) of ints, "
          f"got {entry!r} in levels={levels!r}")
    if min(pair) < 1:
      raise ValueError(f"every level must be >= 1, got {entry!r} in levels={levels!r}")
    out.append((int(pair[0]), int(pair[1])))
  return tuple(out)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def spp_output_dim(levels: Sequence[Level], channels: int) -> int:
  """Length of the pooled vector: channels * sum(nh * nw)."""
  return int(channels) * sum(nh * nw for nh, nw in normalize_levels(levels))


def bin_edges(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Static bin edges: starts[i] = floor(i*size/n), ends[i] = ceil((i+1)*size/n)."""
  i = np.arange(n)
  return (i * size) // n, -((-(i + 1) * size) // n)


def _bin_masks(sizes: jax.Array, n: int, length: int) -> jax.Array:
  """Membership of cells in bins for per-example sizes.

  sizes: (N,) int, valid length of each example (traced is fine).
  Returns (N, n, length) bool: cell p of example b is in bin i.
  """
  i = jnp.arange(n, dtype=jnp.int32)[None, :]
  s = sizes.astype(jnp.int32)[:, None]
  starts = (i * s) // n
  ends = -((-(i + 1) * s) // n)
  p = jnp.arange(length, dtype=jnp.int32)[None, None, :]
  return (p >= starts[..., None]) & (p < ends[..., None])


def check_pooling_input(name: str, x, pooling: str) -> tuple[int, int, int, int]:
  """Checks a (N, H, W, C) float map and the pooling mode; returns the shape."""
  if pooling not in _POOLINGS:
    raise ValueError(f"pooling must be one of {_POOLINGS}, got pooling={pooling!r}")
  if np.ndim(x) != 4:
    raise ValueError(f"{name} must have rank 4 (N, H, W, C), got shape {np.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must have a float dtype, got {jnp.result_type(x)}")
  n, h, w, c = np.shape(x)
  if min(h, w) < 1:
    raise ValueError(f"{name} must have H, W >= 1, got shape {np.shape(x)}")
  return n, h, w, c


def _check_valid_sizes(valid_sizes, n: int, h: int, w: int):
  shape = np.shape(valid_sizes)
  if shape != (n, 2):
    raise ValueError(f"valid_sizes must have shape (N, 2) = ({n}, 2), got shape {shape}")
  if isinstance(valid_sizes, jax.core.Tracer):
    return  # Traced values are checked by the caller that made them.
  v = np.asarray(valid_sizes)
  if not np.issubdtype(v.dtype, np.integer):
    raise ValueError(f"valid_sizes must be integers, got dtype {v.dtype}")
  bad_h = (v[:, 0] < 1) | (v[:, 0] > h)
  bad_w = (v[:, 1] < 1) | (v[:, 1] > w)
  if bad_h.any() or bad_w.any():
    i = int(np.flatnonzero(bad_h | bad_w)[0])
    raise ValueError(
        f"valid_sizes[{i}] = {tuple(int(t) for t in v[i])} is outside 1..{h} x 1..{w} "
        f"(the padded height and width of x)")


# ----------------------------------------------------------------------------- public op


def spatial_pyramid_pool(x: jax.Array, levels: Sequence[Level], *, pooling: str = "max",
                         valid_sizes: jax.Array | None = None) -> jax.Array:
  """Spatial pyramid pooling of a batch of feature maps.

  Args:
    x: (N, H, W, C) feature maps, any float dtype.
    levels: entries n (n x n bins) or (nh, nw); static.
    pooling: "max" (starts from -inf) or "avg" (mean of the bin's cells).
    valid_sizes: optional (N, 2) ints (h, w): example i occupies x[i, :h, :w], the rest is
      padding that never reaches the result. May be traced.

  Returns:
    (N, C * sum(nh * nw)) in x's dtype: per level its (N, nh, nw, C) array flattened
    row-major (bins in (row, column) order, a bin's C channels contiguous), levels
    concatenated in the order given.
  """
  norm_levels = normalize_levels(levels)
  n, h, w, _ = check_pooling_input("x", x, pooling)
  if valid_sizes is None:
    return _spp_static(x, norm_levels, pooling)
  _check_valid_sizes(valid_sizes, n, h, w)
  return _spp_masked(x, jnp.asarray(valid_sizes, jnp.int32), norm_levels, pooling)


@functools.partial(jax.jit, static_argnames=("levels", "pooling"))
def _spp_static(x, levels: Levels, pooling: str):
  if pooling == "avg":
    n, h, w, _ = x.shape
    sizes = jnp.broadcast_to(jnp.array([h, w], jnp.int32), (n, 2))
    return _concat([_avg_level(x, sizes, lv) for lv in levels])
  return _max_pyramid(x, levels, lambda level: _max_level_static(x, level))


@functools.partial(jax.jit, static_argnames=("levels", "pooling"))
def _spp_masked(x, valid_sizes, levels: Levels, pooling: str):
  if pooling == "avg":
    return _concat([_avg_level(x, valid_sizes, lv) for lv in levels])
  return _max_pyramid(x, levels, lambda level: _max_level_traced(x, valid_sizes, level))


def _concat(pooled: list[jax.Array]) -> jax.Array:
  n = pooled[0].shape[0]
  return jnp.concatenate([p.reshape(n, math.prod(p.shape[1:])) for p in pooled], axis=1)


# ----------------------------------------------------------------------------- max, shared


def _max_pyramid(x, levels: Levels, pool_root) -> jax.Array:
  """Pools the finest levels from x and every level they divide from their result."""
  roots: dict[tuple[int, int], jax.Array] = {}
  for level in sorted(set(levels), key=lambda lv: -lv[0] * lv[1]):
    if not any(_divides(level, root) for root in roots):
      roots[level] = pool_root(level)
  pooled = []
  for level in levels:
    root = next(r for r in roots if _divides(level, r))
    pooled.append(_coarsen(roots[root], level))
  return _concat(pooled)


def _divides(level, root) -> bool:
  return root[0] % level[0] == 0 and root[1] % level[1] == 0


def _coarsen(y: jax.Array, level) -> jax.Array:
  """(N, mh, mw, C) fine bins -> (N, nh, nw, C) coarse bins; exact for the bin rule."""
  n, mh, mw, c = y.shape
  nh, nw = level
  if (mh, mw) == (nh, nw):
    return y
  # Elementwise maxima rather than reduce_max: XLA:CPU's YNNPACK reduction can drop NaN.
  y = y.reshape(n, nh, mh // nh, nw, mw // nw, c)
  parts = [y[:, :, i, :, j] for i in range(mh // nh) for j in range(mw // nw)]
  return functools.reduce(jnp.maximum, parts)


# ----------------------------------------------------------------------------- max, static


def _max_level_static(x: jax.Array, level) -> jax.Array:
  """x: (N, H, W, C) -> (N, nh, nw, C), rows then columns, custom VJP."""
  _, h, w, _ = x.shape
  rows = tuple(zip(*(e.tolist() for e in bin_edges(h, level[0]))))
  cols = tuple(zip(*(e.tolist() for e in bin_edges(w, level[1]))))
  return _separable_max(x, rows, cols)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _separable_max(x, rows, cols):
  return _separable_max_fwd(x, rows, cols)[0]


def _separable_max_fwd(x, rows, cols):
  y1, arg_rows = _bin_max(x, rows, axis=1)
  y, arg_cols = _bin_max(y1, cols, axis=2)
  return y, (arg_rows, arg_cols, x.shape[1], x.shape[2])


def _separable_max_bwd(rows, cols, res, g):
  arg_rows, arg_cols, h, w = res
  g1 = _bin_max_grad(g, arg_cols, cols, w, axis=2)
  return (_bin_max_grad(g1, arg_rows, rows, h, axis=1),)


_separable_max.defvjp(_separable_max_fwd, _separable_max_bwd)


def _index_dtype(size: int):
  return jnp.int8 if size <= 127 else jnp.int16 if size <= 32767 else jnp.int32


def _bin_max(x: jax.Array, bins, axis: int):
  """Max over static index ranges along `axis`, with the arg-max of each bin.

  Returns the pooled array (len(bins) along `axis`) and the arg-max positions (absolute
  indices along `axis`, first maximum wins). NaN propagates like jnp.max.
  """
  idx_dtype = _index_dtype(x.shape[axis])
  take = lambda p: jax.lax.index_in_dim(x, p, axis, keepdims=False)
  values, args = [], []
  for start, end in bins:
    best = take(start)
    arg = jnp.full(best.shape, start, idx_dtype)
    for p in range(start + 1, end):
      v = take(p)
      better = (v > best) | (jnp.isnan(v) & ~jnp.isnan(best))
      best = jnp.where(better, v, best)
      arg = jnp.where(better, jnp.asarray(p, idx_dtype), arg)
    values.append(best)
    args.append(arg)
  return jnp.stack(values, axis=axis), jnp.stack(args, axis=axis)


def _bin_max_grad(g: jax.Array, args: jax.Array, bins, size: int, axis: int) -> jax.Array:
  """Transpose of _bin_max: sends each bin's gradient to its arg-max along `axis`."""
  members: list[list[int]] = [[] for _ in range(size)]
  for b, (start, end) in enumerate(bins):
    for p in range(start, end):
      members[p].append(b)
  take = lambda a, b: jax.lax.index_in_dim(a, b, axis, keepdims=False)
  out = []
  for p, bs in enumerate(members):
    terms = [jnp.where(take(args, b) == p, take(g, b), 0) for b in bs]
    out.append(functools.reduce(jnp.add, terms).astype(g.dtype))
  return jnp.stack(out, axis=axis)


# ----------------------------------------------------------------------------- max, traced


def _max_level_traced(x: jax.Array, valid_sizes: jax.Array, level) -> jax.Array:
  """x: (N, H, W, C), valid_sizes (N, 2) -> (N, nh, nw, C) over each example's own region.

  A bin never spans more than K = ceil(A/n) + 1 cells of an axis of padded length A, so each
  bin is a gather of K rows (columns) whose cells beyond the bin are replaced by -inf: about
  (A + n)/A reads of x, whatever the valid sizes, and one executable per padded shape.
  """
  _, h, w, _ = x.shape
  row_starts, row_sizes = _traced_edges(valid_sizes[:, 0], level[0])
  col_starts, col_sizes = _traced_edges(valid_sizes[:, 1], level[1])
  # Columns outside the example are cleared first so that padding (NaN and inf included)
  # cannot reach the row stage's outputs, which the column stage then discards.
  col_valid = jnp.arange(w)[None, :] < valid_sizes[:, 1:2]
  x = jnp.where(col_valid[:, None, :, None], x, jnp.array(-jnp.inf, x.dtype))
  return _gathered_max(x, row_starts, row_sizes, col_starts, col_sizes,
                       _max_bin_len(h, level[0]), _max_bin_len(w, level[1]))


def _traced_edges(sizes: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """sizes: (N,) -> bin starts and lengths, each (N, n) int32."""
  i = jnp.arange(n, dtype=jnp.int32)[None, :]
  s = sizes.astype(jnp.int32)[:, None]
  starts = (i * s) // n
  return starts, -((-(i + 1) * s) // n) - starts


def _max_bin_len(length: int, n: int) -> int:
  return min(length, -(-length // n) + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gathered_max(x, row_starts, row_sizes, col_starts, col_sizes, k_rows, k_cols):
  return _gathered_max_fwd(x, row_starts, row_sizes, col_starts, col_sizes, k_rows, k_cols)[0]


def _gathered_max_fwd(x, row_starts, row_sizes, col_starts, col_sizes, k_rows, k_cols):
  y1, arg_rows = _window_max(x, row_starts, row_sizes, k_rows)
  y, arg_cols = _window_max(y1.swapaxes(1, 2), col_starts, col_sizes, k_cols)
  res = (arg_rows, arg_cols, row_starts, row_sizes, col_starts, col_sizes, x.shape[1], x.shape[2])
  return y.swapaxes(1, 2), res


def _gathered_max_bwd(k_rows, k_cols, res, g):
  arg_rows, arg_cols, row_starts, row_sizes, col_starts, col_sizes, h, w = res
  g1 = _window_max_grad(g.swapaxes(1, 2), arg_cols, col_starts, k_cols, w).swapaxes(1, 2)
  dx = _window_max_grad(g1, arg_rows, row_starts, k_rows, h)
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return dx, zero(row_starts), zero(row_sizes), zero(col_starts), zero(col_sizes)


_gathered_max.defvjp(_gathered_max_fwd, _gathered_max_bwd)


def _window_rows(starts: jax.Array, k: int, length: int) -> jax.Array:
  """(N, n) starts -> (N, n * k) row indices of each bin's window, clipped to the axis."""
  rows = starts[:, :, None] + jnp.arange(k, dtype=jnp.int32)
  return jnp.minimum(rows, length - 1).reshape(starts.shape[0], -1)


def _window_max(x, starts, sizes, k: int):
  """x: (N, A, W, C), bins (N, n) -> max (N, n, W, C) and arg-max offset within the bin."""
  n, a = x.shape[:2]
  n_bins = starts.shape[1]
  rows = _window_rows(starts, k, a)[:, :, None, None]
  xg = jnp.take_along_axis(x, rows, axis=1, mode="promise_in_bounds")
  xg = xg.reshape(n, n_bins, k, *x.shape[2:])
  inside = (jnp.arange(k) < sizes[:, :, None])[..., None, None]
  xg = jnp.where(inside, xg, jnp.array(-jnp.inf, x.dtype))
  best = xg[:, :, 0]
  arg = jnp.zeros(best.shape, _index_dtype(k))
  for offset in range(1, k):
    v = xg[:, :, offset]
    better = (v > best) | (jnp.isnan(v) & ~jnp.isnan(best))
    best = jnp.where(better, v, best)
    arg = jnp.where(better, jnp.asarray(offset, arg.dtype), arg)
  return best, arg


def _window_max_grad(g, arg, starts, k: int, length: int):
  """Transpose of _window_max: (N, n, W, C) cotangents -> (N, length, W, C), one scatter."""
  n, n_bins = g.shape[:2]
  offsets = jnp.arange(k, dtype=arg.dtype)[None, None, :, None, None]
  routed = jnp.where(arg[:, :, None] == offsets, g[:, :, None], jnp.zeros((), g.dtype))
  routed = routed.reshape(n, n_bins * k, *g.shape[2:])
  rows = _window_rows(starts, k, length)
  dx = jnp.zeros((n, length, *g.shape[2:]), g.dtype)
  return dx.at[jnp.arange(n)[:, None], rows].add(routed, mode="promise_in_bounds")


# ----------------------------------------------------------------------------- avg


def _avg_level(x: jax.Array, valid_sizes: jax.Array, level) -> jax.Array:
  """Mean over each bin: a linear map, rows and columns as (N, n, size) averaging matrices."""
  _, h, w, _ = x.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  row_masks = _bin_masks(valid_sizes[:, 0], level[0], h)
  col_masks = _bin_masks(valid_sizes[:, 1], level[1], w)
  inside = row_masks.any(1)[:, :, None, None] & col_masks.any(1)[:, None, :, None]
  xs = jnp.where(inside, x, 0).astype(acc)
  rows = row_masks / row_masks.sum(-1, keepdims=True)
  cols = col_masks / col_masks.sum(-1, keepdims=True)
  y = jnp.einsum("bih,bhwc,bjw->bijc", rows.astype(acc), xs, cols.astype(acc),
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


__all__ = ["spatial_pyramid_pool", "spp_output_dim", "normalize_levels", "bin_edges"]
