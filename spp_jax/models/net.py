"""The SPP network: a conv stack from an Architecture, SPP (or the fixed-pool baseline), fc layers.

  model(images, image_sizes) == model.head(model.pool(*model.features(images, image_sizes)))

features: the conv stack, (N, H, W, 3) -> (N, fh, fw, C) and the per-example map sizes.
pool:     SPP over each example's own map, (N, fh, fw, C) -> (N, C * sum(nh * nw)); or for
          head="fixed" an ordinary max pool that only fits the map of the base input size.
head:     fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> classifier (float32 logits).

Mixed-size batches: images zero-padded at the bottom/right to one shape, `image_sizes` (N, 2)
their true (h, w). Every layer re-masks the cells outside each example's own map (see blocks.py)
and SPP pools with valid_sizes, so each example's logits equal those of the image run alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spp_jax.layers import SpatialPyramidPooling
from spp_jax.models import functional as F
from spp_jax.models.arch import Architecture
from spp_jax.models.blocks import classifier_normal, he_normal, make_layer
from spp_jax.ops.spp import Level

HEADS = ("spp", "fixed")


class SPPNet(nnx.Module):
  """A classification network of the SPP-net paper (Table 1) or of the same family.

  Attributes named after the layers: conv1, norm1, pool1, ..., fc6, fc7, classifier (the last
  one is the layer that detection replaces with a (classes + 1)-way one).
  """

  def __init__(self, arch: Architecture, *, num_classes: int, rngs: nnx.Rngs,
               spp_levels: Sequence[Level], head: str, fc_width: int, dropout_rate: float,
               base_size: int | None, dtype, param_dtype):
    # No defaults here: models.create passes every option (registry.DEFAULT_OPTIONS).
    if head not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got head={head!r}")
    self.arch = arch
    self.head_kind = head
    self.dtype = dtype
    self.base_size = arch.base_size if base_size is None else base_size
    arch.feature_size(self.base_size)  # ValueError if the base size is too small
    channels = arch.in_channels
    names = []
    for name, spec in arch.layers:
      layer, channels = make_layer(spec, channels, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
      setattr(self, name, layer)
      names.append(name)
    self.layer_names = tuple(names)
    if head == "spp":
      self.spp = SpatialPyramidPooling(spp_levels, "max")
      pooled_dim = self.spp.output_dim(channels)
    else:
      side = arch.fixed_map_size(self.base_size)
      pooled_dim = channels * side * side
    self.pooled_dim = pooled_dim
    linear = dict(dtype=dtype, param_dtype=param_dtype, bias_init=nnx.initializers.zeros,
                  rngs=rngs)
    dropout_rngs = None
    if dropout_rate > 0:
      streams = set(rngs)
      if not streams & {"dropout", "default"}:
        raise ValueError(f"dropout_rate={dropout_rate} needs a 'dropout' (or default) stream in "
                         f"rngs, e.g. nnx.Rngs(params=0, dropout=1); got streams {sorted(streams)}")
      dropout_rngs = rngs
    self.fc6 = nnx.Linear(pooled_dim, fc_width, kernel_init=he_normal, **linear)
    self.drop6 = nnx.Dropout(dropout_rate, rngs=dropout_rngs)
    self.fc7 = nnx.Linear(fc_width, fc_width, kernel_init=he_normal, **linear)
    self.drop7 = nnx.Dropout(dropout_rate, rngs=dropout_rngs)
    self.classifier = nnx.Linear(fc_width, num_classes,
                                 kernel_init=classifier_normal, **linear)

  # --------------------------------------------------------------------------- size facts

  @property
  def feature_stride(self) -> int:
    return self.arch.feature_stride

  @property
  def min_input_size(self) -> int:
    """Smallest accepted input side (the base size itself for the fixed head)."""
    return self.base_size if self.head_kind == "fixed" else self.arch.min_input_size

  @property
  def out_channels(self) -> int:
    return self.arch.out_channels

  def feature_size(self, size) -> tuple[int, int]:
    """(fh, fw) of the last conv map for an input (h, w) (or a square side)."""
    return self.arch.feature_size(size)

  # --------------------------------------------------------------------------- forward

  def __call__(self, images: jax.Array, image_sizes: jax.Array | None = None) -> jax.Array:
    """images: (N, H, W, 3), image_sizes: optional (N, 2) int (h, w) -> logits (N, classes) f32."""
    return self.head(self.pool(*self.features(images, image_sizes)))

  def features(self, images: jax.Array, image_sizes: jax.Array | None = None):
    """Conv stack. Returns (fmap (N, fh, fw, C), fmap_sizes (N, 2) int32 or None)."""
    self._check_images(images, image_sizes)
    x = jnp.asarray(images).astype(self.dtype)
    sizes = None
    if image_sizes is not None:
      sizes = jnp.asarray(image_sizes, jnp.int32)
      # Whatever the padding holds, the first conv must see zeros there.
      x = F.mask_outside(x, sizes)
    for name in self.layer_names:
      x, sizes = getattr(self, name)(x, sizes)
    return x, sizes

  def pool(self, fmap: jax.Array, fmap_sizes: jax.Array | None = None) -> jax.Array:
    """(N, fh, fw, C) -> (N, pooled_dim): SPP over each example's map, or the fixed pooling."""
    if self.head_kind == "spp":
      return self.spp(fmap, valid_sizes=fmap_sizes)
    expected = self.arch.feature_size(self.base_size)
    if tuple(fmap.shape[1:3]) != expected:
      raise ValueError(
          f"head='fixed' pools only the {expected[0]}x{expected[1]} map of a "
          f"{self.base_size}x{self.base_size} input, got a map of shape {tuple(fmap.shape)}")
    fp = self.arch.fixed_pool
    if fmap_sizes is None:
      y = F.max_pool_caffe(fmap, fp.window, fp.stride, fp.padding)
    else:
      y, _ = F.masked_max_pool_caffe(fmap, fmap_sizes, fp.window, fp.stride, fp.padding)
    return y.reshape(y.shape[0], -1)

  def embed(self, pooled: jax.Array) -> jax.Array:
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout: (N, pooled_dim) -> (N, fc_width)."""
    x = self.drop6(nnx.relu(self.fc6(pooled)))
    return self.drop7(nnx.relu(self.fc7(x)))

  def head(self, pooled: jax.Array) -> jax.Array:
    """(N, pooled_dim) pooled vectors -> (N, num_classes) float32 logits."""
    return self.classifier(self.embed(pooled)).astype(jnp.float32)

  # --------------------------------------------------------------------------- checks

  def _check_images(self, images, image_sizes):
    shape = np.shape(images)
    if len(shape) != 4 or shape[3] != self.arch.in_channels:
      raise ValueError(f"images must have shape (N, H, W, {self.arch.in_channels}), "
                       f"got shape {shape}")
    _, h, w, _ = shape
    if self.head_kind == "fixed" and (h, w) != (self.base_size, self.base_size):
      raise ValueError(
          f"head='fixed' accepts only {self.base_size}x{self.base_size} images (the no-SPP "
          f"baseline), got images of shape {shape}; use head='spp' for other sizes")
    # Not min(h, w): symbolic sizes (jax.export) compare only to constants.
    if h < self.min_input_size or w < self.min_input_size:
      raise ValueError(f"{self.arch.name} needs images of at least {self.min_input_size}x"
                       f"{self.min_input_size} pixels, got images of shape {shape}")
    if image_sizes is None:
      return
    if np.shape(image_sizes) != (shape[0], 2):
      raise ValueError(f"image_sizes must have shape (N, 2) = ({shape[0]}, 2), "
                       f"got shape {np.shape(image_sizes)}")
    if isinstance(image_sizes, jax.core.Tracer):
      return  # Traced sizes cannot be checked here; the caller vouches for them.
    s = np.asarray(image_sizes)
    if not np.issubdtype(s.dtype, np.integer):
      raise ValueError(f"image_sizes must be integers, got dtype {s.dtype}")
    lo = self.min_input_size
    bad = (s[:, 0] < lo) | (s[:, 1] < lo) | (s[:, 0] > h) | (s[:, 1] > w)
    if self.head_kind == "fixed":
      bad |= (s[:, 0] != self.base_size) | (s[:, 1] != self.base_size)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(
          f"image_sizes[{i}] = {tuple(int(v) for v in s[i])} must lie within "
          f"{lo}..{h} x {lo}..{w} (the minimum input size of {self.arch.name} and the padded "
          f"image shape {shape})")
