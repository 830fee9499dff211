"""Spatial pyramid pooling (He et al., 2014), exact bins for every map size.

Bin rule (docs/paper.md §1, spp_jax/ops/bins.py): on an axis of length `a` split into `n`
bins, bin `i` covers `[floor(i*a/n), ceil((i+1)*a/n))`. No bin is empty for any a >= 1, bins
may overlap, rows and columns are split independently.

How it is computed, and why:
- Max pooling is separable: the max over a rectangle is the max over its columns of the
  max over its rows. Rows are reduced first (N, H, W, C) -> (N, nh, W, C), then columns.
- Levels nest: when a level (nh, nw) divides a finer one (mh, mw) on both axes, every coarse
  bin is exactly the union of (mh/nh) x (mw/nw) fine bins, for any size (traced ones too), so
  (3, 2, 1) come from the 6x6 result (1x1 from 3x3) and the input is read once.
- Every stage keeps the arg-max of each bin (the first maximum; NaN wins: ops/argmax.py), and
  custom VJPs send each bin's gradient to that one cell, in one pass per stage over the
  stage's input. Ties (ReLU zeros) are never split or counted twice.
- With `valid_sizes` the bins differ per example and may be traced (one compilation per padded
  shape). Cells past an example's size are masked or never read, and gradients are selected,
  never multiplied, so padding (NaN and inf included) never reaches a result or a gradient.
- The finest levels take the formulation that costs least on the platform compiled for:
  ops/masked_max.py (mask-then-reduce) on GPU and TPU and for symbolic shapes (jax.export),
  ops/cpu_kernels.py on CPU.
- Average pooling takes the same separable path with sums (in f32 at least) and written-out
  transposes, so a NaN in a cell reaches only the bins that hold it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.ops import cpu_kernels, masked_max
from spp_jax.ops.argmax import first_max
from spp_jax.ops.bins import (bin_edges, bin_slots, edge_arrays, max_bin_len, static_bins,
                              traced_edges, window_cells)

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


def check_pooling_input(name: str, x, pooling: str) -> tuple[int, int, int, int]:
  """Checks a (N, H, W, C) float map and the pooling mode; returns the shape."""
  if pooling not in _POOLINGS:
    raise ValueError(f"pooling must be one of {_POOLINGS}, got pooling={pooling!r}")
  if np.ndim(x) != 4:
    raise ValueError(f"{name} must have rank 4 (N, H, W, C), got shape {np.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must have a float dtype, got {jnp.result_type(x)}")
  n, h, w, c = np.shape(x)
  if h < 1 or w < 1:  # Not min(h, w): symbolic sizes (jax.export) compare only to constants.
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
    x: (N, H, W, C) feature maps, any float dtype. N, H and W may be symbolic (jax.export,
      pooling "max"): bins are then floor/ceil expressions of them.
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
  if pooling == "avg" and not (_is_int(h) and _is_int(w)):
    raise ValueError(f"avg pooling needs static (int) map sizes, got {h} x {w}; symbolic "
                     f"sizes (jax.export) are supported with pooling='max'")
  if valid_sizes is None:
    return _spp_static(x, norm_levels, pooling)
  _check_valid_sizes(valid_sizes, n, h, w)
  return _spp_masked(x, jnp.asarray(valid_sizes, jnp.int32), norm_levels, pooling)


@functools.partial(jax.jit, static_argnames=("levels", "pooling"))
def _spp_static(x, levels: Levels, pooling: str):
  if pooling == "avg":
    return _concat([_avg_level_static(x, lv) for lv in levels])
  return _max_pyramid(x, levels, lambda level: _max_level(x, None, level))


@functools.partial(jax.jit, static_argnames=("levels", "pooling"))
def _spp_masked(x, valid_sizes, levels: Levels, pooling: str):
  if pooling == "avg":
    return _concat([_avg_level_traced(x, valid_sizes, lv) for lv in levels])
  return _max_pyramid(x, levels, lambda level: _max_level(x, valid_sizes, level))


def _concat(pooled: list[jax.Array]) -> jax.Array:
  n = pooled[0].shape[0]
  return jnp.concatenate([p.reshape(n, math.prod(p.shape[1:])) for p in pooled], axis=1)


# ----------------------------------------------------------------------------- max, shared


def _max_pyramid(x, levels: Levels, pool_root) -> jax.Array:
  """Pools the finest levels from x, and every other level from the smallest pooled level
  it divides (1x1 from 3x3 rather than from 6x6: 9 maxima per bin instead of 36)."""
  pooled: dict[tuple[int, int], jax.Array] = {}
  for level in sorted(set(levels), key=lambda lv: -lv[0] * lv[1]):
    sources = [lv for lv in pooled if _divides(level, lv)]
    if sources:
      source = min(sources, key=lambda lv: lv[0] * lv[1])
      pooled[level] = _coarsen(pooled[source], level)
    else:
      pooled[level] = pool_root(level)
  return _concat([pooled[level] for level in levels])


def _divides(level, root) -> bool:
  return root[0] % level[0] == 0 and root[1] % level[1] == 0


def _coarsen(y: jax.Array, level) -> jax.Array:
  """(N, mh, mw, C) fine bins -> (N, nh, nw, C) coarse bins; exact for the bin rule."""
  _, mh, mw, _ = y.shape
  if (mh, mw) == tuple(level):
    return y
  return _coarse_max(y, mh // level[0], mw // level[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _coarse_max(y, kh: int, kw: int):
  return _coarse_max_fwd(y, kh, kw)[0]


def _fine_bins(y: jax.Array, kh: int, kw: int) -> list[jax.Array]:
  """The kh * kw fine bins of every coarse bin, each (N, nh, nw, C), in row-major order."""
  n, mh, mw, c = y.shape
  y = y.reshape(n, mh // kh, kh, mw // kw, kw, c)
  return [y[:, :, i, :, j] for i in range(kh) for j in range(kw)]


def _coarse_max_fwd(y, kh: int, kw: int):
  return cpu_kernels.isolated(lambda y: _coarse_max_chain(y, kh, kw), y)


def _coarse_max_chain(y, kh: int, kw: int):
  # Elementwise maxima rather than reduce_max: XLA:CPU's YNNPACK reduction can drop NaN.
  parts = _fine_bins(y, kh, kw)
  return first_max(parts, range(len(parts)), jnp.int8)


def _coarse_max_bwd(kh: int, kw: int, win, g):
  """Each coarse bin's gradient goes to the fine bin that held its maximum (autodiff of the
  maxima would split ties and costs XLA:CPU 20x more than the whole fine level)."""
  n, nh, nw, c = g.shape
  # One broadcast select: fine bin (i, j) of a coarse bin gets g where win == i * kw + j.
  local = (jnp.arange(kh, dtype=jnp.int8)[:, None] * kw
           + jnp.arange(kw, dtype=jnp.int8)[None, :])[None, None, :, None, :, None]
  dy = jnp.where(win[:, :, None, :, None] == local, g[:, :, None, :, None],
                 jnp.zeros((), g.dtype))
  return (dy.reshape(n, nh * kh, nw * kw, c),)


_coarse_max.defvjp(_coarse_max_fwd, _coarse_max_bwd)


# ----------------------------------------------------------------------------- max, one level


def _max_level(x: jax.Array, valid_sizes: jax.Array | None, level) -> jax.Array:
  """x: (N, H, W, C) -> (N, nh, nw, C) over the whole map, or each example's own region.

  The formulation follows the platform compiled for (cpu_kernels.by_platform): masked_max's
  mask-then-reduce on GPU and TPU, cpu_kernels' elementwise chains (static bins) or row
  gathers (traced bins) on CPU. Symbolic map sizes (jax.export) take masked_max everywhere:
  it is the only one whose program does not depend on the bins' lengths.
  """
  _, h, w, _ = x.shape
  if valid_sizes is None:
    rows, cols = edge_arrays(h, level[0]), edge_arrays(w, level[1])
  else:
    rows = traced_edges(valid_sizes[:, 0], level[0])
    cols = traced_edges(valid_sizes[:, 1], level[1])
  default = lambda x: masked_max.separable_max(x, rows, cols)
  if not (_is_int(h) and _is_int(w)):
    return default(x)
  if valid_sizes is None:
    rows_static, cols_static = static_bins(h, level[0]), static_bins(w, level[1])
    cpu = lambda x: cpu_kernels.spp_static_max(x, rows_static, cols_static)
  else:
    (rs, re), (cs, ce) = rows, cols
    k_rows, k_cols = max_bin_len(h, level[0]), max_bin_len(w, level[1])
    cpu = lambda x: cpu_kernels.spp_gathered_max(x, rs, re - rs, cs, ce - cs, k_rows, k_cols)
  return cpu_kernels.by_platform(x, cpu=cpu, default=default)

# ----------------------------------------------------------------------------- avg


# Averages are separable too (rows, then columns). Sums run in f32 at least, a NaN reaches only
# the bins that hold it, and each stage's transpose is written out (autodiff of per-bin slices
# or gathers would pad, or scatter, once per bin).


def _avg_level_static(x: jax.Array, level) -> jax.Array:
  """x: (N, H, W, C) -> (N, nh, nw, C), the mean of each bin's cells."""
  _, h, w, _ = x.shape
  rows, cols = static_bins(h, level[0]), static_bins(w, level[1])
  y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return _bin_mean(_bin_mean(y, rows, 1), cols, 2).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _bin_mean(x, bins, axis: int):
  take = lambda p: jax.lax.index_in_dim(x, p, axis, keepdims=False)
  # A chain of adds, like the maxima: one elementwise fusion rather than a reduction per bin.
  return jnp.stack([functools.reduce(jnp.add, map(take, range(start, end))) / (end - start)
                    for start, end in bins], axis=axis)


