"""XLA:CPU formulations of max pooling, LRN and the SPP max stages, and the switch to them.

`by_platform` is the one place where an op chooses: these formulations when the program is
compiled for CPU, the op's default one (plain lax ops and their autodiff, or
`masked_max` for SPP) for GPU and TPU. It follows the platform the program is lowered for
(jax.lax.platform_dependent), not the host: a program exported for ("cpu", "cuda", "tpu")
holds both and picks when it runs.

Why XLA:CPU has its own (each measured here on 2 cores; on TPU v5e the defaults move several
times fewer bytes, see experiments/benchmarks/kernels_tpu.py):
- Max pooling: autodiff of reduce_window max is select_and_scatter, 5x slower than a custom
  VJP that keeps each window's arg-max offset and places the gradient of each offset with one
  interior-padded pad; XLA:CPU fuses those pads into one loop, XLA:TPU does not.
- LRN: autodiff of the shifted-slice window sums took 5x longer than the written-out VJP.
- SPP: a chain of elementwise maxima per static bin, or gathers of each traced bin's rows,
  because variadic (arg-max) reductions are scalar loops there and YNNPACK's reduce_max can
  drop NaN; and `isolated`, because XLA:CPU fuses cheap producers into every consumer, which
  recomputed the arg-max chains inside each backward fusion (20x slower fwd + bwd).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from spp_jax.ops.argmax import first_max
from spp_jax.ops.bins import bin_slots, index_dtype, window_cells


def by_platform(*args, cpu, default):
  """cpu(*args) in a program compiled for CPU, default(*args) for any other platform."""
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def isolated(fn, *args):
  """fn(*args), computed into buffers before anything reads the result (on CPU).

  Nothing outside a conditional's branch fuses with what is inside (`optimization_barrier` is
  expanded before fusion on XLA:CPU), so on CPU fn runs as the branch of one whose predicate is
  true for every input but cannot be folded (the other branch is never taken). Other platforms
  call fn directly: a GPU conditional reads its predicate on the host.
  """
  if any(leaf.size == 0 for leaf in jax.tree.leaves(args)):
    return fn(*args)

  def in_branch(*args):
    probe = jnp.isnan(jax.tree.leaves(args)[0].reshape(-1)[0])
    out_shapes = jax.eval_shape(fn, *args)
    zeros = lambda *a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
    return lax.cond(probe | ~probe, fn, zeros, *args)

  return by_platform(*args, cpu=in_branch, default=fn)


# ----------------------------------------------------------------------------- max pooling


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, pads) -> jax.Array:
  """Max pooling of x (N, H, W, C), square windows, pads ((lo, hi), (lo, hi)) of -inf that
  make the last window fit; the gradient goes to the first maximum of each window."""
  return _max_pool_fwd(x, window, stride, pads)[0]


def _pooled_size(size: int, window: int, stride: int, pad) -> int:
  return (size + sum(pad) - window) // stride + 1


def _max_pool_fwd(x, window, stride, pads):
  (pad_h, pad_w), (_, h, w, _) = pads, x.shape
  xp = x
  if sum(pad_h) + sum(pad_w):
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=-jnp.inf)
  oh, ow = _pooled_size(h, window, stride, pad_h), _pooled_size(w, window, stride, pad_w)
  n, _, _, c = xp.shape
  # Offset k = di * window + dj of every window, as one strided view of the padded input.
  views = [lax.slice(xp, (0, di, dj, 0),
                     (n, di + (oh - 1) * stride + 1, dj + (ow - 1) * stride + 1, c),
                     (1, stride, stride, 1)) for di in range(window) for dj in range(window)]
  best, arg = first_max(views, range(window * window), jnp.int8)
  return best, (arg, x.shape)


def _max_pool_bwd(window, stride, pads, res, g):
  (arg, shape), (pad_h, pad_w) = res, pads
  _, oh, ow, _ = arg.shape
  hp, wp = shape[1] + sum(pad_h), shape[2] + sum(pad_w)
  zero = jnp.zeros((), g.dtype)
  total = None
  for di in range(window):
    for dj in range(window):
      gk = jnp.where(arg == di * window + dj, g, zero)
      placed = lax.pad(gk, zero, ((0, 0, 0),
                                  (di, hp - di - (oh - 1) * stride - 1, stride - 1),
                                  (dj, wp - dj - (ow - 1) * stride - 1, stride - 1),
                                  (0, 0, 0)))
      total = placed if total is None else total + placed
  return (total[:, pad_h[0]:pad_h[0] + shape[1], pad_w[0]:pad_w[0] + shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# ----------------------------------------------------------------------------- LRN


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def lrn(x: jax.Array, size: int, coef: float, beta: float, k: float, axes) -> jax.Array:
  """y = x (k + coef W(x^2))^-beta, W the sum over a centred window of `size` along `axes`
  (zero beyond the ends). W is symmetric, hence its own transpose, so with s = k + coef W(x^2):
  dx = g s^-beta - 2 beta coef x W(g x s^(-beta - 1))."""
  return _lrn_fwd(x, size, coef, beta, k, axes)[0]


def _lrn_fwd(x, size, coef, beta, k, axes):
  s = k + coef * _window_sums(x * x, size, axes)
  p = _neg_pow(s, beta)
  return x * p, (x, s, p)


def _lrn_bwd(size, coef, beta, k, axes, res, g):
  x, s, p = res
  return (g * p - (2 * beta * coef) * x * _window_sums(g * x * p / s, size, axes),)


lrn.defvjp(_lrn_fwd, _lrn_bwd)


def _neg_pow(s: jax.Array, beta: float) -> jax.Array:
  """s ** -beta; beta = 0.75 (every LRN here) as rsqrt(s) * sqrt(rsqrt(s)), cheaper than exp/log."""
  if beta == 0.75:
    r = lax.rsqrt(s)
    return r * jnp.sqrt(r)
  return jnp.exp(-beta * jnp.log(s))


def _window_sums(x: jax.Array, size: int, axes) -> jax.Array:
  """Centred window sums along each of `axes` in turn, as shifted adds (which fuse)."""
  half = (size - 1) // 2
  for axis in axes if half else ():
    n = x.shape[axis]
    pads = [(0, 0)] * x.ndim
    pads[axis] = (half, half)
    xp = jnp.pad(x, pads)
    x = functools.reduce(jnp.add, [lax.slice_in_dim(xp, i, i + n, axis=axis)
                                   for i in range(size)])
  return x


# ----------------------------------------------------------------------------- SPP, static bins


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def spp_static_max(x: jax.Array, rows, cols) -> jax.Array:
  """x: (N, H, W, C), static bins ((start, end), ...) -> (N, nh, nw, C), rows then columns."""
  return _spp_static_max_fwd(x, rows, cols)[0]


def _spp_static_max_fwd(x, rows, cols):
  y1, arg_rows = isolated(lambda x: _bin_max(x, rows, axis=1), x)
  y, arg_cols = isolated(lambda y1: _bin_max(y1, cols, axis=2), y1)
  return y, (arg_rows, arg_cols, x.shape[1], x.shape[2])


def _spp_static_max_bwd(rows, cols, res, g):
  arg_rows, arg_cols, h, w = res
  g1 = isolated(lambda g, a: _bin_max_grad(g, a, cols, w, axis=2), g, arg_cols)
  return (_bin_max_grad(g1, arg_rows, rows, h, axis=1),)


spp_static_max.defvjp(_spp_static_max_fwd, _spp_static_max_bwd)


def _bin_max(x: jax.Array, bins, axis: int):
  """Max over static index ranges along `axis` and each bin's arg-max (absolute index)."""
  idx_dtype = index_dtype(x.shape[axis])
  take = lambda p: lax.index_in_dim(x, p, axis, keepdims=False)
  values, args = [], []
  for start, end in bins:
    # The values are a plain chain of maxima (NaN-propagating, like jnp.max) so that their
    # fusion, which XLA keeps apart from the arg-max's, costs one op per cell.
    values.append(functools.reduce(jnp.maximum, [take(p) for p in range(start, end)]))
    rows = range(start, end)
    args.append(first_max([take(p) for p in rows], rows, idx_dtype)[1])
  return jnp.stack(values, axis=axis), jnp.stack(args, axis=axis)


