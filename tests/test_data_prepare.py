"""`python -m spp_jax.data.prepare`: TFDS's real builders prepared as array_record without
TensorFlow, on local stand-ins for the downloads (no network here)."""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from spp_jax import data
from spp_jax.data import prepare, sources, transforms


def test_tensorflow_is_not_installed():
  assert importlib.util.find_spec("tensorflow") is None


def _jpeg(rng, h, w, mode="RGB"):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)).convert(mode).save(
      buf, format="JPEG")
  return buf.getvalue()


def test_extraction_works_without_tensorflow(tmp_path, rng):
  tgz = tmp_path / "archive.tgz"
  payload = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(10))}
  with tarfile.open(tgz, "w:gz") as tar:
    for name, content in payload.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  manager = tfds.download.DownloadManager(download_dir=str(tmp_path / "downloads"))
  with prepare.tf_free():
    out = manager.extract(str(tgz))
  for name, content in payload.items():
    assert (out / name).read_bytes() == content


def _fake_imagenette(tmp_path, rng):
  """The real imagenette builder on a fake extracted archive (two classes, a CMYK-free set of
  JPEGs of varied sizes), prepared as array_record. Returns (builder, data_dir, originals)."""
  root = tmp_path / "extracted"
  expected = {}
  for split, n in (("train", 6), ("val", 3)):
    for label in ("n01440764", "n02102040"):
      folder = root / "imagenette2" / split / label
      folder.mkdir(parents=True)
      for i in range(n):
        data_bytes = _jpeg(rng, 30 + 7 * i, 40 + 5 * i)
        (folder / f"{label}_{i}.JPEG").write_bytes(data_bytes)
        expected[(split, label, i)] = data_bytes
  data_dir = tmp_path / "tfds"
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         return_value=str(root)):
    builder = prepare.prepare("imagenette/full-size-v2", str(data_dir))
  return builder, data_dir, expected


def test_imagenette_prepared_and_read_without_tensorflow(tmp_path, rng):
  """Written as array_record and read back by the pipeline."""
  builder, data_dir, expected = _fake_imagenette(tmp_path, rng)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 12,
                                                                          "validation": 6}
  files = [p.name for p in builder.data_path.iterdir()]
  assert any(f.startswith("imagenette-train.array_record") for f in files)

  cfg = ml_collections.ConfigDict(dict(
      name="imagenette/full-size-v2", data_dir=str(data_dir), train_split="train",
      eval_split="validation", resize_short=36, crop_size=32, min_size=16,
      full_image=dict(short_side=36, buckets=((36, 36), (36, 54)))))
  assert data.num_classes(cfg) == 10 and data.num_examples(cfg, "validation") == 6
  source = sources.open_source(cfg, "validation")
  names = builder.info.features["label"].names
  originals = sorted(v for (split, _, _), v in expected.items() if split == "val")
  stored = sorted(source.read_one(i)["image"] for i in range(6))
  assert stored == originals  # the JPEG bytes are stored as they were
  for i in range(6):
    record = source.read_one(i)
    assert names[record["label"]] in ("n01440764", "n02102040")
    assert transforms.decode_image(record["image"]).ndim == 3
  batches = list(data.eval_iterator(cfg, dict(kind="full"), batch_size=4))
  assert sum(b["mask"].sum() for b in batches) == 6


