"""Window pooling equals per-window SPP: the lead's op and a plain numpy loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.ops.roi_pool import roi_spatial_pyramid_pool
from spp_jax.ops.spp import spatial_pyramid_pool

N, H, W, C = 2, 9, 13, 3
# Awkward windows: one cell, the whole map, one row, one column, non-square, smaller than
# the finest level, touching every edge.
AWKWARD = [
    (0, 0, H, W), (4, 5, 5, 6), (0, 0, 1, 1), (H - 1, W - 1, H, W), (0, 0, 1, W), (0, 0, H, 1),
    (2, 1, 5, 12), (1, 3, 8, 5), (3, 0, 9, 13), (0, 7, 2, 13), (5, 2, 9, 7),
]


def _random_windows(rng, count):
  out = []
  for _ in range(count):
    y0 = rng.integers(0, H)
    x0 = rng.integers(0, W)
    out.append((y0, x0, rng.integers(y0 + 1, H + 1), rng.integers(x0 + 1, W + 1)))
  return out


def _numpy_spp(window: np.ndarray, levels, pooling="max") -> np.ndarray:
  """Plain loops over levels and bins, bin i = [floor(i*a/n), ceil((i+1)*a/n))."""
  h, w, _ = window.shape
  out = []
  for nh, nw in levels:
    for i in range(nh):
      r0, r1 = (i * h) // nh, -((-(i + 1) * h) // nh)
      for j in range(nw):
        c0, c1 = (j * w) // nw, -((-(j + 1) * w) // nw)
        cells = window[r0:r1, c0:c1].reshape(-1, window.shape[-1])
        out.append(cells.max(0) if pooling == "max" else cells.mean(0))
  return np.concatenate(out)


def _lead_spp_of_windows(features, windows, batch_index, levels, pooling="max"):
  """spatial_pyramid_pool of every window, each cropped into a padded batch (one compile)."""
  crops = []
  for (y0, x0, y1, x1), i in zip(windows, batch_index):
    crop = features[i, y0:y1, x0:x1]
    crops.append(jnp.pad(crop, ((0, H - (y1 - y0)), (0, W - (x1 - x0)), (0, 0))))
  sizes = np.stack([windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]], 1)
  return spatial_pyramid_pool(jnp.stack(crops), levels, pooling=pooling, valid_sizes=sizes)


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(N, H, W, C)).astype(np.float32)
  windows = np.array(AWKWARD + _random_windows(rng, 21), np.int32)
  batch_index = rng.integers(0, N, len(windows)).astype(np.int32)
  return features, windows, batch_index


LEVELS = [((6, 6), (3, 3), (2, 2), (1, 1)), ((4, 4), (2, 2), (1, 1)), ((2, 3), (1, 1))]


@pytest.mark.parametrize("levels", LEVELS)
def test_max_equals_per_window_spp_exactly(case, levels):
  features, windows, b = case
  out = np.asarray(roi_spatial_pyramid_pool(features, windows, levels, batch_index=b))
  np.testing.assert_array_equal(out, _lead_spp_of_windows(features, windows, b, levels))
  for r, ((y0, x0, y1, x1), i) in enumerate(zip(windows, b)):
    window = features[i, y0:y1, x0:x1]
    np.testing.assert_array_equal(out[r], _numpy_spp(window, levels), err_msg=f"window {r}")
    if r < 4:  # The lead's static path on the awkward extremes, one compile per shape.
      lead = np.asarray(spatial_pyramid_pool(window[None], levels))[0]
      np.testing.assert_array_equal(out[r], lead, err_msg=f"window {r}")


def test_avg_equals_per_window_mean(case):
  features, windows, b = case
  levels = LEVELS[0]
  out = np.asarray(roi_spatial_pyramid_pool(features, windows, levels, batch_index=b,
                                            pooling="avg"))
  np.testing.assert_allclose(out, _lead_spp_of_windows(features, windows, b, levels, "avg"),
                             rtol=1e-6, atol=1e-6)
  for r, ((y0, x0, y1, x1), i) in enumerate(zip(windows, b)):
    window = features[i, y0:y1, x0:x1]
    np.testing.assert_allclose(out[r], _numpy_spp(window, levels, "avg"), rtol=1e-6, atol=1e-6)


def test_default_batch_index_and_int_levels(case):
  features, windows, _ = case
  out = roi_spatial_pyramid_pool(features[:1], windows, (4, 2, 1))
  ref = roi_spatial_pyramid_pool(features, windows, ((4, 4), (2, 2), (1, 1)),
                                 batch_index=np.zeros(len(windows), np.int32))
  np.testing.assert_array_equal(out, ref)
  assert out.shape == (len(windows), C * 21)
  as_lists = roi_spatial_pyramid_pool(features[:1], windows.tolist(), [4, 2, 1],
                                      batch_index=[0] * len(windows))
  np.testing.assert_array_equal(as_lists, out)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_values_outside_windows_never_leak(pooling):
  rng = np.random.default_rng(1)
  features = rng.normal(size=(1, H, W, C)).astype(np.float32)
  windows = np.array([(2, 3, 6, 9), (0, 0, 2, 2)], np.int32)
  poisoned = np.full_like(features, np.nan)
  poisoned[0, :, 10:] = np.inf
  for y0, x0, y1, x1 in windows:
    poisoned[0, y0:y1, x0:x1] = features[0, y0:y1, x0:x1]

  def pooled_sum(f):
    return roi_spatial_pyramid_pool(f, windows, (6, 3, 2, 1), pooling=pooling).sum()

  clean = roi_spatial_pyramid_pool(features, windows, (6, 3, 2, 1), pooling=pooling)
  dirty = roi_spatial_pyramid_pool(poisoned, windows, (6, 3, 2, 1), pooling=pooling)
  np.testing.assert_array_equal(dirty, clean)
  grad = np.asarray(jax.grad(pooled_sum)(poisoned))
  assert np.isfinite(grad).all()
  inside = np.zeros(grad.shape, bool)
  for y0, x0, y1, x1 in windows:
    inside[0, y0:y1, x0:x1] = True
  assert (grad[~inside] == 0).all() and grad[inside].sum() > 0


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_non_finite_inside_a_bin_behaves_like_a_plain_reduction(pooling):
  rng = np.random.default_rng(2)
  features = rng.normal(size=(1, H, W, C)).astype(np.float32)
  features[0, 2, 3, 0] = np.nan
  features[0, 6, 8, 1] = np.inf
  features[0, 6, 9, 1] = -np.inf
  features[0, 1, 11, 2] = -np.inf
  windows = np.array(AWKWARD * 8, np.int32)   # > 64 windows: XLA's batched code paths
  out = np.asarray(roi_spatial_pyramid_pool(features, windows, (6, 3, 2, 1), pooling=pooling))
  with np.errstate(invalid="ignore"):
    for r, (y0, x0, y1, x1) in enumerate(windows):
      ref = _numpy_spp(features[0, y0:y1, x0:x1], ((6, 6), (3, 3), (2, 2), (1, 1)), pooling)
      np.testing.assert_allclose(out[r], ref, rtol=1e-6, atol=1e-6, err_msg=f"window {r}")


def test_gradient_equals_per_window_reference(case):
  features, windows, b = case
  levels = (6, 3, 2, 1)
  weights = np.random.default_rng(3).normal(size=(len(windows), C * 50)).astype(np.float32)

  def ours(f):
    return (roi_spatial_pyramid_pool(f, windows, levels, batch_index=b) * weights).sum()

  def reference(f):
    return (_lead_spp_of_windows(f, windows, b, levels) * weights).sum()

  np.testing.assert_allclose(jax.grad(ours)(features), jax.jit(jax.grad(reference))(features),
                             rtol=1e-5, atol=1e-5)


def test_gradient_with_ties_goes_to_first_maximum():
  """Ties: column-major first cell, as spatial_pyramid_pool's finest level does."""
  features = np.zeros((1, 4, 5, 2), np.float32)
  features[0, 1, 3] = 1.0          # tied maxima at (1, 3) and (2, 1): (2, 1) has the lower column
  features[0, 2, 1] = 1.0
  windows = np.array([(0, 0, 4, 5), (0, 2, 4, 5)], np.int32)
  grad = np.asarray(jax.grad(
      lambda f: roi_spatial_pyramid_pool(f, windows, (1,)).sum())(features))
  expected = np.zeros_like(features)
  expected[0, 2, 1] += 1.0         # window 0 (all of the map)
  expected[0, 1, 3] += 1.0         # window 1 (columns 2..4) only sees (1, 3)
  np.testing.assert_array_equal(grad, expected)
  whole = jax.grad(lambda f: spatial_pyramid_pool(f, (1,)).sum())(features)
  np.testing.assert_array_equal(
      whole, jax.grad(lambda f: roi_spatial_pyramid_pool(f, windows[:1], (1,)).sum())(features))


