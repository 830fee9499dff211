"""Overfeat-5 and Overfeat-7 (SPP-net Table 1): after Sermanet et al.'s "accurate" model.

conv1 96x7x7 /2, pool 3/3, conv2 256x5x5, pool 2/2, then 512x3x3 convs (pad 1): three for
Overfeat-5, five for Overfeat-7 (conv6, conv7). The paper adjusts padding to get its map sizes;
with Caffe's ceil pooling conv2 needs padding 1 for the 18x18 conv5 map at 224
(224 -> 109 -> 37 -> 35 -> 18). No LRN. The no-SPP baseline pools 3/3: 18x18 -> 6x6.
"""

from __future__ import annotations

from spp_jax.models.arch import Architecture, ConvSpec, PoolSpec
from spp_jax.models.registry import register


def _overfeat(name: str, num_512_convs: int) -> Architecture:
  layers = [
      ("conv1", ConvSpec(96, 7, stride=2)),                   # 224 -> 109
      ("pool1", PoolSpec(3, 3)),                              # -> 37
      ("conv2", ConvSpec(256, 5, padding=1)),                 # -> 35
      ("pool2", PoolSpec(2, 2)),                              # -> 18
  ]
  for i in range(3, 3 + num_512_convs):
    layers.append((f"conv{i}", ConvSpec(512, 3, padding=1)))
  return Architecture(name=name, layers=tuple(layers), base_size=224, fixed_pool=PoolSpec(3, 3))


@register("overfeat5")
def overfeat5() -> Architecture:
  return _overfeat("overfeat5", 3)


@register("overfeat7")
def overfeat7() -> Architecture:
  return _overfeat("overfeat7", 5)