def _bin_max_grad(g: jax.Array, args: jax.Array, bins, size: int, axis: int) -> jax.Array:
  """Transpose of _bin_max, one pass over the output: slot k holds, for every cell, the k-th
  bin containing it (constant-index gathers), and the cell takes that bin's gradient if it is
  the bin's arg-max."""
  shape = [1] * g.ndim
  shape[axis] = size
  p = lax.broadcasted_iota(args.dtype, shape, axis)
  zero = jnp.zeros((), g.dtype)
  dx = None
  for which, valid in bin_slots(bins, size):
    hit = jnp.take(args, which, axis=axis) == p
    if not valid.all():  # Cells with fewer bins repeat their last one.
      hit = hit & jnp.asarray(valid).reshape(shape)
    term = jnp.where(hit, jnp.take(g, which, axis=axis), zero)
    dx = term if dx is None else dx + term
  return dx


# ----------------------------------------------------------------------------- SPP, traced bins


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def spp_gathered_max(x, row_starts, row_sizes, col_starts, col_sizes, k_rows: int, k_cols: int):
  """x: (N, H, W, C), per-example bins (N, nh) and (N, nw) -> (N, nh, nw, C).

  Offset o of every bin is a gather of row (column) start + o, masked past the bin's end; a bin
  spans at most k cells. The row stage also pools padding columns; the column stage never reads
  them, and the backward pass selects gradients (never multiplies), so padding cannot leak.
  """
  return _spp_gathered_max_fwd(x, row_starts, row_sizes, col_starts, col_sizes,
                               k_rows, k_cols)[0]


