"""`multiscale_fashion_mnist`: the embedded data set, a TFDS builder that needs no TensorFlow.

Each example is an RGB canvas whose height and width vary (40 to 160 pixels, aspect ratios up
to 2.5:1) holding one Fashion-MNIST item, rescaled so its side spans 30-95 % of the canvas's short
side, tinted, at a random position on clutter (see `synth.py`). Train comes from the 60,000
training items, test from the 10,000 test items, example i from item i. Deterministic for the
config's seed. Written as `array_record`, in key order (no TFDS shuffling), so record i is
example i.

Source of the four idx files, first found wins: the builder's `source_dir` argument, the
download config's manual dir, Debian's `/usr/share/datasets/fashion-mnist/`
(`apt-get install dataset-fashion-mnist`), then the official URLs through the TFDS download
manager on a connected machine.

Configs: "full" (default), "small" (10,000 / 2,000), "tiny" (512 / 256, for tests); a custom
`MultiscaleFashionMnistConfig` takes other sizes, seeds and drawing options.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent import futures
import os

import numpy as np
import tensorflow_datasets as tfds

from spp_jax.data import idx, synth

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle_boot")
_CHUNK = 250  # examples per task in the generation pool


@dataclasses.dataclass(eq=False)
class MultiscaleFashionMnistConfig(tfds.core.BuilderConfig):
  """Sizes and drawing options; `None` sizes mean every item of the split."""
  num_train: int | None = None
  num_test: int | None = None
  seed: int = 0
  synth: synth.SynthOptions = dataclasses.field(default_factory=synth.SynthOptions)


class MultiscaleFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST items at varied scales and positions on cluttered canvases of varied sizes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      MultiscaleFashionMnistConfig(name="full", description="All 60,000 / 10,000 items."),
      MultiscaleFashionMnistConfig(name="small", num_train=10_000, num_test=2_000,
                                   description="The first 10,000 / 2,000 examples."),
      MultiscaleFashionMnistConfig(name="tiny", num_train=512, num_test=256,
                                   description="The first 512 / 256 examples (tests)."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: put the four Fashion-MNIST idx files (train-images-idx3-ubyte.gz, "
      "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in "
      "the manual dir. Otherwise they are read from " + DEFAULT_SOURCE_DIR + " or downloaded.")

  def __init__(self, *, source_dir: str | None = None, num_workers: int | None = None,
               **kwargs):
    """Args beyond TFDS's: the idx directory, and processes used to draw (0: in-process)."""
    if source_dir is not None and not idx.has_fashion_mnist(source_dir):
      raise ValueError(f"source_dir={source_dir!r} does not hold the four Fashion-MNIST idx "
                       f"files {sorted(n for p in idx.FILE_NAMES.values() for n in p)}(.gz)")
    if num_workers is not None and num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got num_workers={num_workers}")
    self._source_dir = source_dir
    self._num_workers = num_workers
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Encoded by `synth.encode_png` with Pillow: TFDS stores the bytes as they are.
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "bbox": tfds.features.BBoxFeature(),  # the item, (ymin, xmin, ymax, xmax) in [0, 1]
            "item_index": np.int64,  # index of the item in its Fashion-MNIST split
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _source_files(self, dl_manager) -> dict[str, str]:
    """Paths of the four idx files, from the first place that has them."""
    candidates = [self._source_dir]
    try:
      candidates.append(os.fspath(dl_manager.manual_dir))
    except (AssertionError, ValueError):  # no manual dir given or it is empty
      pass
    candidates.append(DEFAULT_SOURCE_DIR)
    for directory in candidates:
      if idx.has_fashion_mnist(directory):
        return {base: idx.find_idx_file(directory, base)
                for names in idx.FILE_NAMES.values() for base in names}
    urls = {base: OFFICIAL_URL + base + ".gz"
            for names in idx.FILE_NAMES.values() for base in names}
    return {k: os.fspath(v) for k, v in dl_manager.download(urls).items()}

  def _split_generators(self, dl_manager):
    files = self._source_files(dl_manager)
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "test": cfg.num_test}
    return {split: self._generate_examples(files[img], files[lab], split, sizes[split])
            for split, (img, lab) in idx.FILE_NAMES.items()}

  def _generate_examples(self, images_path: str, labels_path: str, split: str,
                         num: int | None):
    images, labels = idx.read_idx(images_path), idx.read_idx(labels_path)
    if num is not None:
      if not 0 < num <= len(images):
        raise ValueError(f"config asks for {num} {split} examples, the source has "
                         f"{len(images)}")
      # Fragments come from the subset only, so a subset is a set of its own.
      images, labels = images[:num], labels[:num]
    cfg = self.builder_config
    for item in _draw(images, labels, cfg.seed, split, cfg.synth, self._num_workers):
      i, png, label, box = item[:4]
      if len(item) == 5:  # older synth: box (ymin, xmin, ymax, xmax) in pixels, then (h, w)
        h, w = item[4]
        box = (box[0] / h, box[1] / w, box[2] / h, box[3] / w)
      yield i, {
          "image": png,
          "label": label,
          "bbox": tfds.features.BBox(ymin=box[0], xmin=box[1], ymax=box[2], xmax=box[3]),
          "item_index": i,
      }


def _draw(images: np.ndarray, labels: np.ndarray, seed: int, split: str,
          opts: synth.SynthOptions, num_workers: int | None):
  """Yields `synth.make_encoded` results in index order, drawn in `num_workers` processes."""
  if num_workers is None:
    num_workers = min(8, os.cpu_count() or 1) if len(images) >= 4 * _CHUNK else 0
  chunks = [range(s, min(s + _CHUNK, len(images))) for s in range(0, len(images), _CHUNK)]
  if num_workers == 0:
    synth.init_worker(images, labels, seed, split, opts)
    for chunk in chunks:
      yield from synth.make_encoded(chunk)
    return
  # spawn, not fork: the parent may have started JAX's threads. (As always with spawn, a
  # script that builds must do so under `if __name__ == "__main__":`.) A worker that dies
  # raises BrokenProcessPool here instead of hanging.
  with futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=synth.init_worker,
                                   initargs=(images, labels, seed, split, opts)) as pool:
    for result in pool.map(synth.make_encoded, chunks):
      yield from result
