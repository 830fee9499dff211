"""Flax NNX layers of the conv stack: thin wrappers around `functional`, built from specs.

Every layer maps (x, sizes) -> (y, out_sizes). `sizes` is None for a batch of one image size
(no masking at all), or the (N, 2) per-example valid (h, w) of a batch zero-padded at the
bottom/right; then each layer leaves exactly zero in the cells outside every example's own
output region, which is what the next convolution must see as padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spp_jax.models import functional as F
from spp_jax.models.arch import ConvSpec, LayerSpec, LRNSpec, PoolSpec


# He et al. (2015) initialisation for layers followed by a ReLU, N(0, 2 / fan_in) with fan-in
# over all but the last axis (flax kernels): trains the paper's nets from scratch at any width
# (the paper's Gaussian std 0.01 needs per-net tuning). Build the model inside one jit: XLA:CPU
# then compiles every draw into one program, 1.2-1.3 s more per cold build than drawing on the
# host through a callback did (measured here on 2 cores, for "small" and "zf5").
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

# The classifier's N(0, 0.01^2): near-uniform predictions at the start.
classifier_normal = nnx.initializers.normal(0.01)


class ConvReLU(nnx.Module):
  """Convolution (zero padding on every side) followed by a ReLU."""

  def __init__(self, in_features: int, spec: ConvSpec, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.spec = spec
    p = spec.padding
    self.conv = nnx.Conv(in_features, spec.features, (spec.kernel, spec.kernel),
                         (spec.stride, spec.stride), padding=((p, p), (p, p)), dtype=dtype,
                         param_dtype=param_dtype, kernel_init=he_normal,
                         bias_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x: jax.Array, sizes: jax.Array | None = None):
    y = nnx.relu(self.conv(x))
    if sizes is None:
      return y, None
    out = self.spec.output_size(sizes)
    # The bias (and the ReLU of it) fills the cells beyond each example's own output.
    return F.mask_outside(y, out), out


class LocalResponseNorm(nnx.Module):
  """LRN in Caffe's convention; no parameters."""

  def __init__(self, spec: LRNSpec):
    self.spec = spec

  def __call__(self, x: jax.Array, sizes: jax.Array | None = None):
    s = self.spec
    y = F.local_response_norm(x, size=s.size, alpha=s.alpha, beta=s.beta, k=s.k, region=s.region)
    # No re-mask: a zero cell stays exactly zero, and the zero padding of a within-channel window
    # is what Caffe's own border padding is.
    return y, sizes


class MaxPool(nnx.Module):
  """Max pooling with Caffe's ceil rounding; no parameters."""

  def __init__(self, spec: PoolSpec):
    self.spec = spec

  def __call__(self, x: jax.Array, sizes: jax.Array | None = None):
    s = self.spec
    if sizes is None:
      return F.max_pool_caffe(x, s.window, s.stride, s.padding), None
    return F.masked_max_pool_caffe(x, sizes, s.window, s.stride, s.padding)


def make_layer(spec: LayerSpec, in_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
  """The NNX layer for a spec and the channel count it outputs."""
  if isinstance(spec, ConvSpec):
    return ConvReLU(in_features, spec, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs), spec.features
  if isinstance(spec, LRNSpec):
    return LocalResponseNorm(spec), in_features
  if isinstance(spec, PoolSpec):
    return MaxPool(spec), in_features
  raise ValueError(f"unknown layer spec {spec!r}")
