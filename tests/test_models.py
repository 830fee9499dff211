"""Tests of spp_jax.models: size arithmetic, building blocks against plain NumPy, mixed-size batches."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spp_jax import models
from spp_jax.models import functional as F
from spp_jax.models.arch import conv_output_size, pool_output_size

NAMES = ("zf5", "convnet5", "overfeat5", "overfeat7", "small")
TINY = dict(width_multiplier=1 / 16, fc_width=32)


def tiny(name, **options):
  return models.create(name, num_classes=5, rngs=nnx.Rngs(params=0, dropout=1),
                       **{**TINY, **options})


# The programs under test are tiny and run in milliseconds; compiling them is what costs, so
# they are compiled without LLVM optimisation (about half the compile time, same arithmetic).
_jit = functools.partial(jax.jit, static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


@_jit
def _apply(graphdef, state, images, sizes):
  return nnx.merge(graphdef, state)(images, sizes)


@_jit
def _apply_split(graphdef, state, images, sizes):
  model = nnx.merge(graphdef, state)
  fmap, fmap_sizes = model.features(images, sizes)
  return fmap, fmap_sizes, model.head(model.pool(fmap, fmap_sizes))


@_jit
def _apply_input_grad(graphdef, state, images, sizes):
  return jax.grad(lambda x: nnx.merge(graphdef, state)(x, sizes).sum())(images)


@_jit
def _apply_param_grads(graphdef, params, rest, images, sizes):
  return jax.grad(lambda p: nnx.merge(graphdef, p, rest)(images, sizes).sum())(params)


def _forward(model, images, sizes):
  """Logits of an eval-mode model (the state is not written back: no dropout here)."""
  return _apply(*nnx.split(model), images, sizes)


def _forward_alone(model, images):
  return _apply(*nnx.split(model), images, None)


def _split_forward(model, images, sizes):
  return _apply_split(*nnx.split(model), images, sizes)


def _input_grad(model, images, sizes):
  return _apply_input_grad(*nnx.split(model), images, sizes)


def _param_grads(model, images, sizes):
  return _apply_param_grads(*nnx.split(model, nnx.Param, ...), images, sizes)


max_pool = jax.jit(F.max_pool_caffe, static_argnums=(1, 2, 3))
lrn = jax.jit(F.local_response_norm, static_argnames=("size", "alpha", "beta", "k", "region"))


# ----------------------------------------------------------------------------- plain references


def np_max_pool_caffe(x, k, s, p=0):
  """Caffe's MaxPoolForward, written out: x (N, H, W, C)."""
  n, h, w, c = x.shape
  oh = int(math.ceil((h + 2 * p - k) / s)) + 1
  ow = int(math.ceil((w + 2 * p - k) / s)) + 1
  if p and (oh - 1) * s >= h + p:
    oh -= 1
  if p and (ow - 1) * s >= w + p:
    ow -= 1
  out = np.empty((n, oh, ow, c), x.dtype)
  for i in range(oh):
    for j in range(ow):
      hs, ws = i * s - p, j * s - p
      he, we = min(hs + k, h), min(ws + k, w)
      hs, ws = max(hs, 0), max(ws, 0)
      out[:, i, j] = x[:, hs:he, ws:we].max(axis=(1, 2))
  return out


def np_lrn(x, size, alpha, beta, k, region):
  """Caffe's LRN, written out: x (N, H, W, C)."""
  n, h, w, c = x.shape
  half = size // 2
  out = np.empty_like(x, dtype=np.float64)
  x = x.astype(np.float64)
  for ci in range(c):
    for yi in range(h):
      for xi in range(w):
        if region == "across_channels":
          win = x[:, yi, xi, max(0, ci - half):ci + half + 1]
          scale = k + alpha / size * (win ** 2).sum(axis=-1)
        else:
          win = x[:, max(0, yi - half):yi + half + 1, max(0, xi - half):xi + half + 1, ci]
          scale = k + alpha / size ** 2 * (win ** 2).sum(axis=(1, 2))
        out[:, yi, xi, ci] = x[:, yi, xi, ci] / scale ** beta
  return out


# ----------------------------------------------------------------------------- registry, options


