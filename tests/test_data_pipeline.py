"""The input pipeline end to end on real array_record files: the embedded set's "tiny" config
(built once per session into a temporary data_dir) and a small builder with broken images."""

from __future__ import annotations

import io
import itertools
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from spp_jax import data
from spp_jax.data import examples, idx, sources, synth, transforms
from spp_jax.data import multiscale_fashion_mnist as mfm

FMNIST_DIR = mfm.DEFAULT_SOURCE_DIR
pytestmark = pytest.mark.skipif(not idx.has_fashion_mnist(FMNIST_DIR),
                                reason="Fashion-MNIST idx files not installed (make data)")

BUCKETS = ((40, 40), (40, 64), (64, 40))


def _cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      name="multiscale_fashion_mnist/tiny", data_dir=str(data_dir), source_dir=None,
      train_split="train", eval_split="test", num_workers=0, resize_short=40, crop_size=32,
      flip=True, color_jitter=0.2, mean=(120.0, 110.0, 100.0), std=(60.0, 55.0, 50.0),
      full_image=dict(short_side=40, buckets=BUCKETS), bad_image="skip", small_image="resize",
      min_size=16, mode="crop", batch_dtype="float32"))
  c.update(overrides)
  return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The embedded set's "tiny" config (512 / 256), prepared on first use like in a run."""
  path = tmp_path_factory.mktemp("tfds")
  assert data.num_examples(_cfg(path), "train") == 512
  return path


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- the data set


def test_embedded_records_are_the_drawn_examples(data_dir):
  source = sources.open_source(_cfg(data_dir), "test")
  assert len(source) == 256 and (source.image_key, source.label_key) == ("image", "label")
  images, labels = idx.load_split(FMNIST_DIR, "test")
  for i in (0, 17, 255):
    record = source.read_one(i)
    ex = synth.make_example(images[:256], labels[:256], i, seed=0, split="test")
    np.testing.assert_array_equal(transforms.decode_image(record["image"]), ex["image"])
    assert record["label"] == labels[i] == ex["label"] and record["item_index"] == i
    h, w = ex["image"].shape[:2]
    expected = (synth.tfds_bbox(ex["box"], (h, w)) if hasattr(synth, "tfds_bbox")
                else ex["box"] / np.array([h, w, h, w]))
    np.testing.assert_allclose(record["bbox"], expected, atol=1e-6)
  assert data.num_classes(_cfg(data_dir)) == 10


def test_image_sizes_scan_matches_headers(data_dir):
  cfg = _cfg(data_dir)
  sizes = sources.image_sizes(cfg, "train")
  again = sources.image_sizes(cfg, "train")  # from the cache file
  np.testing.assert_array_equal(sizes, again)
  source = sources.open_source(cfg, "train")
  for i in (0, 100, 511):
    assert tuple(sizes[i]) == transforms.decode_image(source.read_one(i)["image"]).shape[:2]
  assert 40 <= sizes.min() and sizes.max() <= 160 and len(np.unique(sizes[:, 0])) > 30


# ----------------------------------------------------------------------------- training


