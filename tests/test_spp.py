"""The SPP op against a plain NumPy loop over bins (docs/paper.md §1 and §7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax.ops import spp as spp_ops

# ----------------------------------------------------------------------------- reference


def ref_bins(size, n):
  """Bin i of n on an axis of `size` cells: [floor(i*size/n), ceil((i+1)*size/n))."""
  return [((i * size) // n, -(-((i + 1) * size) // n)) for i in range(n)]


def ref_bin_cells(shape, levels, valid_sizes=None):
  """Yields (example b, bin number k over all levels, rows r0:r1, columns c0:c1)."""
  n, h, w, _ = shape
  for b in range(n):
    hb, wb = (h, w) if valid_sizes is None else valid_sizes[b]
    k = 0
    for level in levels:
      nh, nw = (level, level) if isinstance(level, int) else level
      for r0, r1 in ref_bins(hb, nh):
        for c0, c1 in ref_bins(wb, nw):
          yield b, k, r0, r1, c0, c1
          k += 1


def ref_spp(x, levels, pooling="max", valid_sizes=None):
  """x: (N, H, W, C) numpy -> (N, C * sum(nh*nw)), one bin at a time."""
  n, _, _, c = x.shape
  bins = sum((lv * lv if isinstance(lv, int) else lv[0] * lv[1]) for lv in levels)
  out = np.zeros((n, bins, c))
  for b, k, r0, r1, c0, c1 in ref_bin_cells(x.shape, levels, valid_sizes):
    cell = x[b, r0:r1, c0:c1].astype(np.float64).reshape(-1, c)
    assert cell.shape[0] >= 1, "empty bin"
    out[b, k] = cell.max(0) if pooling == "max" else cell.mean(0)
  return out.reshape(n, -1)


def ref_max_grad(x, levels, g, valid_sizes=None):
  """Gradient of sum(spp(x) * g) for max pooling: each bin's cotangent goes to its arg-max."""
  c = x.shape[-1]
  dx = np.zeros(x.shape, np.float64)
  for b, k, r0, r1, c0, c1 in ref_bin_cells(x.shape, levels, valid_sizes):
    cell = x[b, r0:r1, c0:c1]
    for ch in range(c):
      r, q = np.unravel_index(np.argmax(cell[:, :, ch]), cell.shape[:2])
      dx[b, r0 + r, c0 + q, ch] += g[b, k * c + ch]
  return dx


def ref_avg_grad(x, levels, g, valid_sizes=None):
  """The same for average pooling: each cell of a bin gets the bin's cotangent / its size."""
  c = x.shape[-1]
  dx = np.zeros(x.shape, np.float64)
  for b, k, r0, r1, c0, c1 in ref_bin_cells(x.shape, levels, valid_sizes):
    dx[b, r0:r1, c0:c1] += g[b, k * c:(k + 1) * c] / ((r1 - r0) * (c1 - c0))
  return dx


def _random(rng, shape, dtype=np.float32):
  # A permutation gives distinct values per channel, so arg-max gradients are unambiguous.
  n, h, w, c = shape
  x = np.stack([rng.permutation(n * h * w).reshape(n, h, w) for _ in range(c)], -1)
  return (x / (n * h * w) - 0.5).astype(dtype)


# ----------------------------------------------------------------------------- bins

AWKWARD = [
    # (H, W, levels): a = 1, a < n, the 180-px ZF-5 conv5 (10 with 6), 11 with 4, non-square.
    (1, 1, (6, 3, 2, 1)),
    (3, 2, (6, 3, 2, 1)),
    (10, 10, (6, 3, 2, 1)),
    (11, 11, (4, 3, 2, 1)),
    (13, 13, (6, 3, 2, 1)),
    (7, 20, ((3, 5), 4, (1, 2))),
    (5, 9, (4, 2, 1)),
    (40, 60, (6, 3, 2, 1)),
]