def _bin_mean_fwd(x, bins, axis: int):
  return _bin_mean(x, bins, axis), None


def _bin_mean_bwd(bins, axis: int, _, g):
  """Cell p gets g / len of every bin holding it: one constant-index gather per slot."""
  size = bins[-1][1]
  shape = [1] * g.ndim
  shape[axis] = size
  dx = None
  for which, valid in bin_slots(bins, size):
    weight = np.array([1.0 / (bins[b][1] - bins[b][0]) for b in which])
    term = jnp.take(g, which, axis=axis) * jnp.asarray(weight, g.dtype).reshape(shape)
    if not valid.all():  # A cotangent may be inf: select, never multiply by 0.
      term = jnp.where(jnp.asarray(valid).reshape(shape), term, jnp.zeros((), g.dtype))
    dx = term if dx is None else dx + term
  return (dx,)


_bin_mean.defvjp(_bin_mean_fwd, _bin_mean_bwd)


def _avg_level_traced(x: jax.Array, valid_sizes: jax.Array, level) -> jax.Array:
  """x: (N, H, W, C), valid_sizes (N, 2) -> (N, nh, nw, C) over each example's own region."""
  _, h, w, _ = x.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  row_starts, row_ends = traced_edges(valid_sizes[:, 0], level[0])
  col_starts, col_ends = traced_edges(valid_sizes[:, 1], level[1])
  row_sizes, col_sizes = row_ends - row_starts, col_ends - col_starts
  # As for max: the row stage also averages padding columns, which the column stage never reads.
  y1 = _window_mean(x.astype(acc), row_starts, row_sizes, max_bin_len(h, level[0]))
  y = _window_mean(y1.swapaxes(1, 2), col_starts, col_sizes, max_bin_len(w, level[1]))
  return y.swapaxes(1, 2).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _window_mean(x, starts, sizes, k: int):
  """x: (N, A, W, C), bins (N, n) -> (N, n, W, C), the mean of each bin's cells."""
  total = functools.reduce(jnp.add, window_cells(x, starts, sizes, k, 0))
  return total / sizes[:, :, None, None].astype(x.dtype)


def _window_mean_fwd(x, starts, sizes, k: int):
  return _window_mean(x, starts, sizes, k), (starts, sizes, x.shape[1])


def _window_mean_bwd(k: int, res, g):
  """Cell p of example i gets g / size of every bin of i holding it: n compares per cell."""
  starts, sizes, length = res
  p = jnp.arange(length, dtype=jnp.int32)[None, :, None, None]
  zero = jnp.zeros((), g.dtype)
  dx = None
  for b in range(g.shape[1]):
    start, size = starts[:, b, None, None, None], sizes[:, b, None, None, None]
    inside = (p >= start) & (p < start + size)
    term = jnp.where(inside, g[:, b:b + 1] / size.astype(g.dtype), zero)
    dx = term if dx is None else dx + term
  return dx, _float0_like(starts), _float0_like(sizes)


_window_mean.defvjp(_window_mean_fwd, _window_mean_bwd)


def _float0_like(a) -> np.ndarray:
  return np.zeros(np.shape(a), jax.dtypes.float0)


__all__ = ["spatial_pyramid_pool", "spp_output_dim", "normalize_levels", "bin_edges"]
