r"""Prepares a TFDS data set as array_record, without TensorFlow.

  python -m spp_jax.data.prepare --dataset multiscale_fashion_mnist --data_dir ~/tensorflow_datasets
  python -m spp_jax.data.prepare --dataset imagenette/full-size-v2 --data_dir DIR
  python -m spp_jax.data.prepare --dataset caltech101 --data_dir DIR
  python -m spp_jax.data.prepare --dataset oxford_flowers102 --data_dir DIR
  python -m spp_jax.data.prepare --dataset imagenet2012 --data_dir DIR --manual_dir DIR_WITH_TARS

Pre-resized storage (as FFCV stores its data sets), for training speed:

  python -m spp_jax.data.prepare --dataset imagenet2012 --data_dir DIR --max_short_side 256

prepares the set in DIR if needed, then writes a copy to DIR-max256 (--resized_dir) whose
images are re-encoded no larger than 256 on the short side (smaller ones are kept byte for
byte); point data.data_dir at it. Decoding a 256-pixel image costs about half a 500x375 one,
and training at 224 crops a pre-resized image without resampling. The cost is resolution:
views that need more than N pixels on the short side (full-image or multi-scale testing at
scales above N, docs/paper.md §4) would see upsampled images. `--splits train` resizes only the
training split and copies the others unchanged, so testing still reads the original images.

A gs://bucket/... --data_dir is prepared in a local temporary directory and then copied up
file by file (array_record files cannot be written to gs:// directly; they are read from it),
dataset_info.json last, so a half-copied set never counts as prepared.

imagenette, caltech101 and oxford_flowers102 are downloaded by TFDS (a connected machine);
imagenet2012 needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in --manual_dir.
`--source_dir` points the embedded set at another directory of Fashion-MNIST idx files.

TFDS's own builders for these sets (and its archive extractor) call `tf.io.gfile` and, for
23 ImageNet files, TF's JPEG codec, although TFDS itself does not require TensorFlow. While
preparing, `tf_free()` gives exactly those modules a stand-in `tf` whose `io.gfile` is backed
by the standard library / etils.epath and converts those images with Pillow; nothing else is
patched, and reading never needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob as glob_lib
import io
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import types
from concurrent import futures
from unittest import mock

from etils import epath
from PIL import Image

from spp_jax import paths
from spp_jax.data import _tfds_compat
from spp_jax.errors import DataError

_tfds_compat.install()

import tensorflow_datasets as tfds  # noqa: E402

from spp_jax.data import multiscale_fashion_mnist, sources, transforms  # noqa: E402,F401

log = logging.getLogger(__name__)

# The data sets this project documents; any other TFDS image-classification builder whose
# code only needs tf.io.gfile works the same way.
DOCUMENTED = ("multiscale_fashion_mnist", "imagenette", "imagenet2012", "caltech101",
              "oxford_flowers102")
_DOWNLOAD_MODULES = ("tensorflow_datasets.core.download.extractor",
                     "tensorflow_datasets.core.download.downloader")


# ----------------------------------------------------------------------------- tf stand-in


def _is_local(path) -> bool:
  return "://" not in os.fspath(path)


def _listdir(path):
  return sorted(p.name for p in epath.Path(path).iterdir())


def _glob(pattern):
  pattern = os.fspath(pattern)
  if _is_local(pattern):
    return sorted(glob_lib.glob(pattern))
  parent, name = os.path.split(pattern)
  return sorted(os.fspath(p) for p in epath.Path(parent).glob(name))


def _walk(top, topdown=True, onerror=None):
  if not _is_local(top):
    raise NotImplementedError(f"tf_free walk supports local paths only, got {top!r}")
  yield from os.walk(os.fspath(top), topdown=topdown, onerror=onerror)


def _copy(src, dst, overwrite=False):
  dst = epath.Path(dst)
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} exists")
  epath.Path(src).copy(dst, overwrite=overwrite)


class _UnimplementedError(Exception):
  """Stands for tf.errors.UnimplementedError (never raised by the stand-in)."""


def _as_text(value, encoding="utf-8"):
  return value.decode(encoding) if isinstance(value, bytes) else value


def make_tf_stand_in() -> types.SimpleNamespace:
  """The part of TensorFlow's API that TFDS builders use to list, read and copy files."""
  gfile = types.SimpleNamespace(
      GFile=lambda path, mode="r": epath.Path(path).open(mode),
      exists=lambda path: epath.Path(path).exists(),
      isdir=lambda path: epath.Path(path).is_dir(),
      listdir=_listdir, glob=_glob, walk=_walk, copy=_copy,
      makedirs=lambda path: epath.Path(path).mkdir(parents=True, exist_ok=True),
      remove=lambda path: epath.Path(path).unlink(),
      rename=lambda src, dst, overwrite=False: epath.Path(src).rename(dst),
      rmtree=lambda path: shutil.rmtree(path))
  return types.SimpleNamespace(
      io=types.SimpleNamespace(gfile=gfile),
      compat=types.SimpleNamespace(as_text=_as_text),
      errors=types.SimpleNamespace(UnimplementedError=_UnimplementedError))


