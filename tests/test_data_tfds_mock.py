"""Reading the real data sets' TFDS builders through `tfds.data_source`, with mocked records.

`tfds.testing.mock_data` serves random examples through the builders' own `as_data_source`
(their real features, label names and supervised keys) without any prepared files. It cannot
hand out encoded image bytes without TensorFlow (it would encode its fake images with TF), so
these tests read with data.decoder = "tfds" (TFDS decodes, with Pillow); the Pillow decoding
of raw bytes is covered on real array_record files in test_data_pipeline.py.
"""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from spp_jax import data
from spp_jax.data import sources
from spp_jax.errors import DataError

# name, eval split, number of classes in the builder's features
REAL = [("imagenette/full-size-v2", "validation", 10),
        ("imagenet2012", "validation", 1000),
        ("caltech101", "test", 102),
        ("oxford_flowers102", "test", 102)]


def _cfg(name, eval_split, **overrides):
  c = ml_collections.ConfigDict(dict(
      name=name, data_dir=None, train_split="train", eval_split=eval_split, num_workers=0,
      resize_short=36, crop_size=32, flip=True, color_jitter=0.1, mean=(123.68, 116.78, 103.94),
      std=(58.39, 57.12, 57.38), full_image=dict(short_side=36, buckets=((36, 36), (36, 54),
                                                                         (54, 36))),
      bad_image="skip", small_image="resize", min_size=16, decoder="tfds",
      # tfds.testing.mock_data patches TFDS classes while a source opens, which is not
      # thread-safe: read in the calling thread so grain's prefetch threads cannot race it.
      prefetch=0))
  c.update(overrides)
  return c


@pytest.mark.parametrize("name,eval_split,classes", REAL, ids=[r[0] for r in REAL])
def test_real_builders_read_through_data_source(name, eval_split, classes):
  cfg = _cfg(name, eval_split)
  with tfds.testing.mock_data(num_examples=21, policy=tfds.testing.MockPolicy.USE_CODE):
    assert data.num_classes(cfg) == classes
    assert data.num_examples(cfg, "train") == 21
    source = sources.open_source(cfg, "train")
    assert (source.image_key, source.label_key) == ("image", "label")

    it = data.train_iterator(cfg, batch_size=4, image_size=28, epoch=0, seed=0)
    assert len(it) == 5 == data.steps_per_epoch(cfg, 4)
    batch = next(it)
    assert batch["image"].shape == (4, 28, 28, 3) and np.isfinite(batch["image"]).all()
    assert ((0 <= batch["label"]) & (batch["label"] < classes)).all()
    rows = it._plan.indices[0]
    np.testing.assert_array_equal(batch["label"], [int(source.read_one(int(i))["label"])
                                                   for i in rows])

    full = data.train_iterator(cfg, batch_size=4, image_size=32, epoch=0, seed=0,
                               mode="full_image")
    fb = next(full)
    assert fb["image"].shape[1:3] in {(36, 36), (36, 54), (54, 36)}
    assert (fb["image_size"] <= fb["image"].shape[1:3]).all()

    for view in (dict(kind="center", size=32), dict(kind="full"), dict(kind="ten_view")):
      batches = list(data.eval_iterator(cfg, view, batch_size=8))
      assert sum(b["mask"].sum() for b in batches) == 21
      assert all(np.isfinite(b["image"]).all() for b in batches)


def test_unprepared_data_set_names_the_prepare_command(tmp_path):
  cfg = _cfg("oxford_flowers102", "test", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="oxford_flowers102 split 'train' is not prepared in") as e:
    data.num_examples(cfg, "train")
  assert e.value.hint == (f"prepare it once with: python -m spp_jax.data.prepare --dataset "
                          f"oxford_flowers102 --data_dir {tmp_path}")


def test_mocked_split_is_shared_between_processes():
  cfg = _cfg("imagenette/full-size-v2", "validation")
  with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
    labels = []
    for p in range(3):
      it = data.eval_iterator(cfg, dict(kind="center", size=32), batch_size=4, process_index=p,
                              process_count=3)
      assert len(it) == 3
      labels += list(itertools.chain.from_iterable(
          b["label"][b["mask"] > 0].tolist() for b in it))
    source = sources.open_source(cfg, "validation")
    assert sorted(labels) == sorted(int(source.read_one(i)["label"]) for i in range(30))
