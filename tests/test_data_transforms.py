"""Image transforms, buckets, batch plans and config checks (pure functions, no data set)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from spp_jax.data import examples, plan, settings, transforms


def _encode(array, fmt="PNG", mode=None):
  buf = io.BytesIO()
  img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  img.save(buf, format=fmt)
  return buf.getvalue()


# ----------------------------------------------------------------------------- decoding


def test_decode_png_jpeg_gray_rgba(rng):
  rgb = rng.integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
  np.testing.assert_array_equal(transforms.decode_image(_encode(rgb)), rgb)
  jpeg = transforms.decode_image(_encode(rgb, "JPEG"))
  assert jpeg.shape == (20, 30, 3) and jpeg.dtype == np.uint8
  gray = transforms.decode_image(_encode(rgb, "PNG", "L"))
  assert gray.shape == (20, 30, 3) and (gray[..., 0] == gray[..., 2]).all()
  rgba = transforms.decode_image(_encode(rgb, "PNG", "RGBA"))
  np.testing.assert_array_equal(rgba, rgb)
  assert transforms.image_size_of(_encode(rgb)) == (20, 30)


def test_decode_passes_arrays_and_rejects_garbage(rng):
  gray = rng.integers(0, 256, size=(5, 6)).astype(np.uint8)
  np.testing.assert_array_equal(transforms.decode_image(gray), np.stack([gray] * 3, -1))
  with pytest.raises(Exception):
    transforms.decode_image(b"not an image at all")
  with pytest.raises(ValueError, match="encoded bytes or a numpy array"):
    transforms.decode_image("a string")
  with pytest.raises(ValueError, match="shape"):
    transforms.to_rgb(np.zeros((4, 4, 2), np.uint8))


def test_jpeg_draft_keeps_the_short_side_large_enough(rng):
  big = np.kron(rng.integers(0, 256, size=(50, 80, 3)), np.ones((8, 8, 1))).astype(np.uint8)
  out = transforms.decode_image(_encode(big, "JPEG"), draft_short_side=90)
  assert min(out.shape[:2]) >= 90 and out.shape[0] < 400  # decoded at a reduced size
  assert abs(out.shape[1] / out.shape[0] - 1.6) < 0.05


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size,short,expected", [((100, 200), 50, (50, 100)),
                                                 ((200, 100), 50, (100, 50)),
                                                 ((30, 31), 64, (64, 66)),
                                                 ((64, 64), 64, (64, 64))])
def test_short_side_size(size, short, expected):
  assert transforms.short_side_size(size, short) == expected


def test_ten_views_are_corners_center_and_flips(rng):
  img = rng.integers(0, 256, size=(9, 12, 3)).astype(np.uint8)
  views = transforms.ten_views(img, 5)
  assert len(views) == 10
  # Plain reference offsets: centre, then top-left, top-right, bottom-left, bottom-right.
  offsets = [((9 - 5) // 2, (12 - 5) // 2), (0, 0), (0, 7), (4, 0), (4, 7)]
  for k, (t, l) in enumerate(offsets):
    np.testing.assert_array_equal(views[k], img[t:t + 5, l:l + 5])
    np.testing.assert_array_equal(views[k + 5], img[t:t + 5, l:l + 5][:, ::-1])


def test_random_crop_covers_positions_and_stays_inside(rng):
  img = np.arange(8 * 10).reshape(8, 10, 1).repeat(3, 2).astype(np.uint8)
  seen = set()
  for _ in range(300):
    c = transforms.random_crop(img, 6, rng)
    top, left = divmod(int(c[0, 0, 0]), 10)
    np.testing.assert_array_equal(c, img[top:top + 6, left:left + 6])
    seen.add((top, left))
  assert seen == {(t, l) for t in range(3) for l in range(5)}
  with pytest.raises(ValueError, match="cannot crop"):
    transforms.random_crop(img, 9, rng)


def test_choose_bucket_rule():
  buckets = ((64, 64), (64, 96), (96, 64), (64, 128))
  assert transforms.choose_bucket((64, 64), buckets) == 0
  assert transforms.choose_bucket((64, 70), buckets) == 1  # smallest that holds it
  assert transforms.choose_bucket((90, 64), buckets) == 2
  assert transforms.choose_bucket((64, 120), buckets) == 3
  # Nothing holds it: closest aspect ratio (2:1 for 64x160 -> (64, 128)).
  assert transforms.choose_bucket((64, 160), buckets) == 3
  assert transforms.choose_bucket((200, 64), buckets) == 2


def test_fit_to_bucket():
  assert transforms.fit_to_bucket((64, 80), (64, 96)) == (64, 80)
  assert transforms.fit_to_bucket((64, 192), (64, 128)) == (43, 128)  # shrunk, aspect kept
  assert transforms.fit_to_bucket((64, 640), (64, 128), min_size=32) == (32, 128)
  with pytest.raises(ValueError, match="min_size"):
    transforms.fit_to_bucket((10, 10), (16, 16), min_size=20)


def test_scale_buckets_hold_the_same_images(rng):
  buckets = ((72, 72), (72, 112), (112, 72))
  assert transforms.scale_buckets(buckets, 72, 72) == buckets
  sizes = rng.integers(20, 400, size=(2000, 2))
  for s in (40, 52, 96, 150, 560):
    scaled = transforms.scale_buckets(buckets, 72, s)
    for h, w in sizes.tolist():
      base = transforms.short_side_size((h, w), 72)
      k = transforms.choose_bucket(base, buckets)
      if base[0] <= buckets[k][0] and base[1] <= buckets[k][1]:  # held without shrinking
        at_s = transforms.short_side_size((h, w), s)
        assert at_s[0] <= scaled[k][0] and at_s[1] <= scaled[k][1], (h, w, s)
    r = s / 72
    for (bh, bw), (sh, sw) in zip(buckets, scaled):
      assert bh * r - 1 < sh <= (bh + 0.5) * r + 0.5  # about proportional


def test_color_jitter_and_normalize(rng):
  img = rng.uniform(0, 255, size=(6, 7, 3)).astype(np.float32)
  assert transforms.color_jitter(img, 0.0, rng) is img
  out = transforms.color_jitter(img, 0.4, rng)
  assert out.shape == img.shape and out.dtype == np.float32 and not np.allclose(out, img)
  gray = np.full((4, 4, 3), 100.0, np.float32)  # no contrast or saturation to change
  b = transforms.color_jitter(gray, 0.5, np.random.default_rng(1))
  np.testing.assert_allclose(b, b[0, 0, 0], rtol=1e-5)
  mean, std = np.array([1, 2, 3], np.float32), np.array([2, 4, 8], np.float32)
  np.testing.assert_allclose(transforms.normalize(img, mean, std), (img - mean) / std, rtol=1e-6)


# ----------------------------------------------------------------------------- examples


def _settings(**kw):
  base = dict(name="x", crop_size=32, resize_short=40, min_size=16, mean=(0, 0, 0),
              std=(1, 1, 1), full_image=dict(short_side=40, buckets=((40, 40), (40, 64))))
  base.update(kw)
  return settings.data_settings(base)


def test_train_crop_is_a_random_crop_of_the_resized_image(rng):
  s = _settings(color_jitter=0.0, flip=False, resize_short=None)
  img = rng.integers(0, 256, size=(50, 80, 3)).astype(np.uint8)
  # No resizing anywhere: exactly the crop that random_crop takes with the same generator.
  out = examples.train_crop(img, s, 32, np.random.default_rng(0))
  ref = transforms.random_crop(img, 32, np.random.default_rng(0)).astype(np.float32)
  np.testing.assert_array_equal(out, ref)
  # Short side to 40, crop 32, then 24: one resampling of the same region of the source, close
  # to resizing the whole image, cropping and resizing again (two resamplings).
  s = _settings(color_jitter=0.0, flip=False)
  smooth = np.asarray(Image.fromarray(img).resize((8, 5)).resize((80, 50), Image.BILINEAR))
  out = examples.train_crop(smooth, s, 24, np.random.default_rng(0))
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  ref = transforms.resize_short_side(smooth, 40)
  ref = transforms.random_crop(ref, 32, np.random.default_rng(0))
  ref = transforms.resize(ref, (24, 24)).astype(np.float32)
  assert np.abs(out - ref).mean() < 2.0


def test_draft_decoding_gives_nearly_the_full_decoding_crops(rng):
  """A 1200x900 JPEG decoded at half size (DCT scaling, short side 450 >= 256) gives training
  crops within a few grey levels of those from the full decoding, at a quarter of the pixels."""
  noise = rng.integers(0, 256, size=(36, 48, 3)).astype(np.uint8)
  photo = np.asarray(Image.fromarray(noise).resize((1200, 900), Image.BICUBIC))
  jpeg = _encode(photo, "JPEG")
  full = transforms.decode_pil(jpeg)
  small = transforms.decode_pil(jpeg, draft_short_side=256)
  assert full.size == (1200, 900) and small.size == (600, 450)
  s = _settings(resize_short=256, crop_size=224, min_size=32, flip=False,
                full_image=dict(short_side=256, buckets=((256, 256),)))
  for seed in range(3):
    for out in (224, 180):
      a, _ = examples.train_crop_pixels(full, s, out, np.random.default_rng(seed))
      b, _ = examples.train_crop_pixels(small, s, out, np.random.default_rng(seed))
      diff = np.abs(a.astype(int) - b.astype(int))
      assert a.shape == b.shape == (out, out, 3) and diff.mean() < 1.5 and diff.max() < 40
  other, _ = examples.train_crop_pixels(full, s, 180, np.random.default_rng(9))
  assert np.abs(other.astype(int) - a.astype(int)).mean() > 5  # another crop is far


def test_resized_crop_at_scale_one_is_a_plain_crop(rng):
  img = rng.integers(0, 256, size=(40, 50, 3)).astype(np.uint8)
  for image in (img, Image.fromarray(img)):
    out = transforms.resized_crop(image, (3.0, 7.0, 20.0, 20.0), (20, 20))
    np.testing.assert_array_equal(out, img[3:23, 7:27])
  # The same box through Pillow's resampling gives the same pixels (weights 0 and 1).
  pil = np.asarray(Image.fromarray(img).resize((20, 20), Image.BILINEAR, box=(7, 3, 27, 23)))
  np.testing.assert_array_equal(pil, img[3:23, 7:27])


def test_resized_crop_equals_resize_then_crop_on_smooth_images():
  y, x = np.mgrid[0:60, 0:90]
  img = np.stack([y * 2, x * 2, (x + y)], -1).astype(np.uint8)  # linear ramps
  out = transforms.resized_crop(img, (10.0, 20.0, 30.0, 30.0), (15, 15))
  ref = transforms.resize(transforms.crop(img, 10, 20, (30, 30)), (15, 15))
  assert np.abs(out.astype(int) - ref.astype(int)).max() <= 2  # edges: pixels beyond the box


def test_apply_colors_is_jitter_then_normalize(rng):
  imgs = rng.uniform(0, 255, size=(4, 9, 11, 3)).astype(np.float32)
  mean, std = np.array([120, 110, 100], np.float32), np.array([60, 55, 50], np.float32)
  plain = transforms.apply_colors(imgs, None, mean, std)
  np.testing.assert_allclose(plain, transforms.normalize(imgs, mean, std), rtol=1e-5, atol=1e-5)
  for strength in (0.3, 1.0):
    refs, factors = [], []
    for k in range(4):
      refs.append(transforms.normalize(
          transforms.color_jitter(imgs[k], strength, np.random.default_rng(k)), mean, std))
      factors.append(transforms.jitter_factors(strength, np.random.default_rng(k)))
    out = transforms.apply_colors(imgs, np.stack(factors), mean, std)
    np.testing.assert_allclose(out, np.stack(refs), rtol=1e-4, atol=1e-4)


def test_small_image_policy(rng):
  tiny = rng.integers(0, 256, size=(8, 12, 3)).astype(np.uint8)
  resized = examples.check_small(tiny, _settings(small_image="resize"))
  assert resized.shape[:2] == (16, 24)
  with pytest.raises(examples.SmallImage):
    examples.check_small(tiny, _settings(small_image="reject"))
  out = examples.full_image(tiny, _settings(), 40, (40, 64))
  assert min(out.shape[:2]) >= 16


def test_eval_views(rng):
  s = _settings()
  img = rng.integers(0, 256, size=(60, 90, 3)).astype(np.uint8)
  center = settings.view_settings(dict(kind="center", size=32, short_side=40), s)
  (c,) = examples.eval_views(img, s, center)
  ref = transforms.center_crop(transforms.resize_short_side(img, 40), 32).astype(np.float32)
  assert c.shape == (32, 32, 3) and np.abs(c - ref).mean() < 25  # noise image, 2 resamplings
  (c,) = examples.eval_views(img, s, settings.view_settings(dict(kind="center", size=32,
                                                                 short_side=60), s))
  np.testing.assert_array_equal(c, transforms.center_crop(img, 32))  # no resizing: exact
  ms = settings.view_settings(dict(kind="multiscale", scales=(20, 40), flip=True), s)
  views = examples.eval_views(img, s, ms, [(20, 32), (40, 64)])
  assert [v.shape[:2] for v in views] == [(20, 30), (40, 60), (20, 30), (40, 60)]
  np.testing.assert_allclose(views[2], views[0][:, ::-1])


# ----------------------------------------------------------------------------- plans


def test_train_plan_is_a_deterministic_shuffle():
  a = plan.train_plan(103, 10, seed=1, epoch=0)
  b = plan.train_plan(103, 10, seed=1, epoch=0)
  c = plan.train_plan(103, 10, seed=1, epoch=1)
  assert a.indices.shape == (10, 10)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, c.indices)
  assert len(set(a.indices.ravel().tolist())) == 100  # distinct, remainder dropped


def test_bucketed_train_plan(rng):
  buckets = rng.integers(0, 3, size=200)
  buckets[:5] = -1  # left out
  p = plan.train_plan(200, 8, seed=0, epoch=2, buckets=buckets)
  counts = np.bincount(buckets[buckets >= 0], minlength=3)
  assert p.num_steps == sum(c // 8 for c in counts)
  flat = p.indices.ravel()
  assert len(set(flat.tolist())) == flat.size and (buckets[flat] >= 0).all()
  for row, b in zip(p.indices, p.buckets):
    assert (buckets[row] == b).all()


@pytest.mark.parametrize("use_buckets", [False, True])
def test_eval_plan_counts_every_example_once_across_processes(rng, use_buckets):
  n, per_process, processes = 53, 4, 3
  buckets = rng.integers(0, 3, size=n) if use_buckets else None
  full = plan.eval_plan(n, per_process * processes, buckets=buckets)
  seen = []
  for p in range(processes):
    local = full.local(p, processes)
    assert local.indices.shape == (full.num_steps, per_process)
    seen += [int(i) for i in local.indices.ravel() if i >= 0]
    if use_buckets:
      for row, b in zip(local.indices, local.buckets):
        assert all(buckets[i] == b for i in row if i >= 0)
  assert sorted(seen) == list(range(n))


def test_plan_checks():
  with pytest.raises(ValueError, match="process_index"):
    plan.eval_plan(10, 4).local(2, 2)
  with pytest.raises(ValueError, match="global_batch"):
    plan.train_plan(10, 0, seed=0, epoch=0)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,match", [
    (dict(bad_image="ignore"), "data.bad_image"),
    (dict(small_image="crop"), "data.small_image"),
    (dict(crop_size=0), "data.crop_size"),
    (dict(resize_short=20), "data.resize_short"),
    (dict(min_size=64), "data.crop_size=32 is below"),
    (dict(mean=(1, 2)), "data.mean"),
    (dict(std=(1, 0, 1)), "data.std"),
    (dict(color_jitter=2.0), "data.color_jitter"),
    (dict(full_image=dict(short_side=40, buckets=((30, 64),))), "data.full_image.buckets"),
    (dict(name=""), "data.name"),
    (dict(num_workers=-1), "data.num_workers"),
])
def test_bad_data_config_is_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    _settings(**overrides)


def test_bad_views_are_named():
  s = _settings()
  with pytest.raises(ValueError, match="view.kind"):
    settings.view_settings(dict(kind="five_view"), s)
  with pytest.raises(ValueError, match="scales"):
    settings.view_settings(dict(name="ms", kind="multiscale"), s)
  with pytest.raises(ValueError, match="below the network's minimum"):
    settings.view_settings(dict(name="ms", kind="multiscale", scales=(8, 40)), s)
  assert settings.view_settings(dict(kind="ten_view"), s).num_views == 10


# ----------------------------------------------------------------------------- opencv backend


def test_opencv_decodes_the_pillow_pixels_and_resamples_close_to_pillow(rng):
  pytest.importorskip("cv2")
  noise = rng.integers(0, 256, size=(30, 40, 3)).astype(np.uint8)
  photo = np.asarray(Image.fromarray(noise).resize((800, 600), Image.BICUBIC))
  jpeg = _encode(photo, "JPEG")
  for draft in (None, 300, 100):
    np.testing.assert_array_equal(transforms.decode_cv2(jpeg, draft_short_side=draft),
                                  np.asarray(transforms.decode_pil(jpeg, draft_short_side=draft)))
  assert transforms.decode_cv2(jpeg, draft_short_side=100).shape == (150, 200, 3)
  gray = _encode(photo[:, :, 0], "PNG")
  np.testing.assert_array_equal(transforms.decode_cv2(gray), transforms.decode_image(gray))
  with pytest.raises(ValueError, match="cannot decode"):
    transforms.decode_cv2(b"not an image at all")
  image = transforms.decode_cv2(jpeg)
  for size in ((300, 400), (123, 77), (900, 1000)):  # shrinking (area) and enlarging (linear)
    a = transforms.resize(image, size, "opencv").astype(int)
    b = transforms.resize(image, size).astype(int)
    assert a.shape == b.shape == size + (3,) and np.abs(a - b).mean() < 2.5
  box = (100.4, 50.6, 300.0, 300.0)
  a = transforms.resized_crop(image, box, (224, 224), "opencv").astype(int)
  b = transforms.resized_crop(image, box, (224, 224)).astype(int)
  assert np.abs(a - b).mean() < 3
  np.testing.assert_array_equal(transforms.resized_crop(image, (3, 4, 50, 60), (50, 60), "opencv"),
                                image[3:53, 4:64])
