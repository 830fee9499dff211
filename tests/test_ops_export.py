"""jax.export with symbolic batch, height and width: the SPP op and the networks in eval mode.

One artifact, exported for CPU, CUDA and TPU, serves every input size: bins become floor/ceil
expressions of the symbolic sizes. Called here at concrete sizes (on CPU) it must equal the op
or the model jitted at those sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spp_jax
from spp_jax import models

PLATFORMS = ("cpu", "cuda", "tpu")
LEVELS = (6, 3, 2, 1)


def _symbolic_images(channels: int, min_size: int):
  b, h, w = jax.export.symbolic_shape(
      "b, h, w", constraints=(f"h >= {min_size}", f"w >= {min_size}"))
  return jax.ShapeDtypeStruct((b, h, w, channels), jnp.float32), b


def _roundtrip(exported):
  """The artifact as another process would load it."""
  return jax.export.deserialize(exported.serialize())


def test_spp_op_exports_with_symbolic_sizes(rng):
  x, _ = _symbolic_images(4, 1)
  pool = lambda x: spp_jax.spatial_pyramid_pool(x, LEVELS)
  exported = _roundtrip(jax.export.export(jax.jit(pool), platforms=PLATFORMS)(x))
  assert exported.platforms == PLATFORMS
  # 1x1 and 3x2 (fewer cells than bins), 7x5 and 10x17 (sizes the levels do not divide), 13x13.
  for n, h, w in [(1, 1, 1), (2, 3, 2), (3, 7, 5), (2, 10, 17), (1, 13, 13)]:
    xi = rng.standard_normal((n, h, w, 4)).astype(np.float32)
    np.testing.assert_allclose(exported.call(xi), jax.jit(pool)(xi), rtol=1e-5, atol=1e-5)


def test_spp_op_with_valid_sizes_exports_with_symbolic_sizes(rng):
  x, b = _symbolic_images(3, 1)
  sizes = jax.ShapeDtypeStruct((b, 2), jnp.int32)
  pool = lambda x, s: spp_jax.spatial_pyramid_pool(x, LEVELS, valid_sizes=s)
  exported = _roundtrip(jax.export.export(jax.jit(pool), platforms=PLATFORMS)(x, sizes))
  for h, w in [(13, 11), (7, 9), (2, 3)]:
    s = np.stack([rng.integers(1, h + 1, 4), rng.integers(1, w + 1, 4)], 1).astype(np.int32)
    xi = rng.standard_normal((4, h, w, 3)).astype(np.float32)
    for i, (hi, wi) in enumerate(s):  # padding that must never reach a result
      xi[i, hi:], xi[i, :, wi:] = np.nan, np.nan
    got = exported.call(xi, s)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, jax.jit(pool)(xi, s), rtol=1e-5, atol=1e-5)


def test_avg_pooling_needs_static_sizes():
  x, _ = _symbolic_images(2, 1)
  with pytest.raises(ValueError, match="avg.*static"):
    jax.export.export(jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1), pooling="avg")),
                      platforms=PLATFORMS)(x)


@pytest.mark.parametrize("name, sizes", [("small", [(11, 11), (23, 14), (40, 33)]),
                                         ("zf5", [(39, 39), (61, 44), (47, 70)])])
def test_networks_export_with_symbolic_sizes(rng, name, sizes):
  model = models.create(name, num_classes=5, rngs=nnx.Rngs(params=0), width_multiplier=0.25,
                        fc_width=32, dropout_rate=0.0)
  model.eval()
  graphdef, state = nnx.split(model)
  # The parameters go in as a list of arrays: nnx's own pytree nodes have no serialisation.
  leaves, treedef = jax.tree.flatten(state)
  forward = jax.jit(
      lambda leaves, images: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(images))
  x, b = _symbolic_images(3, model.min_input_size)
  assert model.min_input_size == min(min(s) for s in sizes)
  exported = _roundtrip(jax.export.export(forward, platforms=PLATFORMS)(leaves, x))
  for n, (h, w) in enumerate(sizes, start=1):
    images = rng.standard_normal((n, h, w, 3)).astype(np.float32) * 50
    want = np.asarray(forward(leaves, images))
    np.testing.assert_allclose(exported.call(leaves, images), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())

  # Mixed-size batches: per-example sizes of a symbolic padded shape.
  masked = jax.jit(lambda leaves, images, image_sizes: nnx.merge(
      graphdef, jax.tree.unflatten(treedef, leaves))(images, image_sizes))
  exported = _roundtrip(jax.export.export(masked, platforms=PLATFORMS)(
      leaves, x, jax.ShapeDtypeStruct((b, 2), jnp.int32)))
  h, w = np.max(sizes, axis=0)
  images = rng.standard_normal((len(sizes), h, w, 3)).astype(np.float32) * 50
  image_sizes = np.asarray(sizes, np.int32)
  want = np.asarray(masked(leaves, images, image_sizes))
  np.testing.assert_allclose(exported.call(leaves, images, image_sizes), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