def test_traced_windows_under_jit(case):
  features, windows, b = case

  @jax.jit
  def pool(f, w, i):
    return roi_spatial_pyramid_pool(f, w, (6, 3, 2, 1), batch_index=i)

  np.testing.assert_array_equal(
      pool(features, windows, b),
      roi_spatial_pyramid_pool(features, windows, (6, 3, 2, 1), batch_index=b))


def test_bfloat16_and_empty():
  rng = np.random.default_rng(4)
  features = jnp.asarray(rng.normal(size=(1, H, W, C)), jnp.bfloat16)
  windows = np.array(AWKWARD, np.int32)
  out = roi_spatial_pyramid_pool(features, windows, (2, 1))
  assert out.dtype == jnp.bfloat16
  for r, (y0, x0, y1, x1) in enumerate(windows):
    np.testing.assert_array_equal(
        out[r], spatial_pyramid_pool(features[:, y0:y1, x0:x1], (2, 1))[0])
  empty = roi_spatial_pyramid_pool(features, np.zeros((0, 4), np.int32), (2, 1))
  assert empty.shape == (0, C * 5)


@pytest.mark.parametrize("windows, match", [
    ([(0, 0, 0, 3)], r"windows\[0\] = \(y0, x0, y1, x1\) = \(0, 0, 0, 3\)"),
    ([(1, 1, 2, 2), (0, 0, H + 1, 2)], r"windows\[1\]"),
    ([(0, 5, 2, 4)], r"windows\[0\]"),
    ([(-1, 0, 2, 2)], r"windows\[0\]"),
    ([(0, 0, 2, W + 1)], r"windows\[0\]"),
])
def test_bad_windows_are_named(windows, match):
  features = np.zeros((1, H, W, C), np.float32)
  with pytest.raises(ValueError, match=match):
    roi_spatial_pyramid_pool(features, np.array(windows, np.int32), (2, 1))