def _to_rgb_jpeg(image_bytes: bytes, quality: int = 100) -> bytes:
  """Pillow version of tfds.core.utils.jpeg_cmyk_to_rgb / png_to_jpeg."""
  buf = io.BytesIO()
  Image.open(io.BytesIO(image_bytes)).convert("RGB").save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


@contextlib.contextmanager
def tf_free(builder=None):
  """Lets TFDS download, extract and generate without TensorFlow (see the module doc).

  Patches the `tf` global of TFDS's download modules and of the builder's own module (and of
  modules next to it that hold a lazy `tf`), and TFDS's two TF image conversions.
  """
  names = list(_DOWNLOAD_MODULES)
  if builder is not None:
    module = type(builder).__module__
    package = module.rsplit(".", 1)[0]
    names += [m for m in list(sys.modules) if m == module or m.startswith(package + ".")]
  stand_in = make_tf_stand_in()
  with contextlib.ExitStack() as stack:
    for name in names:
      module = sys.modules.get(name)
      if module is not None and hasattr(module, "tf"):
        stack.enter_context(mock.patch.object(module, "tf", stand_in))
    stack.enter_context(mock.patch.object(tfds.core.utils, "jpeg_cmyk_to_rgb", _to_rgb_jpeg))
    stack.enter_context(mock.patch.object(tfds.core.utils, "png_to_jpeg", _to_rgb_jpeg))
    yield


# ----------------------------------------------------------------------------- preparing


def prepare(name: str, data_dir: str | None = None, *, manual_dir: str | None = None,
            download_dir: str | None = None, source_dir: str | None = None):
  """download_and_prepare(file_format="array_record") of a TFDS builder; returns the builder.

  A gs:// data_dir is prepared locally, then copied up (see the module doc).
  """
  if data_dir and paths.is_remote(data_dir):
    return _prepare_remote(name, data_dir, manual_dir=manual_dir, download_dir=download_dir,
                           source_dir=source_dir)
  kwargs = {}
  if sources.base_name(name) == sources.EMBEDDED and source_dir:
    kwargs["source_dir"] = source_dir
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record", **kwargs)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  with tf_free(builder):
    builder.download_and_prepare(download_dir=download_dir, download_config=config,
                                 file_format="array_record")
  return builder


def _prepare_remote(name: str, data_dir: str, *, source_dir: str | None = None, **kwargs):
  extra = {"source_dir": source_dir} if (
      sources.base_name(name) == sources.EMBEDDED and source_dir) else {}
  remote = tfds.builder(name, data_dir=data_dir, file_format="array_record", **extra)
  if (remote.data_path / "dataset_info.json").exists():
    return remote
  with tempfile.TemporaryDirectory(prefix="spp_jax_tfds_") as local_dir:
    log.info("preparing %s locally in %s, then copying it to %s (array_record files cannot be "
             "written to %s directly)", name, local_dir, remote.data_path, data_dir)
    local = prepare(name, local_dir, source_dir=source_dir, **kwargs)
    upload(local.data_path, remote.data_path)
  return tfds.builder(name, data_dir=data_dir, file_format="array_record", **extra)


def upload(local_dir, remote_dir) -> None:
  """Copies a prepared data set's directory to remote_dir, dataset_info.json last."""
  files = []
  for root, _, names in os.walk(os.fspath(local_dir)):
    files += [os.path.relpath(os.path.join(root, n), local_dir) for n in names]
  for rel in sorted(files, key=lambda f: (f == "dataset_info.json", f)):
    with open(os.path.join(local_dir, rel), "rb") as f:
      paths.path(os.path.join(os.fspath(remote_dir), rel)).write_bytes(f.read())


# ----------------------------------------------------------------------------- pre-resized


def shrink_encoded(data: bytes, max_short_side: int, quality: int = 90) -> bytes:
  """Encoded image re-encoded (same format) with its short side <= max_short_side, aspect
  kept; an image already small enough comes back unchanged (no second compression loss)."""
  img = Image.open(io.BytesIO(data))
  w, h = img.size
  if min(w, h) <= max_short_side:
    return data
  fmt = img.format or "PNG"
  nh, nw = transforms.short_side_size((h, w), max_short_side)
  size = (nw, nh)
  if fmt == "JPEG":  # DCT-domain reduction first, never below the target size
    img.draft(img.mode, size)
  if img.mode not in ("RGB", "L"):
    img = img.convert("RGB")
  img = img.resize(size, Image.LANCZOS)
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
  return buf.getvalue()


