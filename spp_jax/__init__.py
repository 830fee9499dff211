"""spp_jax: spatial pyramid pooling networks (He et al., 2014) in JAX and Flax NNX."""

from spp_jax import runtime as _runtime

_runtime.configure_cpu_flags()

from spp_jax.layers import SpatialPyramidPooling  # noqa: E402
from spp_jax.ops.spp import spatial_pyramid_pool, spp_output_dim  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SpatialPyramidPooling", "spatial_pyramid_pool", "spp_output_dim"]