def test_registry_names():
  assert models.names() == NAMES


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="zf6"), "unknown model name='zf6'"),
    (dict(name="zf5", sppp_levels=(1,)), "unknown model option"),
    (dict(name="zf5", head="avg"), "head must be one of"),
    (dict(name="zf5", dropout_rate=1.0), "dropout_rate"),
    (dict(name="zf5", width_multiplier=0), "width_multiplier"),
    (dict(name="zf5", fc_width=0), "fc_width"),
    (dict(name="zf5", dtype="int32"), "dtype must be a float dtype"),
    (dict(name="zf5", spp_levels=(0, 1)), "level"),
    (dict(name="zf5", base_size=20), "at least 39"),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.spec(**kwargs)


def test_bad_num_classes_raises():
  with pytest.raises(ValueError, match="num_classes"):
    models.create("small", num_classes=0, rngs=nnx.Rngs(0))


def test_dropout_needs_a_stream():
  with pytest.raises(ValueError, match="'dropout'"):
    models.create("small", num_classes=3, rngs=nnx.Rngs(params=0))
  models.create("small", num_classes=3, rngs=nnx.Rngs(params=0), dropout_rate=0.0)


def test_per_network_defaults_and_string_dtypes():
  s = models.spec("small")
  assert s.option("spp_levels") == ((4, 4), (2, 2), (1, 1))
  assert s.option("fc_width") == 256
  assert models.spec("zf5").option("fc_width") == 4096
  assert models.spec("zf5", dtype="bfloat16").option("dtype") == jnp.bfloat16


# ----------------------------------------------------------------------------- size arithmetic


def test_caffe_rounding_gives_the_paper_map_sizes():
  zf = models.spec("zf5")
  assert zf.feature_size(224) == (13, 13)
  assert zf.feature_size(180) == (10, 10)
  assert models.spec("convnet5").feature_size(224) == (13, 13)
  assert models.spec("overfeat5").feature_size(224) == (18, 18)
  assert models.spec("overfeat7").feature_size(224) == (18, 18)
  # Floor rounding would have given the wrong sizes (docs/paper.md §2): 110 -> 54 -> 25 -> 12.
  assert pool_output_size(110, 3, 2) == 55 and (110 - 3) // 2 + 1 == 54
  assert dict(zf.arch.layer_sizes(224)) == {
      "conv1": 110, "norm1": 110, "pool1": 55, "conv2": 26, "norm2": 26, "pool2": 13,
      "conv3": 13, "conv4": 13, "conv5": 13}


def test_size_formulas_match_plain_definitions():
  for a in range(1, 60):
    for k, s, p in ((3, 2, 0), (3, 3, 0), (2, 2, 0), (3, 2, 1), (5, 4, 2)):
      if a + 2 * p < k:
        continue
      assert pool_output_size(a, k, s, p) == np_max_pool_caffe(
          np.zeros((1, a, 1, 1)), k, s, p).shape[1], (a, k, s, p)
      assert conv_output_size(a, k, s, p) == len(range(-p, a + p - k + 1, s))
  sizes = jnp.arange(1, 40)
  np.testing.assert_array_equal(pool_output_size(sizes, 3, 2, 1),
                                [pool_output_size(int(a), 3, 2, 1) for a in range(1, 40)])


def test_feature_stride():
  assert [models.spec(n).feature_stride for n in NAMES] == [16, 16, 12, 12, 8]