def test_max_short_side_stores_smaller_images_for_the_chosen_splits(tmp_path, rng, capsys):
  """`prepare --max_short_side 36 --splits train`: training images larger than 36 on the short
  side are re-encoded at 36 (aspect kept), smaller ones and the validation split keep their
  bytes, labels and counts are unchanged, and the pipeline reads the copy."""
  _, data_dir, _ = _fake_imagenette(tmp_path, rng)
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         side_effect=AssertionError("already prepared")):
    assert prepare.main(["--dataset", "imagenette/full-size-v2", "--data_dir", str(data_dir),
                         "--max_short_side", "36", "--splits", "train"]) == 0
  resized = f"{data_dir}-max36"
  assert f"data.data_dir = {resized!r}" in capsys.readouterr().out

  def cfg(d):
    return dict(name="imagenette/full-size-v2", data_dir=str(d), eval_split="validation")
  for split in ("train", "validation"):
    old, new = sources.open_source(cfg(data_dir), split), sources.open_source(cfg(resized), split)
    assert len(old) == len(new) == {"train": 12, "validation": 6}[split]
    for i in range(len(old)):
      a, b = old.read_one(i), new.read_one(i)
      assert a["label"] == b["label"]
      (h, w) = transforms.image_size_of(a["image"])
      (nh, nw) = transforms.image_size_of(b["image"])
      if split == "validation" or min(h, w) <= 36:
        assert a["image"] == b["image"]
      else:
        assert min(nh, nw) == 36 and abs(nw / nh - w / h) < 0.05
        big = transforms.resize(transforms.decode_image(a["image"]), (nh, nw)).astype(float)
        assert np.abs(transforms.decode_image(b["image"]) - big).mean() < 20  # same picture
  assert data.num_examples(cfg(resized), "train") == 12
  batch = next(iter(data.train_iterator(dict(cfg(resized), resize_short=36, crop_size=32),
                                        batch_size=4, image_size=32, epoch=0, seed=0)))
  assert batch["image"].shape == (4, 32, 32, 3)
  with pytest.raises(ValueError, match="max_short_side"):
    prepare.prepare_resized("imagenette/full-size-v2", str(data_dir), 0)


def test_shrink_encoded_keeps_small_images_and_the_format(rng):
  png = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size=(50, 80, 3)).astype(np.uint8)).save(png, "PNG")
  out = Image.open(io.BytesIO(prepare.shrink_encoded(png.getvalue(), 40)))
  assert out.format == "PNG" and out.size == (64, 40)
  assert prepare.shrink_encoded(png.getvalue(), 50) == png.getvalue()
  jpeg = _jpeg(rng, 300, 200)
  out = Image.open(io.BytesIO(prepare.shrink_encoded(jpeg, 100, quality=80)))
  assert out.format == "JPEG" and out.size == (100, 150)


def test_imagenet_image_fixes_use_pillow(rng):
  cmyk = _jpeg(rng, 12, 16, mode="CMYK")
  with prepare.tf_free():
    fixed = tfds.core.utils.jpeg_cmyk_to_rgb(cmyk)
  assert Image.open(io.BytesIO(fixed)).mode == "RGB"


def test_prepare_command_builds_the_embedded_tiny_set(tmp_path, capsys):
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST idx files not installed (make data)")
  assert prepare.main(["--dataset", "multiscale_fashion_mnist/tiny",
                       "--data_dir", str(tmp_path)]) == 0
  assert "'train': 512" in capsys.readouterr().out


def test_embedded_set_falls_back_to_the_download_manager(tmp_path, monkeypatch):
  """Without a source dir or Debian's files, the idx files come through dl_manager.download
  (here answered with local copies: no network)."""
  from spp_jax.data import idx
  from spp_jax.data import multiscale_fashion_mnist as mfm
  if not idx.has_fashion_mnist(mfm.DEFAULT_SOURCE_DIR):
    pytest.skip("Fashion-MNIST idx files not installed (make data)")
  asked = {}
  real_dir = mfm.DEFAULT_SOURCE_DIR

  def fake_download(self, urls):
    asked.update(urls)
    return {k: idx.find_idx_file(real_dir, k) for k in urls}

  monkeypatch.setattr(mfm, "DEFAULT_SOURCE_DIR", str(tmp_path / "nothing_here"))
  monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
  builder = prepare.prepare("multiscale_fashion_mnist/tiny", str(tmp_path / "tfds"))
  assert sorted(asked) == sorted(n for p in idx.FILE_NAMES.values() for n in p)
  assert all(u.startswith(mfm.OFFICIAL_URL) and u.endswith(".gz") for u in asked.values())
  assert builder.info.splits["test"].num_examples == 256


def test_source_dir_must_hold_the_idx_files(tmp_path):
  from spp_jax.data import multiscale_fashion_mnist as mfm
  with pytest.raises(ValueError, match="source_dir"):
    mfm.MultiscaleFashionMnist(config="tiny", data_dir=str(tmp_path), source_dir=str(tmp_path))
