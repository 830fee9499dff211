"""Flax NNX layers of the conv stack: thin wrappers around `functional`, built from specs.

Every layer maps (x, sizes) -> (y, out_sizes). `sizes` is None for a batch of one image size
(no masking at all), or the (N, 2) per-example valid (h, w) of a batch zero-padded at the
bottom/right; then each layer leaves exactly zero in the cells outside every example's own
output region, which is what the next convolution must see as padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spp_jax.models import functional as F
from spp_jax.models.arch import ConvSpec, LayerSpec, LRNSpec, PoolSpec



def host_normal(stddev):
  """Initializer: N(0, std^2) drawn by numpy on the host from the bits of the JAX key.

  `stddev` is a float or a function of the parameter shape. Deterministic in the key, the same
  values eagerly, under jit and under eval_shape (not run there). Why not jax.random: XLA:CPU
  takes about a second to compile every threefry draw or key split, so initialising a network
  with one draw per parameter took 6-7 s of compilation (measured here on 2 cores).
  """

  def init(key, shape, dtype=jnp.float32):
    std = float(stddev(shape) if callable(stddev) else stddev)
    bits = key
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
      bits = jax.random.key_data(key)

    def draw(b):
      rng = np.random.default_rng(np.asarray(b, np.uint32).ravel().tolist())
      return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    return jax.pure_callback(draw, jax.ShapeDtypeStruct(tuple(shape), dtype), bits)

  return init


# He et al. (2015) initialisation for layers followed by a ReLU (fan-in over all but the last
# axis, as for flax kernels): trains the paper's nets from scratch at any width (the paper's
# Gaussian std 0.01 needs per-net tuning).
he_normal = host_normal(lambda shape: math.sqrt(2.0 / math.prod(shape[:-1])))


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
