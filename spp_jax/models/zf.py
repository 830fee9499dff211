"""ZF-5 (SPP-net Table 1): the Zeiler-Fergus network as released with SPP-net.

Layers follow the released `Zeiler_conv5.prototxt` of SPP-net: conv1 pad 1, conv2 no padding,
LRN after conv1 and conv2 with local_size 3, alpha 5e-5, beta 0.75 over a 3x3 window *within*
each channel (norm_region WITHIN_CHANNEL; k = 1). With Caffe's ceil pooling the conv5 map is
13x13 at 224 and 10x10 at 180 (floor rounding would give 12x12 and 9x9).
"""

from __future__ import annotations

from spp_jax.models.arch import Architecture, ConvSpec, LRNSpec, PoolSpec
from spp_jax.models.registry import register

ZF_LRN = LRNSpec(size=3, alpha=5e-5, beta=0.75, k=1.0, region="within_channel")


@register("zf5")
def zf5() -> Architecture:
  return Architecture(
      name="zf5",
      layers=(
          ("conv1", ConvSpec(96, 7, stride=2, padding=1)),   # 224 -> 110
          ("norm1", ZF_LRN),
          ("pool1", PoolSpec(3, 2)),                          # -> 55
          ("conv2", ConvSpec(256, 5, stride=2)),              # -> 26
          ("norm2", ZF_LRN),
          ("pool2", PoolSpec(3, 2)),                          # -> 13
          ("conv3", ConvSpec(384, 3, padding=1)),
          ("conv4", ConvSpec(384, 3, padding=1)),
          ("conv5", ConvSpec(256, 3, padding=1)),             # 13 x 13 x 256
      ),
      base_size=224,
      fixed_pool=PoolSpec(3, 2),                              # no-SPP pool5: 13 -> 6
  )
