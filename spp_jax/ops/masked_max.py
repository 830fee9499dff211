"""Max pooling over per-example bins by mask-then-reduce: the SPP formulation for accelerators.

For each bin, cells outside it are replaced by -inf (a select, so padding of any value never
reaches a result) and the masked copy is reduced: rows first, (N, H, W, C) -> (N, nh, W, C),
then columns -> (N, nh, nw, C). XLA fuses the broadcast select into the reduction, so each stage
reads its input once whatever the bins, and bin edges may be traced arrays or symbolic shapes.

The reduction is variadic: it carries each cell's row (column) index, masked like the values,
and keeps the first maximum (`argmax.beats`: NaN wins, ties go to the lower index), so the
gradient of a bin goes to exactly one of its cells. The backward pass of each stage is one
elementwise pass over the stage's input: cell p takes the gradient of every bin whose
arg-max it is (a select, never a product, so an inf cotangent stays in its bin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from spp_jax.ops.argmax import beats

_NO_KEY = jnp.iinfo(jnp.int32).max


def separable_max(x: jax.Array, row_edges, col_edges) -> jax.Array:
  """x: (N, H, W, C); row_edges, col_edges: (starts, ends), each (N or 1, n) int32.

  Returns (N, nh, nw, C): bin (i, j) of example b is the max of
  x[b, rs[b, i]:re[b, i], cs[b, j]:ce[b, j]]; edges must give non-empty bins inside the map.
  """
  return _separable_max(x, *row_edges, *col_edges)


@jax.custom_vjp
def _separable_max(x, rs, re, cs, ce):
  return _separable_max_fwd(x, rs, re, cs, ce)[0]


def _separable_max_fwd(x, rs, re, cs, ce):
  y1, arg_rows = bin_max(x, rs, re, axis=1)
  y, arg_cols = bin_max(y1, cs, ce, axis=2)
  return y, (arg_rows, arg_cols, x.shape[1], x.shape[2])


def _separable_max_bwd(res, g):
  arg_rows, arg_cols, h, w = res
  g1 = bin_max_transpose(g, arg_cols, w, axis=2)
  return bin_max_transpose(g1, arg_rows, h, axis=1), None, None, None, None


def bin_max(x: jax.Array, starts: jax.Array, ends: jax.Array,
            axis: int) -> tuple[jax.Array, jax.Array]:
  """Max over bins [starts, ends) along `axis` of x (N, ...), per example.

  starts, ends: (N or 1, n) int32. Returns the maxima and their indices along `axis` (int32),
  both x's shape with n in place of the axis length.
  """
  length = x.shape[axis]
  n = starts.shape[1]
  p = lax.iota(jnp.int32, length)
  inside = (p >= starts[:, :, None]) & (p < ends[:, :, None])          # (N', n, A)
  tail = x.ndim - axis - 1
  inside = inside.reshape(inside.shape[:1] + (1,) * (axis - 1) + (n, length) + (1,) * tail)
  xb = jnp.expand_dims(x, axis)                                         # (N, ..., 1, A, ...)
  shape = jnp.broadcast_shapes(xb.shape, inside.shape)
  values = jnp.where(inside, xb, jnp.array(-jnp.inf, x.dtype))
  keys = jnp.where(inside, p.reshape((length,) + (1,) * tail), _NO_KEY)
  values, keys = jnp.broadcast_to(values, shape), jnp.broadcast_to(keys, shape)
  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(_NO_KEY, jnp.int32))
  return lax.reduce((values, keys), init, _first_of_pair, (axis + 1,))


def _first_of_pair(a, b):
  (va, ka), (vb, kb) = a, b
  take_b = beats(vb, va, kb, ka)
  return jnp.where(take_b, vb, va), jnp.where(take_b, kb, ka)


def bin_max_transpose(g: jax.Array, arg: jax.Array, length, axis: int) -> jax.Array:
  """Transpose of bin_max: (.., n, ..) cotangents at `axis` -> (.., length, ..).

  Cell p takes the cotangent of every bin whose arg-max it is: n compares per cell.
  """
  shape = [1] * g.ndim
  shape[axis] = length
  p = lax.broadcasted_iota(jnp.int32, tuple(shape), axis)
  zero = jnp.zeros((), g.dtype)
  dx = None
  for b in range(g.shape[axis]):
    gb = lax.slice_in_dim(g, b, b + 1, axis=axis)
    ab = lax.slice_in_dim(arg, b, b + 1, axis=axis)
    term = jnp.where(ab == p, gb, zero)
    dx = term if dx is None else dx + term
  return dx


_separable_max.defvjp(_separable_max_fwd, _separable_max_bwd)