def _spp_gathered_max_fwd(x, row_starts, row_sizes, col_starts, col_sizes, k_rows, k_cols):
  y1, arg_rows = isolated(lambda x: _window_max(x, row_starts, row_sizes, k_rows), x)
  y, arg_cols = isolated(lambda y1: _window_max(y1.swapaxes(1, 2), col_starts, col_sizes, k_cols),
                         y1)
  return y.swapaxes(1, 2), (arg_rows, arg_cols, row_starts, col_starts, x.shape[1], x.shape[2])


def _spp_gathered_max_bwd(k_rows, k_cols, res, g):
  arg_rows, arg_cols, row_starts, col_starts, h, w = res
  g1 = isolated(lambda g: _window_max_grad(g.swapaxes(1, 2), arg_cols, col_starts, w), g)
  dx = _window_max_grad(g1.swapaxes(1, 2), arg_rows, row_starts, h)
  return dx, None, None, None, None


spp_gathered_max.defvjp(_spp_gathered_max_fwd, _spp_gathered_max_bwd)


def _window_max(x, starts, sizes, k: int):
  """x: (N, A, W, C), bins (N, n) -> max (N, n, W, C) and arg-max offset within the bin.

  The chain yields only the arg-max (its gathers then have one reader, so XLA fuses them into
  it); the values are gathered at it.
  """
  candidates = window_cells(x, starts, sizes, k, -jnp.inf)
  arg = first_max(candidates, range(k), index_dtype(k))[1]
  rows = starts[:, :, None, None] + arg.astype(jnp.int32)
  return jnp.take_along_axis(x, rows, axis=1, mode="promise_in_bounds"), arg


def _window_max_grad(g, arg, starts, length: int):
  """Transpose of _window_max: (N, n, W, C) cotangents -> (N, length, W, C); cell p takes the
  gradient of every bin whose arg-max it is (n compares per cell, no scatter)."""
  p = jnp.arange(length, dtype=jnp.int32)[None, :, None, None]
  zero = jnp.zeros((), g.dtype)
  dx = None
  for b in range(g.shape[1]):
    source = starts[:, b, None, None, None] + arg[:, b:b + 1].astype(jnp.int32)
    term = jnp.where(p == source, g[:, b:b + 1], zero)
    dx = term if dx is None else dx + term
  return dx
