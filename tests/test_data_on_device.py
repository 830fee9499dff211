"""uint8 host batches finished on the device (data.batch_dtype = "uint8", on_device.py) against
the float32 batches the host makes (data.batch_dtype = "float32"), on the embedded "tiny" set."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import data
from spp_jax.data import examples, on_device, settings as settings_lib, transforms
from test_data_pipeline import VIEWS, _cfg, data_dir  # noqa: F401  (fixture)


def _first(it, n=1):
  return list(itertools.islice(it, n))


def _pair(make, cfg, n=2):
  """The same batches as float32 and as uint8."""
  return (_first(make(_cfg(**cfg, batch_dtype="float32")), n),
          _first(make(_cfg(**cfg, batch_dtype="uint8")), n))


@pytest.mark.parametrize("decoder", ["pillow", "opencv"])
@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v["kind"])
def test_eval_views_on_the_device_equal_the_host_views(data_dir, view, decoder):
  """Every view kind, ten_view included: the device's crops, flips, normalisation and zero
  padding give exactly the float32 batch the host made before (last batch: padding slots)."""
  if decoder == "opencv":
    pytest.importorskip("cv2")

  def make(cfg):
    return data.eval_iterator(cfg, view, batch_size=24)
  cfg = dict(data_dir=data_dir, decoder=decoder)
  floats = list(make(_cfg(**cfg)))
  pixels = list(make(_cfg(**cfg, batch_dtype="uint8")))
  s = data.data_settings(_cfg(**cfg))
  finish = jax.jit(lambda b: on_device.eval_batch(b, view, s))
  assert len(floats) == len(pixels) > 1
  for ref, got in zip(floats[:2] + floats[-1:], pixels[:2] + pixels[-1:]):
    assert got["image"].dtype == np.uint8
    out = jax.device_get(finish(got))
    assert out.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{view['kind']} {k}")
  assert (floats[-1]["mask"] == 0).any()  # the padded last batch was compared too


def test_ten_view_sends_each_image_once_in_far_fewer_bytes(data_dir):
  view = dict(kind="ten_view", size=32)
  ref = _first(data.eval_iterator(_cfg(data_dir), view, batch_size=16))[0]
  got = _first(data.eval_iterator(_cfg(data_dir, batch_dtype="uint8"), view, batch_size=16))[0]
  hc, wc = examples.ten_view_canvas_shape(data.view_settings(view, data.data_settings(
      _cfg(data_dir))))
  assert got["image"].shape == (16, hc, wc, 3) == (16, 40, 96, 3)  # short side 40, 3 crops
  assert ref["image"].nbytes / got["image"].nbytes > 10  # 10 float32 crops vs one canvas


@pytest.mark.parametrize("mode", ["crop", "full_image"])
def test_training_batches_on_the_device_equal_the_host_without_colour(data_dir, mode):
  """Same geometry and flips from the same per-example rng; the device mirrors (inside each
  image's width) and normalises exactly as the host did."""
  def make(cfg):
    return data.train_iterator(cfg, batch_size=16, image_size=32, epoch=1, seed=4, mode=mode)
  floats, pixels = _pair(make, dict(data_dir=data_dir, color_jitter=0.0))
  s = data.data_settings(_cfg(data_dir, color_jitter=0.0))
  finish = jax.jit(lambda b: on_device.train_batch(b, s, key=None))
  for ref, got in zip(floats, pixels):
    assert got["image"].dtype == np.uint8 and got["flip"].any() and not got["flip"].all()
    out = jax.device_get(finish(got))
    assert out.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    assert ref["image"].nbytes == 4 * got["image"].nbytes


def test_device_colour_alteration_is_the_host_affine_map(rng):
  """`jitter_normalize` with given factors is `transforms.apply_colors`; with padding it is the
  host's per-image colouring of the unpadded image, and the padding stays 0."""
  mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 55.0, 50.0])
  images = rng.integers(0, 256, size=(4, 20, 24, 3)).astype(np.uint8)
  factors = rng.uniform(0.7, 1.3, size=(4, 3))
  ref = transforms.apply_colors(images, factors, mean, std)
  got = on_device.jitter_normalize(jnp.asarray(images), jnp.asarray(factors, jnp.float32),
                                   mean, std)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
  sizes = np.array([[20, 24], [11, 24], [20, 7], [5, 9]], np.int32)
  padded = images * on_device.valid_mask(jnp.asarray(sizes), 20, 24).astype(np.uint8)
  out = np.asarray(on_device.train_images(
      padded, mean=mean, std=std, color_jitter=0.3, key=jax.random.key(0),
      image_size=jnp.asarray(sizes)))
  drawn = np.asarray(on_device.colour_factors(jax.random.key(0), 4, 0.3))
  for j, (h, w) in enumerate(sizes):
    alone = transforms.apply_colors(images[j:j + 1, :h, :w], drawn[j:j + 1], mean, std)[0]
    np.testing.assert_allclose(out[j, :h, :w], alone, rtol=1e-5, atol=1e-4)
    assert not out[j, h:].any() and not out[j, :, w:].any()


