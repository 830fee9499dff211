"""The idx reader and the drawing of the multi-scale Fashion-MNIST examples (no TFDS here)."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest

from spp_jax.data import idx, synth

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not idx.has_fashion_mnist(FMNIST_DIR),
                                  reason="Fashion-MNIST idx files not installed (make data)")


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
  """Writes the idx format plainly: magic, big-endian dims, big-endian data."""
  header = bytes([0, 0, type_code, array.ndim])
  dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C),
                                        (np.float32, 0x0D), (np.float64, 0x0E)])
def test_parse_idx_round_trip(rng, dtype, code):
  a = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
  out = idx.parse_idx(_idx_bytes(a, code))
  assert out.dtype == np.dtype(dtype) and out.shape == a.shape
  np.testing.assert_array_equal(out, a)


def test_read_idx_gz_and_plain(tmp_path, rng):
  a = rng.integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
  (tmp_path / "x-idx3-ubyte").write_bytes(_idx_bytes(a, 0x08))
  (tmp_path / "y-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(a, 0x08)))
  np.testing.assert_array_equal(idx.read_idx(tmp_path / "x-idx3-ubyte"), a)
  np.testing.assert_array_equal(idx.read_idx(tmp_path / "y-idx3-ubyte.gz"), a)


def test_parse_idx_rejects_bad_files():
  with pytest.raises(ValueError, match="magic"):
    idx.parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="unknown idx data type"):
    idx.parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
  with pytest.raises(ValueError, match="expected 10 bytes"):  # header 8 + 2 data, got 1
    idx.parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x02\x00")


def test_load_split_names_missing_files(tmp_path):
  assert not idx.has_fashion_mnist(tmp_path)
  with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
    idx.load_split(tmp_path, "train")
  with pytest.raises(ValueError, match="split"):
    idx.load_split(tmp_path, "validation")


@needs_fmnist
def test_real_fashion_mnist_files():
  images, labels = idx.load_split(FMNIST_DIR, "test")
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


# ----------------------------------------------------------------------------- drawing


def _items(rng, n=20):
  """Fake 28x28 items: a bright blob with a dark margin, like Fashion-MNIST."""
  items = np.zeros((n, 28, 28), np.uint8)
  for k in range(n):
    t, l = rng.integers(2, 8, size=2)
    b, r = rng.integers(20, 26, size=2)
    items[k, t:b, l:r] = rng.integers(120, 256)
  return items, np.arange(n) % 10


def test_interp_matrix_matches_plain_bilinear():
  # Plain reference: output i samples c = (i + .5) * n_in / n_out - .5 with a triangle of
  # half-width max(1, scale), normalised.
  for n_out, n_in in [(7, 3), (3, 7), (28, 28), (45, 28), (5, 20)]:
    scale = n_in / n_out
    support = max(1.0, scale)
    ref = np.zeros((n_out, n_in))
    for i in range(n_out):
      c = (i + 0.5) * scale - 0.5
      for j in range(n_in):
        ref[i, j] = max(0.0, 1 - abs(j - c) / support)
      ref[i] /= ref[i].sum()
    np.testing.assert_allclose(synth._interp_matrix(n_out, n_in), ref, rtol=1e-6, atol=1e-7)


def test_resize_identity_and_constant(rng):
  x = rng.uniform(0, 1, size=(9, 13)).astype(np.float32)
  np.testing.assert_allclose(synth.resize(x, 9, 13), x, atol=1e-6)
  c = np.full((5, 6, 3), 0.25, np.float32)
  np.testing.assert_allclose(synth.resize(c, 17, 3), 0.25, atol=1e-6)


def test_visible_box_is_tight_in_x0_y0_x1_y1():
  item = np.zeros((28, 28), np.uint8)
  item[10:18, 4:20] = 255            # rows 10..17, columns 4..19
  alpha = synth.item_alpha(item, 28)  # 28 -> 28: no resampling, opacity 0 or 1
  np.testing.assert_array_equal(synth.visible_box(alpha, 5, 7), [7 + 4, 5 + 10, 7 + 20, 5 + 18])
  item[:] = 24 * 4 // 5               # under the visibility threshold once boosted by 1.25
  assert synth.visible_box(synth.item_alpha(item, 28), 5, 7) is None


def test_tfds_bbox_order_and_inverse():
  # Box x 10..30, y 4..12 on a 20 x 40 (h x w) image -> (ymin, xmin, ymax, xmax) normalised.
  assert synth.tfds_bbox(np.array([10, 4, 30, 12], np.int32), (20, 40)) == (0.2, 0.25, 0.6, 0.75)
  boxes = np.array([[10, 4, 30, 12], [0, 0, 40, 20]], np.float32)
  bbox = np.array([synth.tfds_bbox(b, (20, 40)) for b in boxes])
  np.testing.assert_allclose(synth.from_tfds_bbox(bbox, (20, 40)), boxes, rtol=1e-6)


def test_example_is_deterministic_and_seed_dependent(rng):
  items, labels = _items(rng)
  a = synth.make_example(items, labels, 3, seed=7, split="train")
  b = synth.make_example(items, labels, 3, seed=7, split="train")
  c = synth.make_example(items, labels, 3, seed=8, split="train")
  d = synth.make_example(items, labels, 3, seed=7, split="test")
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["box"], b["box"])
  assert a["label"] == labels[3] and a["item_index"] == 3
  assert not np.array_equal(a["image"], c["image"]) or a["image"].shape != c["image"].shape
  assert not np.array_equal(a["image"], d["image"]) or a["image"].shape != d["image"].shape


def test_examples_vary_in_size_and_scale_within_bounds(rng):
  items, labels = _items(rng)
  opts = synth.SynthOptions()
  shapes, fractions = [], []
  for i in range(200):
    ex = synth.make_example(items, labels, i % len(items), seed=i, split="train", opts=opts)
    img, box = ex["image"], ex["box"]
    h, w = img.shape[:2]
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert opts.min_side <= h <= opts.max_side and opts.min_side <= w <= opts.max_side
    x0, y0, x1, y1 = box
    assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    shapes.append((h, w))
    fractions.append(max(y1 - y0, x1 - x0) / min(h, w))
  shapes = np.array(shapes)
  aspect = shapes[:, 0] / shapes[:, 1]
  assert shapes.min() < 60 and shapes.max() > 130  # sizes really vary
  assert aspect.min() < 0.6 and aspect.max() > 1.6  # so do aspect ratios
  assert min(fractions) < 0.35 and max(fractions) > 0.7  # and the item's scale


def test_item_is_inside_its_box(rng):
  """The item is drawn with its grey levels as opacity: away from the box, the canvas does
  not change when the item is blanked; inside, it does."""
  items, labels = _items(rng)
  ex = synth.make_example(items, labels, 5, seed=3, split="train")
  blank = items.copy()
  blank[5] = 0
  ref = synth.make_example(blank, labels, 5, seed=3, split="train")
  diff = np.abs(ex["image"].astype(int) - ref["image"].astype(int)).max(axis=2) > 2
  x0, y0, x1, y1 = ex["box"]
  outside = diff.copy()
  outside[y0:y1, x0:x1] = False
  assert diff[y0:y1, x0:x1].any()
  assert not outside.any()


def test_png_round_trip(rng):
  from PIL import Image
  img = rng.integers(0, 256, size=(33, 47, 3)).astype(np.uint8)
  data = synth.encode_png(img)
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), img)


def test_options_are_checked():
  with pytest.raises(ValueError, match="min_side"):
    synth.SynthOptions(min_side=100, max_side=50)
  with pytest.raises(ValueError, match="item_fraction"):
    synth.SynthOptions(item_fraction=(0.5, 1.5))
  with pytest.raises(ValueError, match="num_fragments"):
    synth.SynthOptions(num_fragments=(0, 9))
  with pytest.raises(ValueError, match="split"):
    synth.example_rng(0, "validation", 0)


@needs_fmnist
def test_clutter_comes_from_fragments_of_other_items():
  """With the same generator, drawing with and without fragment items differs away from the
  item: the clutter is made of the other items."""
  images, _ = idx.load_split(FMNIST_DIR, "test")
  cluttered = 0
  for seed in range(10):
    a, box = synth.compose(images[0], images[1:6], synth.example_rng(seed, "test", 0))
    b, box_b = synth.compose(images[0], images[:0], synth.example_rng(seed, "test", 0))
    np.testing.assert_array_equal(box, box_b)
    diff = np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 2
    x0, y0, x1, y1 = box
    diff[y0:y1, x0:x1] = False
    cluttered += bool(diff.any())
  assert cluttered >= 8
