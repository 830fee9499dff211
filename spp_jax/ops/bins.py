"""The bin rule of spatial pyramid pooling (docs/paper.md §1) and the bin arithmetic built on it.

On an axis of length `a` split into `n` bins, bin `i` covers [floor(i*a/n), ceil((i+1)*a/n)).
No bin is empty for any a >= 1, bins may overlap, rows and columns are split independently.
Lengths may be Python ints (static bins), int arrays (per-example sizes, traced) or symbolic
dimensions of jax.export (shape polynomials: floor division by a constant is exact there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bin_edges(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Static bin edges: starts[i] = floor(i*size/n), ends[i] = ceil((i+1)*size/n)."""
  i = np.arange(n)
  return (i * size) // n, -((-(i + 1) * size) // n)


def static_bins(size: int, n: int) -> tuple[tuple[int, int], ...]:
  """bin_edges as hashable (start, end) pairs, for static arguments."""
  return tuple(zip(*(e.tolist() for e in bin_edges(size, n))))


def edge_arrays(size, n: int) -> tuple[jax.Array, jax.Array]:
  """Bin starts and ends, each (1, n) int32, for an int or a symbolic dimension `size`."""
  if isinstance(size, (int, np.integer)):
    starts, ends = bin_edges(int(size), n)
    return jnp.asarray(starts[None], jnp.int32), jnp.asarray(ends[None], jnp.int32)
  return traced_edges(jnp.full((1,), size, jnp.int32), n)


def traced_edges(sizes: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """sizes: (N,) int array -> bin starts and ends, each (N, n) int32."""
  i = jnp.arange(n, dtype=jnp.int32)[None, :]
  s = sizes.astype(jnp.int32)[:, None]
  return (i * s) // n, -((-(i + 1) * s) // n)


def max_bin_len(length: int, n: int) -> int:
  """A bin of an axis of at most `length` cells spans at most ceil(length/n) + 1 of them."""
  return min(length, -(-length // n) + 1)


def bin_slots(bins, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Slot k: for every cell, the k-th bin holding it (or its last one) and whether it has k+1.

  A cell lies in at most two bins when bins are no wider than the stride between them, so a
  transpose written as one constant-index gather per slot reads each cotangent about twice.
  """
  members: list[list[int]] = [[] for _ in range(size)]
  for b, (start, end) in enumerate(bins):
    for p in range(start, end):
      members[p].append(b)
  return [(np.array([m[min(k, len(m) - 1)] for m in members]),
           np.array([len(m) > k for m in members])) for k in range(max(map(len, members)))]


def window_cells(x: jax.Array, starts: jax.Array, sizes: jax.Array, k: int,
                 fill) -> list[jax.Array]:
  """x: (N, A, W, C), bins (N, n) -> k arrays (N, n, W, C): offset o holds row start + o of
  every bin, or `fill` where the bin is shorter (selected, never computed from the cell)."""
  a = x.shape[1]
  cells = []
  for offset in range(k):
    rows = jnp.minimum(starts + offset, a - 1)[:, :, None, None]
    v = jnp.take_along_axis(x, rows, axis=1, mode="promise_in_bounds")
    if offset:  # Offset 0 is inside every bin (sizes >= 1).
      v = jnp.where((offset < sizes)[:, :, None, None], v, jnp.array(fill, x.dtype))
    cells.append(v)
  return cells


def index_dtype(size: int):
  """The narrowest signed int type that holds 0..size."""
  return jnp.int8 if size <= 127 else jnp.int16 if size <= 32767 else jnp.int32
