"""Pure array functions: the SPP op, window pooling, box projection and NMS."""
from spp_jax.ops.boxes import box_iou, project_boxes, select_scales
from spp_jax.ops.nms import nms
from spp_jax.ops.roi_pool import roi_spatial_pyramid_pool
from spp_jax.ops.spp import bin_edges, normalize_levels, spatial_pyramid_pool, spp_output_dim
