r"""Prepares a TFDS data set as array_record, without TensorFlow.

  python -m spp_jax.data.prepare --dataset multiscale_fashion_mnist --data_dir ~/tensorflow_datasets
  python -m spp_jax.data.prepare --dataset imagenette/full-size-v2 --data_dir DIR
  python -m spp_jax.data.prepare --dataset caltech101 --data_dir DIR
  python -m spp_jax.data.prepare --dataset oxford_flowers102 --data_dir DIR
  python -m spp_jax.data.prepare --dataset imagenet2012 --data_dir DIR --manual_dir DIR_WITH_TARS

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
import os
import shutil
import sys
import types
from unittest import mock

from etils import epath
from PIL import Image

from spp_jax.data import _tfds_compat

_tfds_compat.install()

import tensorflow_datasets as tfds  # noqa: E402

from spp_jax.data import multiscale_fashion_mnist, sources  # noqa: E402,F401

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
  """download_and_prepare(file_format="array_record") of a TFDS builder; returns the builder."""
  kwargs = {}
  if sources.base_name(name) == sources.EMBEDDED and source_dir:
    kwargs["source_dir"] = source_dir
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record", **kwargs)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  with tf_free(builder):
    builder.download_and_prepare(download_dir=download_dir, download_config=config,
                                 file_format="array_record")
  return builder


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
  args = parser.parse_args(argv)
  if sources.base_name(args.dataset) not in DOCUMENTED:
    print(f"note: {args.dataset} is not one of the documented data sets {DOCUMENTED}; "
          f"trying anyway", file=sys.stderr)
  builder = prepare(args.dataset, args.data_dir, manual_dir=args.manual_dir,
                    download_dir=args.download_dir, source_dir=args.source_dir)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"prepared {builder.info.full_name} as array_record in {builder.data_dir}: {splits}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
