"""spp_jax: spatial pyramid pooling networks (He et al., 2014) in JAX and Flax NNX.

The public names are imported on first use, so that processes which only need the input
pipeline (grain workers) do not import JAX and Flax.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "SpatialPyramidPooling": "spp_jax.layers",
    "spatial_pyramid_pool": "spp_jax.ops.spp",
    "spp_output_dim": "spp_jax.ops.spp",
    "roi_spatial_pyramid_pool": "spp_jax.ops.roi_pool",
    "project_boxes": "spp_jax.ops.boxes",
}
_SUBPACKAGES = ("models", "data", "train", "ops", "detection", "metrics")
__all__ = [*_PUBLIC, *_SUBPACKAGES]


def __getattr__(name):
  if name in _SUBPACKAGES:
    return importlib.import_module(f"spp_jax.{name}")
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'spp_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *__all__])