@pytest.mark.parametrize("name", NAMES)
def test_feature_size_matches_the_forward_pass_full_width(name):
  model = nnx.eval_shape(lambda: models.create(name, num_classes=7, rngs=nnx.Rngs(0)))
  for size in ((224, 224), (180, 180), (201, 157), (model.min_input_size,) * 2):
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    fmap, _ = nnx.eval_shape(lambda m, v: m.features(v), model, x)
    assert fmap.shape == (2, *model.feature_size(size), model.out_channels)
    logits = nnx.eval_shape(lambda m, v: m(v), model, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name", NAMES)
def test_min_input_size_is_the_smallest_that_fits(name):
  arch = models.architecture(name)
  lo = arch.min_input_size

  def fits(size):  # every window fits, written out
    for _, spec in arch.layers:
      k = getattr(spec, "kernel", getattr(spec, "window", 1))
      if size + 2 * getattr(spec, "padding", 0) < k:
        return False
      size = spec.output_size(size)
    return size >= 1

  assert fits(lo) and not fits(lo - 1)
  model = tiny(name)
  assert model.min_input_size == lo
  with pytest.raises(ValueError, match=f"at least {lo}"):
    model(jnp.zeros((1, lo - 1, lo + 5, 3)))
  with pytest.raises(ValueError, match=f"at least {lo}"):
    arch.feature_size((lo + 3, lo - 1))


def test_zf5_minimum_is_39():
  assert models.spec("zf5").min_input_size == 39


# ----------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("k, s, p", [(3, 2, 0), (3, 3, 0), (2, 2, 0), (3, 2, 1)])
def test_max_pool_caffe_matches_plain_loops(rng, k, s, p):
  x = rng.normal(size=(2, 13, 10, 3)).astype(np.float32)
  np.testing.assert_array_equal(max_pool(jnp.asarray(x), k, s, p),
                                np_max_pool_caffe(x, k, s, p))


def test_max_pool_gradient_goes_to_the_arg_max(rng):
  x = jnp.asarray(rng.normal(size=(2, 11, 12, 3)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), jnp.float32)  # 11 -> 5, 12 -> 6 (ceil)
  ours = jax.jit(lambda v, g: jax.vjp(lambda v: F.max_pool_caffe(v, 3, 2), v)[1](g)[0])(x, g)
  ref = jax.jit(lambda v, g: jax.vjp(lambda v: jax.lax.reduce_window(
      v, -np.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (0, 0), (0, 1), (0, 0))),
      v)[1](g)[0])(x, g)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_max_pool_propagates_nan():
  x = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(jnp.nan)
  y = np.asarray(max_pool(x, 3, 2, 0))
  assert np.isnan(y).sum() == 4


@pytest.mark.parametrize("region, size, alpha", [("within_channel", 3, 5e-5),
                                                 ("across_channels", 5, 1e-4)])
def test_lrn_matches_plain_loops_and_gradient(rng, region, size, alpha):
  # Large activations so that the normalisation is far from the identity.
  x = (rng.normal(size=(2, 5, 6, 7)) * 60).astype(np.float32)
  y = lrn(jnp.asarray(x), size=size, alpha=alpha, beta=0.75, k=1.0, region=region)
  ref = np_lrn(x, size, alpha, 0.75, 1.0, region)
  assert np.abs(ref - x).max() > 1e-2 * np.abs(x).max()
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

  def plain(v):  # the same formula for autodiff, with jnp.pad + sums
    half = size // 2
    sq = jnp.pad(v * v, [(0, 0)] * 3 + [(half, half)] if region == "across_channels" else
                 [(0, 0), (half, half), (half, half), (0, 0)])
    if region == "across_channels":
      total = sum(sq[..., i:i + v.shape[3]] for i in range(size))
      scale = 1.0 + alpha / size * total
    else:
      total = sum(sq[:, i:i + v.shape[1], j:j + v.shape[2]]
                  for i in range(size) for j in range(size))
      scale = 1.0 + alpha / size ** 2 * total
    return v * scale ** -0.75

  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  vjp = jax.jit(lambda f, v, g: jax.vjp(f, v)[1](g)[0], static_argnums=0)
  ours = vjp(lambda v: F.local_response_norm(v, size=size, alpha=alpha, beta=0.75,
                                             region=region), jnp.asarray(x), g)
  np.testing.assert_allclose(ours, vjp(plain, jnp.asarray(x), g), rtol=1e-4, atol=1e-6)


def test_masked_max_pool_equals_pooling_each_example_alone(rng):
  sizes = np.array([[9, 6], [5, 11]], np.int32)
  x = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  y, out = jax.jit(F.masked_max_pool_caffe, static_argnums=(2, 3))(jnp.asarray(x), sizes, 3, 2)
  for i, (h, w) in enumerate(sizes):
    alone = np_max_pool_caffe(x[i:i + 1, :h, :w], 3, 2)
    oh, ow = alone.shape[1:3]
    assert tuple(out[i]) == (oh, ow)
    np.testing.assert_array_equal(y[i, :oh, :ow], alone[0])
    assert not np.asarray(y[i, oh:]).any() and not np.asarray(y[i, :, ow:]).any()


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name, side, channels", [("zf5", 6, 256), ("convnet5", 6, 256),
                                                  ("overfeat5", 6, 512), ("overfeat7", 6, 512)])
