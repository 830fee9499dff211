"""The SPP-net paper's networks (Table 1) and a CPU-scale one, built by name.

  from spp_jax import models
  models.names()   # ('zf5', 'convnet5', 'overfeat5', 'overfeat7', 'small')
  model = models.create("zf5", num_classes=1000, rngs=nnx.Rngs(params=0, dropout=1))
  logits = model(images, image_sizes)      # == model.head(model.pool(*model.features(...)))
  models.spec("zf5").feature_size(180)     # (10, 10), no parameters built
"""

from spp_jax.models.registry import (DEFAULT_OPTIONS, ModelSpec, architecture, create, names,
                                     register, spec)
from spp_jax.models import zf as _zf  # noqa: F401  (registration order = names() order)
from spp_jax.models import convnet as _convnet  # noqa: F401
from spp_jax.models import overfeat as _overfeat  # noqa: F401
from spp_jax.models import small as _small  # noqa: F401
from spp_jax.models.arch import Architecture, ConvSpec, LRNSpec, PoolSpec
from spp_jax.models.functional import (local_response_norm, mask_outside, masked_max_pool_caffe,
                                       max_pool_caffe, valid_mask)
from spp_jax.models.net import SPPNet

__all__ = [
    "Architecture", "ConvSpec", "DEFAULT_OPTIONS", "LRNSpec", "ModelSpec", "PoolSpec", "SPPNet",
    "architecture", "create", "local_response_norm", "mask_outside", "masked_max_pool_caffe",
    "max_pool_caffe", "names", "register", "spec", "valid_mask",
]