def test_bin_rule_never_empty_and_exact_count():
  for a in range(1, 40):
    for n in range(1, 9):
      starts, ends = spp_ops.bin_edges(a, n)
      assert len(starts) == n
      assert (ends > starts).all() and starts[0] == 0 and ends[-1] == a
      assert [tuple(e) for e in zip(starts, ends)] == ref_bins(a, n)
  # The sliding-window rule of §2.3 gives 9 bins here; the exact rule gives 6.
  assert list(zip(*spp_ops.bin_edges(10, 6))) == [(0, 2), (1, 4), (3, 5), (5, 7), (6, 9), (8, 10)]


@pytest.mark.parametrize("h,w,levels", AWKWARD)
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_matches_reference(rng, h, w, levels, pooling):
  x = _random(rng, (2, h, w, 5))
  got = np.asarray(spp_jax.spatial_pyramid_pool(jnp.asarray(x), levels, pooling=pooling))
  want = ref_spp(x, levels, pooling)
  assert got.shape == (2, spp_jax.spp_output_dim(levels, 5))
  if pooling == "max":
    np.testing.assert_array_equal(got, want.astype(np.float32))
  else:
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_max_starts_from_minus_infinity(rng):
  x = -1.0 - np.abs(_random(rng, (1, 4, 4, 3)))  # all negative: a zero start would give 0
  got = np.asarray(spp_jax.spatial_pyramid_pool(jnp.asarray(x), (2, 1)))
  np.testing.assert_array_equal(got, ref_spp(x, (2, 1)).astype(np.float32))
  assert (got < 0).all()


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("padded", [False, True])
def test_nan_in_the_map_reaches_every_bin_that_holds_it_and_no_other(pooling, padded):
  x = np.zeros((64, 13, 13, 8), np.float32)  # large enough for XLA:CPU's library reductions
  x[:, 0, 0, :] = np.nan
  x[:, 7, 4, :] = np.nan
  sizes = np.full((64, 2), 13, np.int32) if padded else None
  got = np.asarray(spp_jax.spatial_pyramid_pool(jnp.asarray(x), (6, 3, 2, 1), pooling=pooling,
                                                valid_sizes=sizes))
  want = ref_spp(x[:2], (6, 3, 2, 1), pooling)[[0] * 64]
  assert 0 < np.isnan(want).mean() < 1
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


def test_output_layout_and_level_order(rng):
  x = _random(rng, (2, 6, 6, 3))
  levels = (1, (2, 3), 6)
  got = np.asarray(spp_jax.spatial_pyramid_pool(jnp.asarray(x), levels))
  np.testing.assert_array_equal(got, ref_spp(x, levels).astype(np.float32))
  # Level (2, 3) sits after the 1x1 level, as (nh, nw, C) row-major: bin (1, 2) channel 1.
  assert got[0, 3 + (1 * 3 + 2) * 3 + 1] == x[0, 3:6, 4:6, 1].max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_dtypes(rng, dtype, pooling):
  x = jnp.asarray(_random(rng, (3, 10, 13, 4)), dtype)
  levels = (6, 3, 2, 1)
  got = spp_jax.spatial_pyramid_pool(x, levels, pooling=pooling)
  assert got.dtype == dtype
  want = ref_spp(np.asarray(x.astype(jnp.float32)), levels, pooling)
  if pooling == "max":  # max only picks values: exact in any dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
  else:
    tol = 1e-2 if dtype != jnp.float32 else 1e-6
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("h,w,levels", AWKWARD[:7])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_gradient_matches_reference(rng, h, w, levels, pooling):
  x = _random(rng, (2, h, w, 3))
  d = spp_jax.spp_output_dim(levels, 3)
  g = rng.standard_normal((2, d)).astype(np.float32)
  loss = lambda x: jnp.sum(spp_jax.spatial_pyramid_pool(x, levels, pooling=pooling) * g)
  got = np.asarray(jax.grad(loss)(jnp.asarray(x)))
  want = (ref_max_grad if pooling == "max" else ref_avg_grad)(x, levels, g)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,w,levels,sizes", [
    (7, 5, (4, 2, 1), None),
    (13, 13, (6, 3, 2, 1), None),
    (9, 8, (3, 2, 1), [[9, 8], [4, 7]]),
])
def test_ties_send_each_bin_gradient_to_exactly_one_maximal_cell(rng, h, w, levels, sizes):
  # ReLU maps are full of equal values: a bin's gradient must be neither split nor doubled.
  x = rng.integers(0, 2, (2, h, w, 2)).astype(np.float32)
  pool = lambda x: spp_jax.spatial_pyramid_pool(x, levels, valid_sizes=sizes)
  jac = np.asarray(jax.jacrev(pool)(jnp.asarray(x)))  # (N, D, N, H, W, C)
  c = x.shape[-1]
  for b, k, r0, r1, c0, c1 in ref_bin_cells(x.shape, levels, sizes):
    for ch in range(c):
      d = jac[b, k * c + ch]
      hits = np.argwhere(d != 0)
      assert len(hits) == 1 and d[tuple(hits[0])] == 1, (b, k, ch, hits)
      _, r, q, hit_ch = hits[0]
      assert hit_ch == ch and r0 <= r < r1 and c0 <= q < c1
      assert x[b, r, q, ch] == x[b, r0:r1, c0:c1, ch].max()