def test_train_crop_batches_are_deterministic(data_dir):
  cfg = _cfg(data_dir)
  it = data.train_iterator(cfg, batch_size=32, image_size=24, epoch=0, seed=3)
  assert len(it) == 512 // 32 == data.steps_per_epoch(cfg, 32)
  first = _take(it, 3)
  b = first[0]
  assert b["image"].shape == (32, 24, 24, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and (b["mask"] == 1).all()
  assert (b["image_size"] == 24).all()
  # Labels are those of the examples the plan put in the batch.
  source = sources.open_source(cfg, "train")
  rows = it._plan.indices[:3]
  for batch, row in zip(first, rows):
    np.testing.assert_array_equal(batch["label"], [source.read_one(int(i))["label"] for i in row])
  again = _take(data.train_iterator(cfg, batch_size=32, image_size=24, epoch=0, seed=3), 3)
  _assert_batches_equal(first, again)
  other = _take(data.train_iterator(cfg, batch_size=32, image_size=24, epoch=1, seed=3), 1)
  assert not np.array_equal(other[0]["label"], first[0]["label"])


def test_multi_size_training_is_the_same_region_at_another_resolution(data_dir):
  cfg = _cfg(data_dir, color_jitter=0.0)
  (big,) = _take(data.train_iterator(cfg, batch_size=8, image_size=32, epoch=0, seed=0), 1)
  (small,) = _take(data.train_iterator(cfg, batch_size=8, image_size=24, epoch=0, seed=0), 1)
  np.testing.assert_array_equal(big["label"], small["label"])
  std, mean = np.array(cfg.std, np.float32), np.array(cfg.mean, np.float32)
  refs = []
  for j in range(8):
    crop = np.clip(np.rint(big["image"][j] * std + mean), 0, 255).astype(np.uint8)
    refs.append((transforms.resize(crop, (24, 24)).astype(np.float32) - mean) / std)
  for j in range(8):
    # The same crop resampled once from the source vs resized from the 32 crop: ~2 grey levels
    # apart on average; another example's crop is far (a plain check that this can fail).
    assert np.abs(refs[j] - small["image"][j]).mean() < 0.06
    assert np.abs(refs[(j + 1) % 8] - small["image"][j]).mean() > 0.2


def test_resume_mid_epoch_gives_the_remaining_batches(data_dir):
  cfg = _cfg(data_dir)
  it = data.train_iterator(cfg, batch_size=64, image_size=32, epoch=2, seed=1)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # the trainer stores it as JSON
  rest = list(it)
  assert len(rest) == 8 - 3
  resumed = data.train_iterator(cfg, batch_size=64, image_size=32, epoch=2, seed=1)
  resumed.set_state(state)
  _assert_batches_equal(rest, list(resumed))
  with pytest.raises(ValueError, match="epoch"):
    data.train_iterator(cfg, batch_size=64, image_size=32, epoch=3, seed=1).set_state(state)


def test_two_processes_share_the_single_process_batches(data_dir):
  cfg = _cfg(data_dir)
  single = _take(data.train_iterator(cfg, batch_size=16, image_size=32, epoch=0, seed=5), 2)
  parts = [_take(data.train_iterator(cfg, batch_size=8, image_size=32, epoch=0, seed=5,
                                     process_index=p, process_count=2), 2) for p in range(2)]
  for t in range(2):
    for key in single[t]:
      np.testing.assert_array_equal(
          single[t][key], np.concatenate([parts[0][t][key], parts[1][t][key]]), err_msg=key)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data_dir):
  """Batches made in 2 grain worker processes equal the in-process ones, and the state taken
  with workers resumes without them (the state is a batch count, not a worker's position)."""
  cfg = _cfg(data_dir)
  ref = _take(data.train_iterator(cfg, batch_size=32, image_size=32, epoch=0, seed=0), 4)
  it = data.train_iterator(_cfg(data_dir, num_workers=2), batch_size=32, image_size=32,
                           epoch=0, seed=0)
  got = _take(it, 2)
  state = it.get_state()
  it.close()
  resumed = data.train_iterator(cfg, batch_size=32, image_size=32, epoch=0, seed=0)
  resumed.set_state(state)
  got += _take(resumed, 2)
  _assert_batches_equal(ref, got)


def test_full_image_training_batches(data_dir):
  cfg = _cfg(data_dir, mode="full_image", color_jitter=0.0, flip=False)
  it = data.train_iterator(cfg, batch_size=16, image_size=32, epoch=0, seed=0)
  assert len(it) == data.steps_per_epoch(cfg, 16)
  sizes = sources.image_sizes(cfg, "train")
  shapes = set()
  for batch, row in zip(it, it._plan.indices):
    hb, wb = batch["image"].shape[1:3]
    shapes.add((hb, wb))
    for j, i in enumerate(row):
      h, w = batch["image_size"][j]
      assert h <= hb and w <= wb and min(h, w) >= 16
      expected = transforms.fit_to_bucket(transforms.short_side_size(sizes[i], 40), (hb, wb))
      assert (h, w) == expected  # short side 40 (= 40 * 32 / 32), aspect kept unless fitted
      assert not batch["image"][j, h:].any() and not batch["image"][j, :, w:].any()
  assert shapes <= set(BUCKETS) and len(shapes) >= 2
  # The epoch's size scales the short side and the buckets.
  it = data.train_iterator(cfg, batch_size=16, image_size=24, epoch=0, seed=0)
  (small,) = _take(it, 1)
  bucket = small["image"].shape[1:3]
  assert bucket in set(transforms.scale_buckets(BUCKETS, 40, 30))
  for j, i in enumerate(it._plan.indices[0]):
    expected = transforms.fit_to_bucket(transforms.short_side_size(sizes[i], 30), bucket, 16)
    assert tuple(small["image_size"][j]) == expected


# ----------------------------------------------------------------------------- evaluation


VIEWS = [dict(name="center", kind="center", size=32),
         dict(name="ten", kind="ten_view", size=32),
         dict(name="full", kind="full", short_side=40),
         dict(name="ms", kind="multiscale", scales=(24, 40, 56))]


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v["kind"])
def test_eval_counts_every_example_once_across_processes(data_dir, view):
  cfg = _cfg(data_dir)
  source = sources.open_source(cfg, "test")
  labels = []
  lengths = []
  nv = {"center": 1, "ten_view": 10, "full": 1, "multiscale": 3}[view["kind"]]
  for p in range(2):
    it = data.eval_iterator(cfg, view, batch_size=20, process_index=p, process_count=2)
    lengths.append(len(it))
    count = 0
    for batch, row in zip(it, it._plan.indices):
      count += 1
      b, v = batch["image"].shape[:2]
      assert (b, v) == (20, nv) and batch["image_size"].shape == (20, nv, 2)
      np.testing.assert_array_equal(batch["mask"], row >= 0)
      labels += batch["label"][batch["mask"] > 0].tolist()
    assert count == len(it)
  assert lengths[0] == lengths[1] == data.num_eval_batches(cfg, view, 20, process_count=2)
  assert sorted(labels) == sorted(source.read_one(i)["label"] for i in range(256))


