"""Pure array functions: the SPP op and, later, box projection, NMS and metrics."""
from spp_jax.ops.spp import bin_edges, normalize_levels, spatial_pyramid_pool, spp_output_dim
