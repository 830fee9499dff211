"""A CPU-scale network of the same family for the embedded multi-scale Fashion-MNIST data set.

Images are 40-160 pixels a side: a four-conv stack of total stride 8 (5x5 at 40 px, 20x20 at
160 px), SPP {4, 2, 1} and 256-wide fc layers train in minutes on two cores. Base size 64
(conv4 8x8; the no-SPP baseline's 3/2 pooling gives 4x4, as fine as SPP's finest level).
"""

from __future__ import annotations

from spp_jax.models.arch import Architecture, ConvSpec, PoolSpec
from spp_jax.models.registry import register


@register("small")
def small() -> Architecture:
  return Architecture(
      name="small",
      layers=(
          ("conv1", ConvSpec(32, 5, stride=2, padding=2)),    # 64 -> 32
          ("pool1", PoolSpec(3, 2)),                          # -> 16
          ("conv2", ConvSpec(64, 3, padding=1)),
          ("pool2", PoolSpec(3, 2)),                          # -> 8
          ("conv3", ConvSpec(128, 3, padding=1)),
          ("conv4", ConvSpec(128, 3, padding=1)),             # 8 x 8 x 128
      ),
      base_size=64,
      fixed_pool=PoolSpec(3, 2),                              # 8 -> 4
      defaults=(("spp_levels", (4, 2, 1)), ("fc_width", 256)),
  )
