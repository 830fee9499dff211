"""Pure functions behind the network layers: Caffe max pooling, LRN, padding masks.

All arrays are NHWC. Per-example sizes (for batches of images zero-padded at the bottom/right)
are (N, 2) int arrays (h, w) and may be traced: masks are built from them inside the compiled
function, so one compilation serves every mix of sizes with the same padded shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from spp_jax.models.arch import pool_output_size
from spp_jax.ops.argmax import first_max


# ----------------------------------------------------------------------------- pooling


def max_pool_caffe(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """Max pooling with Caffe's ceil rounding.

  Windows start at -padding and step by `stride`; the last one may run past the bottom/right
  edge and is clipped to the input (cells outside count as -inf), exactly as in Caffe.
  NaN propagates. The gradient goes to the first maximum of each window (Caffe, PyTorch).

  Args:
    x: (N, H, W, C) float.
    window, stride, padding: static ints, square.

  Returns:
    (N, oh, ow, C) with oh = ceil((H + 2p - window) / stride) + 1 (Caffe's rule, see arch.py).
  """
  _, h, w, _ = x.shape
  if h + 2 * padding < window or w + 2 * padding < window:
    raise ValueError(f"max pool window {window} (padding {padding}) does not fit an input of "
                     f"{h}x{w}")
  return _max_pool(x, window, stride, padding)


def _pool_geometry(shape, window: int, stride: int, padding: int):
  """Output size and the (low, high) -inf padding that makes every window fit, per axis."""
  out = []
  for size in shape[1:3]:
    o = pool_output_size(size, window, stride, padding)
    out.append((o, (padding, max(0, (o - 1) * stride + window - size - padding))))
  return out


def _window_slices(xp: jax.Array, window: int, stride: int, oh: int, ow: int):
  """Yields (k, (N, oh, ow, C) strided view of window offset k = di * window + dj)."""
  n, _, _, c = xp.shape
  for di in range(window):
    for dj in range(window):
      yield di * window + dj, lax.slice(
          xp, (0, di, dj, 0), (n, di + (oh - 1) * stride + 1, dj + (ow - 1) * stride + 1, c),
          (1, stride, stride, 1))


# Why a custom VJP: JAX differentiates reduce_window max into select_and_scatter, which took
# 5x longer than this on XLA:CPU for ZF-5's pool1 (fwd + bwd, 32x110x110x96, measured here).
# The forward keeps the arg-max offset (int8) of every window; the backward places each
# offset's gradient with one interior-padded `pad` per offset, which XLA fuses into one loop.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
  return _max_pool_fwd(x, window, stride, padding)[0]


def _max_pool_fwd(x, window, stride, padding):
  (oh, pad_h), (ow, pad_w) = _pool_geometry(x.shape, window, stride, padding)
  xp = x
  if sum(pad_h) + sum(pad_w):
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=-jnp.inf)
  best, arg = first_max([v for _, v in _window_slices(xp, window, stride, oh, ow)],
                        range(window * window), jnp.int8)
  return best, (arg, x.shape)


def _max_pool_bwd(window, stride, padding, res, g):
  arg, shape = res
  (oh, pad_h), (ow, pad_w) = _pool_geometry(shape, window, stride, padding)
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


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# ----------------------------------------------------------------------------- LRN


def local_response_norm(x: jax.Array, *, size: int, alpha: float, beta: float, k: float = 1.0,
                        region: str = "across_channels") -> jax.Array:
  """Local response normalisation in Caffe's convention.

  across_channels: y = x / (k + alpha / size * sum_{c' in window(c)} x[c']^2) ** beta, the window
    is `size` channels centred on c, zero beyond the first/last channel.
  within_channel:  y = x / (k + alpha / size^2 * sum_{size x size window} x^2) ** beta, the window
    is centred on the cell and zero-padded at the image border (Caffe averages over the window
    with the padding counted, so the divisor is always size^2).

  alpha is thus divided by the number of cells in the sum (unlike the AlexNet paper's formula).
  Computed in at least float32 and returned in x's dtype. A zero cell stays exactly zero.

  Args:
    x: (N, H, W, C) float.
    size: odd window length.
  """
  if size < 1 or size % 2 == 0:
    raise ValueError(f"LRN size must be a positive odd int, got size={size!r}")
  if region == "across_channels":
    axes = (3,)
  elif region == "within_channel":
    axes = (1, 2)
  else:
    raise ValueError(f"region must be 'across_channels' or 'within_channel', got {region!r}")
  acc = jnp.promote_types(x.dtype, jnp.float32)
  coef = float(alpha) / size ** len(axes)
  return _lrn(x.astype(acc), size, coef, float(beta), float(k), axes).astype(x.dtype)


# Why a custom VJP: autodiff of the shifted channel slices took 5x longer than this on XLA:CPU
# for the across-channel LRN (measured here); within-channel it is about even. With
# s = k + coef * W(x^2) (W: the window sum, symmetric, so its own transpose),
#   y = x s^-beta,   dx = g s^-beta - 2 beta coef x W(g x s^(-beta - 1)).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _lrn(x, size, coef, beta, k, axes):
  return _lrn_fwd(x, size, coef, beta, k, axes)[0]


def _lrn_fwd(x, size, coef, beta, k, axes):
  s = k + coef * _window_sums(x * x, size, axes)
  p = _neg_pow(s, beta)
  return x * p, (x, s, p)


def _lrn_bwd(size, coef, beta, k, axes, res, g):
  x, s, p = res
  return (g * p - (2 * beta * coef) * x * _window_sums(g * x * p / s, size, axes),)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def _neg_pow(s: jax.Array, beta: float) -> jax.Array:
  """s ** -beta; beta = 0.75 (every LRN here) as rsqrt(s) * sqrt(rsqrt(s)), cheaper than exp/log."""
  if beta == 0.75:
    r = lax.rsqrt(s)
    return r * jnp.sqrt(r)
  return jnp.exp(-beta * jnp.log(s))


def _window_sums(x: jax.Array, size: int, axes) -> jax.Array:
  for axis in axes:
    x = _window_sum(x, size, axis)
  return x


def _window_sum(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Sum over a centred window of `size` along `axis`, zero beyond the ends (shifted adds fuse)."""
  half = (size - 1) // 2
  if half == 0:
    return x
  n = x.shape[axis]
  pads = [(0, 0)] * x.ndim
  pads[axis] = (half, half)
  xp = jnp.pad(x, pads)
  total = lax.slice_in_dim(xp, 0, n, axis=axis)
  for i in range(1, size):
    total = total + lax.slice_in_dim(xp, i, i + n, axis=axis)
  return total


# ----------------------------------------------------------------------------- masks


def valid_mask(sizes: jax.Array, height: int, width: int) -> jax.Array:
  """(N, H, W, 1) bool: cell (y, x) of example i lies inside its own (h_i, w_i) region.

  sizes: (N, 2) int (h, w), may be traced.
  """
  sizes = jnp.asarray(sizes, jnp.int32)
  rows = jnp.arange(height, dtype=jnp.int32)[None, :] < sizes[:, 0:1]   # (N, H)
  cols = jnp.arange(width, dtype=jnp.int32)[None, :] < sizes[:, 1:2]    # (N, W)
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def mask_outside(x: jax.Array, sizes: jax.Array, fill: float = 0.0) -> jax.Array:
  """x: (N, H, W, C) with every cell outside example i's (h_i, w_i) region set to `fill`.

  A select, not a product, so NaN or inf in the padding cannot leak (0 * inf = NaN).
  """
  _, h, w, _ = x.shape
  return jnp.where(valid_mask(sizes, h, w), x, jnp.asarray(fill, x.dtype))


def masked_max_pool_caffe(x: jax.Array, sizes: jax.Array, window: int, stride: int,
                          padding: int = 0) -> tuple[jax.Array, jax.Array]:
  """max_pool_caffe applied to each example's own region of a padded batch.

  Cells outside the region count as -inf (so each example's windows are clipped exactly as if
  it were pooled alone); output cells outside the example's own output region are set to 0.

  Args:
    x: (N, H, W, C); sizes: (N, 2) int per-example valid (h, w), may be traced.

  Returns:
    pooled (N, oh, ow, C) and the per-example output sizes (N, 2).
  """
  y = max_pool_caffe(mask_outside(x, sizes, -jnp.inf), window, stride, padding)
  out_sizes = pool_output_size(jnp.asarray(sizes, jnp.int32), window, stride, padding)
  return mask_outside(y, out_sizes, 0.0), out_sizes


__all__ = ["max_pool_caffe", "masked_max_pool_caffe", "local_response_norm", "valid_mask",
           "mask_outside"]