# ----------------------------------------------------------------------------- mixed sizes

MIXED_SIZES = np.array([[13, 13], [1, 1], [10, 3], [4, 13], [11, 7]], np.int32)


def _padded_batch(rng, sizes, h, w, c, fill):
  x = _random(rng, (len(sizes), h, w, c))
  for b, (hb, wb) in enumerate(sizes):
    x[b, hb:] = fill
    x[b, :, wb:] = fill
  return x


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf, 1e30])
def test_padding_never_leaks(rng, pooling, fill):
  levels = (6, 3, 2, 1)
  x = _padded_batch(rng, MIXED_SIZES, 13, 13, 4, fill)
  got = np.asarray(spp_jax.spatial_pyramid_pool(jnp.asarray(x), levels, pooling=pooling,
                                                valid_sizes=MIXED_SIZES))
  assert np.isfinite(got).all()
  for b, (hb, wb) in enumerate(MIXED_SIZES):
    alone = np.asarray(spp_jax.spatial_pyramid_pool(jnp.asarray(x[b:b + 1, :hb, :wb]), levels,
                                                    pooling=pooling))
    if pooling == "max":
      np.testing.assert_array_equal(got[b], alone[0])
    else:
      np.testing.assert_allclose(got[b], alone[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, ref_spp(x, levels, pooling, MIXED_SIZES), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_padded_gradient_is_exact_and_zero_on_padding(rng, pooling):
  levels = ((3, 2), 4, 1)
  x = _padded_batch(rng, MIXED_SIZES, 13, 13, 3, np.nan)
  g = rng.standard_normal((len(MIXED_SIZES), spp_jax.spp_output_dim(levels, 3))).astype(np.float32)
  loss = lambda x, s: jnp.sum(
      spp_jax.spatial_pyramid_pool(x, levels, pooling=pooling, valid_sizes=s) * g)
  got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x), jnp.asarray(MIXED_SIZES)))
  assert np.isfinite(got).all()
  want = (ref_max_grad if pooling == "max" else ref_avg_grad)(np.nan_to_num(x), levels, g,
                                                              MIXED_SIZES)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_compilation_per_padded_shape(rng):
  traces = []

  @jax.jit
  def pool(x, sizes):
    traces.append(x.shape)
    return spp_jax.spatial_pyramid_pool(x, (6, 3, 2, 1), valid_sizes=sizes)

  x = jnp.asarray(_random(rng, (5, 13, 13, 2)))
  for shift in range(4):
    pool(x, jnp.asarray(np.maximum(MIXED_SIZES - shift, 1)))
  assert len(traces) == 1
  pool(jnp.asarray(_random(rng, (5, 16, 13, 2))), jnp.asarray(MIXED_SIZES))
  assert len(traces) == 2

  # Concrete sizes passed eagerly also share one executable per padded shape.
  before = spp_ops._spp_masked._cache_size()
  for shift in range(3):
    spp_jax.spatial_pyramid_pool(x, (6, 3, 2, 1), valid_sizes=np.maximum(MIXED_SIZES - shift, 1))
  assert spp_ops._spp_masked._cache_size() - before <= 1


