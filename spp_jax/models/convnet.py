"""Convnet*-5 (SPP-net Table 1): Krizhevsky's network with the pooling moved after conv2 and conv3.

conv1 96x11x11 /4 (no padding), LRN, conv2 256x5x5 (pad 2), LRN, pool 3/2, conv3 384x3x3,
pool 3/2, conv4 384x3x3, conv5 256x3x3 (3x3 convs pad 1): conv5 is 13x13 at 224. The LRN
parameters are not in the paper's table; these are those of Caffe's AlexNet model (size 5,
alpha 1e-4, beta 0.75, across channels, k = 1).
"""

from __future__ import annotations

from spp_jax.models.arch import Architecture, ConvSpec, LRNSpec, PoolSpec
from spp_jax.models.registry import register

ALEXNET_LRN = LRNSpec(size=5, alpha=1e-4, beta=0.75, k=1.0, region="across_channels")


@register("convnet5")
def convnet5() -> Architecture:
  return Architecture(
      name="convnet5",
      layers=(
          ("conv1", ConvSpec(96, 11, stride=4)),              # 224 -> 54
          ("norm1", ALEXNET_LRN),
          ("conv2", ConvSpec(256, 5, padding=2)),             # -> 54
          ("norm2", ALEXNET_LRN),
          ("pool2", PoolSpec(3, 2)),                          # -> 27
          ("conv3", ConvSpec(384, 3, padding=1)),
          ("pool3", PoolSpec(3, 2)),                          # -> 13
          ("conv4", ConvSpec(384, 3, padding=1)),
          ("conv5", ConvSpec(256, 3, padding=1)),             # 13 x 13 x 256
      ),
      base_size=224,
      fixed_pool=PoolSpec(3, 2),                              # no-SPP pool5: 13 -> 6
  )