def test_eval_views_match_the_reference(data_dir):
  cfg = _cfg(data_dir)
  s = data.data_settings(cfg)
  source = sources.open_source(cfg, "test")
  for view in VIEWS:
    it = data.eval_iterator(cfg, view, batch_size=8)
    batch, row = next(it), it._plan.indices[0]
    v = data.view_settings(view, s)
    for j in (0, int((row >= 0).sum()) - 1):
      image = transforms.decode_image(source.read_one(int(row[j]))["image"])
      bucket = int(it._plan.buckets[0])
      buckets = [b[bucket] for b in it._maker.view_buckets]
      for k, ref in enumerate(examples.eval_views(image, s, v, buckets)):
        h, w = ref.shape[:2]
        assert tuple(batch["image_size"][j, k]) == (h, w)
        np.testing.assert_array_equal(batch["image"][j, k, :h, :w], ref)
    if view["kind"] == "ten_view":
      np.testing.assert_array_equal(batch["image"][:, 5], batch["image"][:, 0, :, ::-1])
    if view["kind"] == "multiscale":
      assert [min(hw) for hw in batch["image_size"][0].tolist()] == [24, 40, 56]
      shapes = data.multiscale_view_shapes(cfg, view, batch["image"].shape[2:4])
      for k, (h, w) in enumerate(shapes):
        assert (batch["image_size"][:, k] <= (h, w)).all()


# ----------------------------------------------------------------------------- bad data


class SppDataTestImages(tfds.core.GeneratorBasedBuilder):
  """12 examples: 3 undecodable (garbage, truncated PNG), 1 tiny, the rest 40x52 PNGs."""

  VERSION = tfds.core.Version("1.0.0")
  BAD = (3, 5)
  TINY = 7

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=3)}),
        supervised_keys=("image", "label"), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(12):
      size = (6, 9) if i == self.TINY else (40, 52)
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, size=size + (3,)).astype(np.uint8)).save(buf, "PNG")
      png = buf.getvalue()
      if i == 3:
        png = b"this is not an image"
      if i == 5:
        png = png[:len(png) // 2]
      yield i, {"image": png, "label": i % 3}


@pytest.fixture(scope="session")
def bad_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds_bad")
  SppDataTestImages(data_dir=str(path), file_format="array_record").download_and_prepare()
  return path


def _bad_cfg(bad_dir, **overrides):
  return _cfg(bad_dir, name="spp_data_test_images", **overrides)


def test_undecodable_images_are_skipped_and_counted(bad_dir):
  cfg = _bad_cfg(bad_dir)
  it = data.eval_iterator(cfg, dict(kind="center", size=32), batch_size=4)
  batches = list(it)
  mask = np.concatenate([b["mask"] for b in batches])
  assert it.skipped == 2 and it.rejected == 0
  assert mask.sum() == 10 and not mask[list(SppDataTestImages.BAD)].any()
  train = data.train_iterator(cfg, batch_size=4, image_size=32, epoch=0, seed=0)
  batches = list(train)
  assert train.skipped == 2 and sum(b["mask"].sum() for b in batches) == 10
  for b in batches:  # a skipped slot repeats a good example of its batch, masked out
    assert np.isfinite(b["image"]).all() and b["image"].any(axis=(1, 2, 3)).all()


def test_undecodable_image_can_stop_the_run_naming_it(bad_dir):
  cfg = _bad_cfg(bad_dir, bad_image="error")
  with pytest.raises(ValueError, match="spp_data_test_images split 'test' example 3"):
    list(data.eval_iterator(cfg, dict(kind="center", size=32), batch_size=4))


def test_small_images_are_resized_up_or_rejected(bad_dir):
  rejecting = data.eval_iterator(_bad_cfg(bad_dir, small_image="reject"),
                                 dict(kind="full", short_side=40), batch_size=4)
  mask = np.concatenate([b["mask"] for b in rejecting])
  assert rejecting.rejected == 1 and rejecting.skipped == 2 and mask.sum() == 9
  resizing = data.eval_iterator(_bad_cfg(bad_dir, min_size=24), dict(kind="full", short_side=40),
                                batch_size=4)
  for b in resizing:
    assert (b["image_size"][b["mask"] > 0] >= 24).all()
  assert resizing.rejected == 0


def test_config_sizes_below_the_network_minimum_are_refused(data_dir):
  with pytest.raises(ValueError, match="image_size=12 is below"):
    data.train_iterator(_cfg(data_dir), batch_size=8, image_size=12, epoch=0, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    data.train_iterator(_cfg(data_dir), batch_size=0, image_size=32, epoch=0, seed=0)
  with pytest.raises(ValueError, match="not a TFDS data set"):
    data.num_examples(_cfg(data_dir, name="no_such_data_set_xyz"), "train")