def test_bad_arguments():
  features = np.zeros((2, H, W, C), np.float32)
  good = np.array([(0, 0, 2, 2)], np.int32)
  with pytest.raises(ValueError, match="windows must have shape"):
    roi_spatial_pyramid_pool(features, np.zeros((3,), np.int32), (2, 1))
  with pytest.raises(ValueError, match="integer"):
    roi_spatial_pyramid_pool(features, good.astype(np.float32), (2, 1))
  with pytest.raises(ValueError, match=r"batch_index\[0\] = 2"):
    roi_spatial_pyramid_pool(features, good, (2, 1), batch_index=np.array([2], np.int32))
  with pytest.raises(ValueError, match="batch_index must have shape"):
    roi_spatial_pyramid_pool(features, good, (2, 1), batch_index=np.array([0, 1], np.int32))
  with pytest.raises(ValueError, match="pooling"):
    roi_spatial_pyramid_pool(features, good, (2, 1), pooling="min")
  with pytest.raises(ValueError, match="levels"):
    roi_spatial_pyramid_pool(features, good, (0,))
  with pytest.raises(ValueError, match="rank 4"):
    roi_spatial_pyramid_pool(features[0], good, (2, 1))
  with pytest.raises(ValueError, match="float"):
    roi_spatial_pyramid_pool(features.astype(np.int32), good, (2, 1))