# ----------------------------------------------------------------------------- transforms


def test_jit_and_vmap(rng):
  levels = (4, 2, 1)
  x = jnp.asarray(_random(rng, (6, 9, 7, 2)).reshape(3, 2, 9, 7, 2))
  vmapped = jax.vmap(lambda xi: spp_jax.spatial_pyramid_pool(xi, levels))(x)
  for i in range(3):
    np.testing.assert_array_equal(vmapped[i], spp_jax.spatial_pyramid_pool(x[i], levels))
  jitted = jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, levels))(x[0])
  np.testing.assert_array_equal(jitted, ref_spp(np.asarray(x[0]), levels).astype(np.float32))
  sizes = jnp.array([[[9, 7], [2, 5]]] * 3)
  vm = jax.vmap(lambda xi, si: spp_jax.spatial_pyramid_pool(xi, levels, valid_sizes=si))(x, sizes)
  np.testing.assert_array_equal(vm[1], ref_spp(np.asarray(x[1]), levels, "max", [[9, 7], [2, 5]])
                                .astype(np.float32))


def test_unknown_batch_size_under_jit(rng):
  f = jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1)))
  assert f(jnp.zeros((0, 5, 6, 2))).shape == (0, 10)
  for n in (1, 3, 8):
    x = _random(rng, (n, 5, 6, 2))
    np.testing.assert_array_equal(f(jnp.asarray(x)), ref_spp(x, (2, 1)).astype(np.float32))


def test_module_wraps_op(rng):
  layer = spp_jax.SpatialPyramidPooling((4, 2, 1), "avg")
  x = jnp.asarray(_random(rng, (2, 9, 9, 3)))
  np.testing.assert_array_equal(layer(x), spp_jax.spatial_pyramid_pool(x, (4, 2, 1), pooling="avg"))
  assert layer.output_dim(256) == 256 * 21 == spp_jax.spp_output_dim((4, 2, 1), 256)
  assert spp_jax.spp_output_dim((6, 3, 2, 1), 256) == 12800


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("levels,needle", [
    ((), "levels must not be empty"),
    ((6, 0), "must be >= 1"),
    ((2.5,), "int"),
    ((True,), "int"),
    (((2, 3, 4),), "pair"),
    (3, "sequence"),
])
def test_bad_levels(levels, needle):
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match="levels") as err:
    spp_jax.spatial_pyramid_pool(x, levels)
  assert needle in str(err.value)


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"x must have rank 4.*\(4, 4, 1\)"):
    spp_jax.spatial_pyramid_pool(jnp.zeros((4, 4, 1)), (2,))
  with pytest.raises(ValueError, match="pooling"):
    spp_jax.spatial_pyramid_pool(jnp.zeros((1, 4, 4, 1)), (2,), pooling="sum")
  x = jnp.zeros((2, 4, 5, 1))
  with pytest.raises(ValueError, match=r"valid_sizes\[1\] = \(4, 6\).*1\.\.4 x 1\.\.5"):
    spp_jax.spatial_pyramid_pool(x, (2,), valid_sizes=np.array([[4, 5], [4, 6]]))
  with pytest.raises(ValueError, match=r"valid_sizes\[0\] = \(0, 5\)"):
    spp_jax.spatial_pyramid_pool(x, (2,), valid_sizes=np.array([[0, 5], [4, 5]]))
  with pytest.raises(ValueError, match="valid_sizes must have shape"):
    spp_jax.spatial_pyramid_pool(x, (2,), valid_sizes=np.array([4, 5]))
  with pytest.raises(ValueError, match="levels"):
    spp_jax.SpatialPyramidPooling(())