def test_colour_factors_depend_on_the_key_and_the_row_only():
  key = jax.random.key(7)
  big = np.asarray(on_device.colour_factors(key, 8, 0.2))
  np.testing.assert_array_equal(np.asarray(on_device.colour_factors(key, 3, 0.2)), big[:3])
  assert ((big >= 0.8) & (big <= 1.2)).all() and len(np.unique(big)) == big.size
  other = np.asarray(on_device.colour_factors(jax.random.fold_in(key, 1), 8, 0.2))
  assert not np.allclose(other, big)


def test_flip_within_keeps_the_padding_at_the_right(rng):
  x = rng.integers(1, 256, size=(3, 4, 6, 3)).astype(np.uint8)
  widths = np.array([6, 4, 1])
  x[1, :, 4:] = 0
  out = np.asarray(on_device.flip_within(jnp.asarray(x), jnp.asarray(widths),
                                         jnp.asarray([True, True, False])))
  np.testing.assert_array_equal(out[0], x[0, :, ::-1])
  np.testing.assert_array_equal(out[1, :, :4], x[1, :, 3::-1])
  assert not out[1, :, 4:].any()
  np.testing.assert_array_equal(out[2], x[2])


@pytest.mark.parametrize("hw", [(40, 64), (64, 40), (40, 150), (150, 41), (40, 40)])
def test_ten_view_canvas_crops_equal_the_host_crops(rng, hw):
  """Landscape, portrait (transposed), and images longer than the canvas (compacted to the
  bands the crops read): the device's crops equal `transforms.ten_views`."""
  s = settings_lib.data_settings(dict(name="x", crop_size=32, resize_short=None))
  view = settings_lib.view_settings(dict(kind="ten_view", size=32, short_side=None), s)
  image = rng.integers(0, 256, size=hw + (3,)).astype(np.uint8)
  region, offsets, transposed = examples.ten_view_canvas(image, s, view)
  hc, wc = examples.ten_view_canvas_shape(view)
  assert region.shape[0] <= hc and region.shape[1] <= wc and transposed == (hw[0] > hw[1])
  canvas = np.zeros((1, hc, wc, 3), np.uint8)
  canvas[0, :region.shape[0], :region.shape[1]] = region
  crops = on_device.ten_view_crops(jnp.asarray(canvas), jnp.asarray(offsets[None]),
                                   jnp.asarray([transposed]), 32)
  ref = np.stack(transforms.ten_views(image, 32))
  np.testing.assert_array_equal(np.asarray(crops[0]), ref)


def test_num_workers_auto_leaves_one_core():
  s = settings_lib.data_settings(dict(name="x", num_workers="auto"))
  assert s.num_workers == max(1, settings_lib.available_cores() - 1)
  with pytest.raises(ValueError, match="num_workers"):
    settings_lib.data_settings(dict(name="x", num_workers="many"))
  with pytest.raises(ValueError, match="batch_dtype"):
    settings_lib.data_settings(dict(name="x", batch_dtype="float16"))


@pytest.mark.slow
def test_uint8_batches_from_worker_processes_come_in_shared_memory(data_dir):
  """Workers write the uint8 images into shared memory; the batches equal in-process ones."""
  def make(cfg):
    return data.train_iterator(cfg, batch_size=16, image_size=32, epoch=0, seed=0)
  ref = _first(make(_cfg(data_dir, batch_dtype="uint8")), 3)
  got = _first(make(_cfg(data_dir, batch_dtype="uint8", num_workers=2)), 3)
  from grain.multiprocessing import SharedMemoryArray
  assert isinstance(got[0]["image"], SharedMemoryArray)
  for a, b in zip(ref, got):
    for k in a:
      np.testing.assert_array_equal(np.asarray(b[k]), a[k], err_msg=k)


def test_put_copies_transposed_views_exactly(rng):
  from spp_jax.data import assemble
  x = rng.integers(0, 256, size=(7, 5, 3)).astype(np.uint8)
  dst = np.zeros((9, 9, 3), np.uint8)
  assemble.put(dst, x.transpose(1, 0, 2))
  np.testing.assert_array_equal(dst[:5, :7], x.transpose(1, 0, 2))
  assert not dst[5:].any() and not dst[:, 7:].any()
  assemble.put(dst, x[:, ::-1])  # negative strides: the plain copy
  np.testing.assert_array_equal(dst[:7, :5], x[:, ::-1])


def test_crop_batches_skip_the_sizes_with_the_same_result(data_dir):
  """Crop batches fill their shape: flips and colour without the per-example sizes
  (padded=False, what the train step uses in crop mode) give the same inputs."""
  it = data.train_iterator(_cfg(data_dir, batch_dtype="uint8", color_jitter=0.3), batch_size=16,
                           image_size=32, epoch=1, seed=4, mode="crop")
  batch = next(iter(it))
  s = data.data_settings(_cfg(data_dir, color_jitter=0.3))
  key = jax.random.key(3)
  sized = jax.jit(lambda b: on_device.train_batch(b, s, key))(batch)
  plain = jax.jit(lambda b: on_device.train_batch(b, s, key, padded=False))(batch)
  assert batch["flip"].any()
  np.testing.assert_allclose(np.asarray(plain["image"]), np.asarray(sized["image"]),
                             rtol=1e-6, atol=1e-6)
