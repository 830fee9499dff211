"""Per-platform formulations: the CPU kernels and the GPU/TPU defaults give the same values and
gradients, and each platform's program holds its own (the choice is cpu_kernels.by_platform)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax.models import functional as F
from spp_jax.ops import cpu_kernels, masked_max
from spp_jax.ops.bins import edge_arrays, max_bin_len, static_bins, traced_edges


def _distinct(rng, shape):
  """Distinct values (no ties), so arg-max gradients are unambiguous."""
  return jnp.asarray((rng.permutation(np.prod(shape)).reshape(shape) / np.prod(shape) - 0.5)
                     .astype(np.float32))


def _value_and_vjp(f, x, rng):
  y, vjp = jax.vjp(jax.jit(f), x)
  g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
  return np.asarray(y), np.asarray(vjp(g)[0])


def _assert_paths_agree(cpu, default, x, rng, exact=True):
  y_cpu, dx_cpu = _value_and_vjp(cpu, x, np.random.default_rng(1))
  y_def, dx_def = _value_and_vjp(default, x, np.random.default_rng(1))
  if exact:
    np.testing.assert_array_equal(y_cpu, y_def)
  else:
    np.testing.assert_allclose(y_cpu, y_def, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(dx_cpu, dx_def, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- equal results


@pytest.mark.parametrize("window, stride, padding, h, w", [
    (3, 2, 0, 11, 12), (3, 2, 1, 10, 9), (2, 2, 0, 7, 8), (5, 3, 2, 13, 11), (3, 1, 0, 6, 5)])
def test_max_pool_paths_agree(rng, window, stride, padding, h, w):
  x = _distinct(rng, (2, h, w, 3))
  (oh, pad_h), (ow, pad_w) = F._pool_geometry(x.shape, window, stride, padding)
  pads = (pad_h, pad_w)
  _assert_paths_agree(lambda x: cpu_kernels.max_pool(x, window, stride, pads)[:, :oh, :ow],
                      lambda x: F._reduce_window_max(x, window, stride, pads)[:, :oh, :ow], x, rng)


@pytest.mark.parametrize("size, axes", [(3, (1, 2)), (5, (3,)), (1, (3,))])
def test_lrn_paths_agree(rng, size, axes):
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 9)).astype(np.float32) * 30)
  coef = 1e-3 / size ** len(axes)
  _assert_paths_agree(lambda x: cpu_kernels.lrn(x, size, coef, 0.75, 2.0, axes),
                      lambda x: F._lrn_default(x, size, coef, 0.75, 2.0, axes), x, rng,
                      exact=False)


@pytest.mark.parametrize("h, w, level", [(13, 13, (6, 6)), (10, 7, (4, 3)), (3, 2, (6, 6)),
                                         (1, 5, (2, 4))])
def test_spp_static_paths_agree(rng, h, w, level):
  x = _distinct(rng, (2, h, w, 3))
  rows, cols = static_bins(h, level[0]), static_bins(w, level[1])
  _assert_paths_agree(
      lambda x: cpu_kernels.spp_static_max(x, rows, cols),
      lambda x: masked_max.separable_max(x, edge_arrays(h, level[0]), edge_arrays(w, level[1])),
      x, rng)


SIZES = np.array([[13, 11], [1, 1], [10, 3], [4, 11], [7, 7]], np.int32)


@pytest.mark.parametrize("level", [(6, 6), (3, 2), (1, 1)])
def test_spp_masked_paths_agree_and_padding_never_leaks(rng, level):
  x = np.asarray(_distinct(rng, (5, 13, 11, 3))).copy()
  for b, (hb, wb) in enumerate(SIZES):
    x[b, hb:], x[b, :, wb:] = np.nan, np.nan
  sizes = jnp.asarray(SIZES)
  (rs, re), (cs, ce) = traced_edges(sizes[:, 0], level[0]), traced_edges(sizes[:, 1], level[1])
  k_rows, k_cols = max_bin_len(13, level[0]), max_bin_len(11, level[1])
  cpu = lambda x: cpu_kernels.spp_gathered_max(x, rs, re - rs, cs, ce - cs, k_rows, k_cols)
  default = lambda x: masked_max.separable_max(x, (rs, re), (cs, ce))
  _assert_paths_agree(cpu, default, jnp.asarray(x), rng)
  y, dx = _value_and_vjp(default, jnp.asarray(x), rng)
  assert np.isfinite(y).all() and np.isfinite(dx).all()
  for b, (hb, wb) in enumerate(SIZES):
    assert not dx[b, hb:].any() and not dx[b, :, wb:].any()


def test_masked_max_ties_and_nan_go_to_one_cell(rng):
  x = rng.integers(0, 2, (2, 9, 8, 2)).astype(np.float32)
  x[1, 4, 3, 1] = np.nan
  sizes = jnp.asarray([[9, 8], [6, 5]], jnp.int32)
  rows, cols = traced_edges(sizes[:, 0], 3), traced_edges(sizes[:, 1], 2)
  pool = lambda x: masked_max.separable_max(x, rows, cols)
  y = np.asarray(pool(jnp.asarray(x)))
  jac = np.asarray(jax.jacrev(pool)(jnp.asarray(x)))     # (N, 3, 2, C, N, H, W, C)
  hits = (jac != 0).reshape(*jac.shape[:4], -1).sum(-1)
  np.testing.assert_array_equal(hits, 1)                  # ties never split
  # Example 1 is 6x5: row 4 lies in row bin 2 only, column 3 in column bin 1 only.
  assert np.isnan(y[1, 2, 1, 1]) and jac[1, 2, 1, 1, 1, 4, 3, 1] == 1  # NaN wins its bin
  assert np.isfinite(np.delete(y[1, :, :, 1].ravel(), 2 * 2 + 1)).all()


# ----------------------------------------------------------------------------- the choice


def _spp_grad(sizes):
  levels = (6, 3, 2, 1)
  if sizes is None:
    return lambda x: jax.grad(lambda x: spp_jax.spatial_pyramid_pool(x, levels).sum())(x)
  return lambda x, s: jax.grad(
      lambda x: spp_jax.spatial_pyramid_pool(x, levels, valid_sizes=s).sum())(x)


def _programs(f, *args):
  """(compiled CPU HLO, StableHLO exported for cuda and tpu)."""
  cpu = jax.jit(f).lower(*args).compile().as_text()
  accel = jax.export.export(jax.jit(f), platforms=("cuda", "tpu"))(*args).mlir_module()
  return cpu, accel


X = jax.ShapeDtypeStruct((4, 13, 13, 8), jnp.float32)


@pytest.mark.parametrize("masked", [False, True])
def test_spp_cpu_program_isolates_stages_and_accelerators_take_masked_max(masked):
  args = (X, jax.ShapeDtypeStruct((4, 2), jnp.int32)) if masked else (X,)
  cpu, accel = _programs(_spp_grad(masked or None), *args)
  # The CPU kernels' stages sit in conditional branches (cpu_kernels.isolated): fwd and bwd.
  assert cpu.count("conditional(") >= 3
  # CPU: constant-index takes (static) or row gathers (masked); masked_max has neither, and its
  # arg-max is a two-operand reduce.
  assert "gather(" in cpu
  assert "stablehlo.gather" not in accel
  assert "stablehlo.reduce(" in accel and "stablehlo.select" in accel


def test_max_pool_and_lrn_accelerator_programs_are_plain_lax():
  x = jax.ShapeDtypeStruct((2, 11, 11, 4), jnp.float32)
  pool = lambda x: jax.grad(lambda x: F.max_pool_caffe(x, 3, 2).sum())(x)
  cpu, accel = _programs(pool, x)
  assert "select-and-scatter" not in cpu and "stablehlo.select_and_scatter" in accel
  lrn = lambda x: jax.grad(lambda x: F.local_response_norm(
      x, size=3, alpha=1e-4, beta=0.75, region="within_channel").sum())(x)
  cpu, accel = _programs(lrn, x)
  assert "reduce-window" not in cpu and "stablehlo.reduce_window" in accel
  across = lambda x: jax.grad(lambda x: F.local_response_norm(x, size=3, alpha=1e-4,
                                                              beta=0.75).sum())(x)
  cpu, accel = _programs(across, x)
  assert " dot(" not in cpu and "stablehlo.dot_general" in accel