def test_fixed_head_accepts_only_the_base_size(name, side, channels):
  model = nnx.eval_shape(
      lambda: models.create(name, num_classes=10, rngs=nnx.Rngs(0), head="fixed"))
  assert model.fc6.kernel.shape == (side * side * channels, 4096)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  pooled = nnx.eval_shape(lambda m, v: m.pool(*m.features(v)), model, x)
  assert pooled.shape == (2, side * side * channels)
  with pytest.raises(ValueError, match="accepts only 224x224"):
    nnx.eval_shape(lambda m, v: m(v), model, jax.ShapeDtypeStruct((2, 180, 180, 3), jnp.float32))
  with pytest.raises(ValueError, match="13x13|18x18"):
    model.pool(jnp.zeros((1, 10, 10, channels)))


def test_fixed_head_small_base_size_option():
  model = tiny("small", head="fixed", base_size=48)
  model.eval()
  assert _forward_alone(model, jnp.zeros((2, 48, 48, 3))).shape == (2, 5)
  with pytest.raises(ValueError, match="accepts only 48x48"):
    model(jnp.zeros((2, 64, 64, 3)))
  with pytest.raises(ValueError, match="image_sizes"):
    model(jnp.zeros((2, 48, 48, 3)), np.array([[48, 48], [40, 48]]))


def test_spp_output_dim_follows_the_levels():
  model = nnx.eval_shape(lambda: models.create("zf5", num_classes=10, rngs=nnx.Rngs(0),
                                               spp_levels=(4, 3, 2, 1)))
  assert model.fc6.kernel.shape == (30 * 256, 4096)


# ----------------------------------------------------------------------------- mixed sizes


def _padded_batch(rng, sizes, garbage=0.0):
  sizes = np.asarray(sizes, np.int32)
  hmax, wmax = sizes.max(axis=0)
  images = np.full((len(sizes), hmax, wmax, 3), garbage, np.float32)
  alone = []
  for i, (h, w) in enumerate(sizes):
    img = rng.normal(size=(h, w, 3)).astype(np.float32) * 50
    images[i, :h, :w] = img
    alone.append(img)
  return images, sizes, alone


# Awkward sizes: odd, non-square, just above each network's minimum and not stride-aligned.
MIXED = {
    "zf5": [(39, 61), (58, 41), (61, 53)],
    "convnet5": [(31, 45), (50, 33)],
    "overfeat5": [(25, 38), (41, 29)],
    "overfeat7": [(27, 40), (43, 26)],
    "small": [(11, 23), (30, 14)],
}


@pytest.mark.parametrize("name", NAMES)
def test_mixed_batch_equals_each_image_alone(rng, name):
  model = tiny(name)
  model.eval()
  images, sizes, alone = _padded_batch(rng, MIXED[name])
  logits = np.asarray(_forward(model, images, sizes))
  for i, img in enumerate(alone):
    ref = np.asarray(_forward_alone(model, img[None]))[0]
    np.testing.assert_allclose(logits[i], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  # The per-example maps and the split API.
  fmap, fmap_sizes, split = _split_forward(model, images, sizes)
  np.testing.assert_array_equal(fmap_sizes, [model.feature_size(tuple(s)) for s in sizes])
  np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())


def test_padding_contents_never_leak(rng):
  model = tiny("zf5")
  model.eval()
  images, sizes, _ = _padded_batch(rng, MIXED["zf5"])
  inside = np.zeros(images.shape, bool)
  for i, (h, w) in enumerate(sizes):
    inside[i, :h, :w] = True
  garbage = np.where(inside, images, np.nan).astype(np.float32)
  garbage[~inside & (np.arange(images.shape[2])[None, None, :, None] % 2 == 0)] = 1e30
  clean = _forward(model, images, sizes)
  dirty = _forward(model, garbage, sizes)
  np.testing.assert_array_equal(clean, dirty)

  grads = np.asarray(_input_grad(model, jnp.asarray(garbage), sizes))
  assert np.isfinite(grads).all()
  for i, (h, w) in enumerate(sizes):
    assert not grads[i, h:].any() and not grads[i, :, w:].any()
    assert grads[i, :h, :w].any()


def test_mixed_batch_parameter_gradients_equal_the_sum_over_images(rng):
  model = tiny("zf5")
  model.eval()
  images, sizes, alone = _padded_batch(rng, [(41, 57), (55, 39)])
  batch = _param_grads(model, images, sizes)
  total = None
  for img in alone:
    g = _param_grads(model, img[None], np.array([img.shape[:2]], np.int32))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  flat_total = dict(nnx.to_flat_state(total))
  for path, a in nnx.to_flat_state(batch):
    b = np.asarray(flat_total[path][...])
    np.testing.assert_allclose(a[...], b, rtol=1e-4, atol=1e-4 * np.abs(b).max(),
                               err_msg=str(path))