_SHARD = re.compile(r"\.array_record-\d+-of-\d+$")


def _split_of(file_name: str, dataset: str) -> str:
  """"imagenet2012-train.array_record-00000-of-01024" -> "train"."""
  return file_name[len(dataset) + 1:].split(".array_record")[0]


def _resize_shard(src: str, dst: str, image_key: str, max_short_side: int, quality: int) -> int:
  """Rewrites one array_record shard with its images shrunk; returns the records written."""
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2
  reader = array_record_module.ArrayRecordReader(src)
  writer = array_record_module.ArrayRecordWriter(dst, "group_size:1")  # as TFDS writes
  n = 0
  try:
    for record in reader.read_all():
      example = tf_example_pb2.Example.FromString(record)
      values = example.features.feature[image_key].bytes_list.value
      values[0] = shrink_encoded(values[0], max_short_side, quality)
      writer.write(example.SerializeToString())
      n += 1
  finally:
    reader.close()
    writer.close()
  return n


def prepare_resized(name: str, data_dir: str | None, max_short_side: int, *,
                    resized_dir: str | None = None, splits: list[str] | None = None,
                    quality: int = 90, num_workers: int = 0) -> str:
  """Writes a copy of a prepared data set with images no larger than max_short_side on the
  short side (`shrink_encoded`), in the same TFDS layout under resized_dir (default
  "<data_dir>-max<N>"); splits: the ones to resize (default all; others are copied). Returns
  resized_dir, the data_dir to read the copy from."""
  if max_short_side < 1:
    raise ValueError(f"max_short_side must be >= 1, got {max_short_side}")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  src = os.fspath(builder.data_path)
  root = os.fspath(builder._data_dir_root)  # pylint: disable=protected-access
  if not os.path.exists(os.path.join(src, "dataset_info.json")):
    raise DataError(f"{name} is not prepared in {root}",
                    hint=sources.prepare_hint(name, data_dir))
  resized_dir = resized_dir or f"{root.rstrip(os.sep)}-max{max_short_side}"
  dst = os.path.join(resized_dir, os.path.relpath(src, root))
  tmp = dst + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  image_key, _ = sources.feature_keys(builder.info)
  dataset = builder.info.name
  jobs = []
  for file_name in sorted(os.listdir(src)):
    path = os.path.join(src, file_name)
    if not os.path.isfile(path):
      continue  # e.g. the pipeline's image-size cache: made again for the new images
    if _SHARD.search(file_name) and (splits is None or _split_of(file_name, dataset) in splits):
      jobs.append((path, os.path.join(tmp, file_name), image_key, max_short_side, quality))
    else:
      shutil.copy2(path, os.path.join(tmp, file_name))
  if num_workers > 0:
    with futures.ProcessPoolExecutor(num_workers,
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
      list(pool.map(_resize_shard, *zip(*jobs)))
  else:
    for job in jobs:
      _resize_shard(*job)
  shutil.rmtree(dst, ignore_errors=True)
  os.replace(tmp, dst)
  return resized_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True,
                      help=f"TFDS name[/config], e.g. one of {', '.join(DOCUMENTED)}")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None, help="manually downloaded files")
  parser.add_argument("--download_dir", default=None, help="where downloads are kept")
  parser.add_argument("--source_dir", default=None,
                      help="multiscale_fashion_mnist: directory of the four idx files")
  parser.add_argument("--max_short_side", type=int, default=None,
                      help="also write a copy with images re-encoded no larger than this on "
                           "the short side (see the module doc)")
  parser.add_argument("--resized_dir", default=None,
                      help="data dir of the resized copy (default <data_dir>-max<N>)")
  parser.add_argument("--splits", nargs="+", default=None,
                      help="splits to resize (default all; the others are copied unchanged)")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
  parser.add_argument("--num_workers", type=int, default=0, help="processes for resizing")
  args = parser.parse_args(argv)
  if sources.base_name(args.dataset) not in DOCUMENTED:
    print(f"note: {args.dataset} is not one of the documented data sets {DOCUMENTED}; "
          f"trying anyway", file=sys.stderr)
  builder = prepare(args.dataset, args.data_dir, manual_dir=args.manual_dir,
                    download_dir=args.download_dir, source_dir=args.source_dir)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"prepared {builder.info.full_name} as array_record in {builder.data_dir}: {splits}")
  if args.max_short_side:
    out = prepare_resized(args.dataset, args.data_dir, args.max_short_side,
                          resized_dir=args.resized_dir, splits=args.splits,
                          quality=args.quality, num_workers=args.num_workers)
    print(f"images no larger than {args.max_short_side} on the short side: "
          f"data.data_dir = {out!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
