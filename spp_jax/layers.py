"""Flax NNX layers: thin wrappers around the pure ops in `spp_jax.ops`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from spp_jax.ops.spp import Level, normalize_levels, spatial_pyramid_pool, spp_output_dim


class SpatialPyramidPooling(nnx.Module):
  """SPP layer: (N, H, W, C) -> (N, C * sum(nh * nw)); no parameters."""

  def __init__(self, levels: Sequence[Level] = (6, 3, 2, 1), pooling: str = "max"):
    self.levels = normalize_levels(levels)
    if pooling not in ("max", "avg"):
      raise ValueError(f"pooling must be 'max' or 'avg', got pooling={pooling!r}")
    self.pooling = pooling

  def output_dim(self, channels: int) -> int:
    return spp_output_dim(self.levels, channels)

  def __call__(self, x: jax.Array, valid_sizes: jax.Array | None = None) -> jax.Array:
    return spatial_pyramid_pool(x, self.levels, pooling=self.pooling, valid_sizes=valid_sizes)