def test_traced_image_sizes_compile_once(rng):
  model = tiny("small")
  model.eval()
  traces = []

  @nnx.jit
  def f(m, x, s):
    traces.append(1)
    return m(x, s)

  images, sizes_a, _ = _padded_batch(rng, [(30, 20), (12, 30)])
  sizes_b = np.array([[11, 11], [30, 30]], np.int32)
  a = f(model, images, sizes_a)
  b = f(model, images, sizes_b)
  assert len(traces) == 1
  assert not np.allclose(a, b)


def test_uniform_sizes_equal_no_sizes(rng):
  model = tiny("convnet5")
  model.eval()
  images = rng.normal(size=(2, 40, 37, 3)).astype(np.float32)
  np.testing.assert_allclose(_forward(model, images, np.array([[40, 37]] * 2, np.int32)),
                             _forward_alone(model, images), rtol=1e-5, atol=1e-6)


def test_bad_image_sizes_raise():
  model = tiny("small")
  x = jnp.zeros((2, 20, 20, 3))
  with pytest.raises(ValueError, match=r"image_sizes\[1\] = \(21, 20\)"):
    model(x, np.array([[20, 20], [21, 20]]))
  with pytest.raises(ValueError, match=r"image_sizes\[0\] = \(10, 20\)"):
    model(x, np.array([[10, 20], [20, 20]]))
  with pytest.raises(ValueError, match="shape"):
    model(x, np.array([20, 20]))
  with pytest.raises(ValueError, match=r"images must have shape \(N, H, W, 3\)"):
    model(jnp.zeros((2, 20, 20, 1)))


# ----------------------------------------------------------------------------- modes, precision


def test_dropout_only_in_training_mode(rng):
  model = tiny("small", dropout_rate=0.5)
  x = rng.normal(size=(2, 24, 24, 3)).astype(np.float32)
  forward = nnx.jit(lambda m, v: m(v))  # writes the advanced dropout RNG state back
  model.train()
  a, b = forward(model, x), forward(model, x)
  assert not np.allclose(a, b)
  model.eval()
  np.testing.assert_array_equal(forward(model, x), forward(model, x))


def test_bfloat16_compute_is_close_to_float32(rng):
  f32 = tiny("zf5")
  bf16 = tiny("zf5", dtype="bfloat16")
  assert bf16.conv1.conv.kernel.dtype == jnp.float32
  np.testing.assert_array_equal(f32.fc6.kernel[...], bf16.fc6.kernel[...])
  f32.eval()
  bf16.eval()
  x = rng.normal(size=(4, 64, 64, 3)).astype(np.float32) * 50
  a = np.asarray(_forward_alone(f32, x))
  b = np.asarray(_forward_alone(bf16, x))
  assert b.dtype == np.float32
  fmap, _, _ = _split_forward(bf16, x, None)
  assert fmap.dtype == jnp.bfloat16
  err = np.abs(a - b).max() / np.abs(a).max()
  assert err < 0.05, err
  assert np.abs(a).max() > 0


def test_same_seed_same_parameters_and_eager_equals_jit():
  a = tiny("overfeat5")
  b = tiny("overfeat5")
  c = nnx.jit(lambda: models.create("overfeat5", num_classes=5,
                                    rngs=nnx.Rngs(params=0, dropout=1), **TINY))()
  assert isinstance(c.conv1.conv.kernel[...], jax.Array)
  for m in (b, c):
    for pa, pb in zip(jax.tree.leaves(nnx.state(a, nnx.Param)),
                      jax.tree.leaves(nnx.state(m, nnx.Param))):
      if m is b:
        np.testing.assert_array_equal(pa, pb)
      else:  # The same draws; fused under jit, the normal transform may round differently.
        np.testing.assert_allclose(pa, pb, rtol=1e-6, atol=1e-8)
  d = models.create("overfeat5", num_classes=5, rngs=nnx.Rngs(params=1, dropout=1), **TINY)
  assert not np.array_equal(a.conv1.conv.kernel[...], d.conv1.conv.kernel[...])
  k = np.asarray(models.create("zf5", num_classes=5, rngs=nnx.Rngs(0),
                               width_multiplier=0.25).conv3.conv.kernel[...])
  assert abs(k.std() / math.sqrt(2 / (9 * 64)) - 1) < 0.05  # He init, fan-in 3x3x64
