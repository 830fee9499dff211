"""TFDS data sets as random-access sources: array_record files read without TensorFlow.

`open_source` returns a `tfds.data_source`-style sequence whose image feature is left encoded
(`tfds.decode.SkipDecoding`): the pipeline decodes with Pillow itself, so an undecodable image
is one bad example, not a crashed read (`data.decoder = "opencv"` decodes and resamples with
OpenCV instead, see `transforms.py`). With `data.decoder = "tfds"` TFDS decodes (also with
Pillow when TensorFlow is absent); that mode serves sources that cannot hand out raw bytes,
e.g. `tfds.testing.mock_data`, which needs TensorFlow to encode its fake images.

The embedded `multiscale_fashion_mnist` is prepared on first use; every other data set must
have been prepared as array_record beforehand (`python -m spp_jax.data.prepare`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re

import numpy as np
import tensorflow_datasets as tfds

from spp_jax import paths
from spp_jax.data import multiscale_fashion_mnist  # noqa: F401  (registers the builder)
from spp_jax.data import transforms
from spp_jax.data.settings import DataSettings, data_settings
from spp_jax.errors import DataError

log = logging.getLogger(__name__)

EMBEDDED = "multiscale_fashion_mnist"
_SIZE_CACHE_DIR = "spp_jax"  # inside the prepared data set's directory
_READ_CHUNK = 256


def base_name(name: str) -> str:
  """"imagenette/full-size-v2:1.0.0" -> "imagenette"."""
  return name.split("/")[0].split(":")[0]


def prepare_command(name: str, data_dir: str | None, source_dir: str | None = None) -> str:
  """The command that prepares a data set, with --manual_dir when its TFDS builder needs
  manually downloaded files (imagenet2012: its tar files), or the embedded set's --source_dir."""
  out = f"python -m spp_jax.data.prepare --dataset {name}"
  out += f" --data_dir {data_dir}" if data_dir else ""
  if base_name(name) == EMBEDDED:  # built from Debian's idx files, not from a download
    return out + (f" --source_dir {source_dir}" if source_dir else "")
  try:
    manual = bool(getattr(tfds.builder_cls(base_name(name)), "MANUAL_DOWNLOAD_INSTRUCTIONS",
                          None))
  except Exception:  # noqa: BLE001 - not a TFDS builder: no manual files to name
    manual = False
  return out + (f" --manual_dir {source_dir or 'DIR_WITH_THE_DOWNLOADED_FILES'}" if manual
                else "")


def prepare_hint(name: str, data_dir: str | None, source_dir: str | None = None) -> str:
  """The hint line of every "not prepared" error."""
  return f"prepare it once with: {prepare_command(name, data_dir, source_dir)}"


def not_prepared(settings: DataSettings, what: str, where) -> DataError:
  """The one error for a data set (or split) that was not prepared, naming the command."""
  return DataError(f"{what} is not prepared in {where}",
                   hint=prepare_hint(settings.name, settings.data_dir, settings.source_dir))


def get_builder(settings: DataSettings) -> tfds.core.DatasetBuilder:
  """The TFDS builder of config.data (array_record), without preparing it."""
  kwargs = {}
  if base_name(settings.name) == EMBEDDED and settings.source_dir:
    kwargs["source_dir"] = settings.source_dir
  try:
    return tfds.builder(settings.name, data_dir=settings.data_dir, file_format="array_record",
                        **kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"data.name={settings.name!r} is not a TFDS data set: {e}") from None


def ensure_prepared(settings: DataSettings, *, process_count: int = 1
                    ) -> tfds.core.DatasetBuilder:
  """The builder, with the embedded data set prepared on first use.

  Several processes must not prepare the same directory at once: with process_count > 1 an
  unprepared embedded set is an error asking to prepare it first.
  """
  builder = get_builder(settings)
  if base_name(settings.name) == EMBEDDED and not _is_prepared(builder):
    if process_count > 1:
      raise not_prepared(settings, f"{settings.name} (before a multi-process run)",
                         builder.data_dir)
    if paths.is_remote(builder.data_dir):  # prepared locally, then copied up (data/prepare.py)
      from spp_jax.data import prepare
      return prepare.prepare(settings.name, settings.data_dir, source_dir=settings.source_dir)
    log.info("preparing %s in %s (once)", settings.name, builder.data_dir)
    builder.download_and_prepare(file_format="array_record")
  return builder


def _is_prepared(builder) -> bool:
  try:
    return (builder.data_path / "dataset_info.json").exists()
  except Exception:  # e.g. a mocked builder without a real directory
    return False


@dataclasses.dataclass
class Source:
  """An opened split: `records[i]` is a dict; `image_key`, `label_key` name its features."""
  records: object
  image_key: str
  label_key: str
  name: str
  split: str

  def __len__(self) -> int:
    return len(self.records)

  def read(self, indices) -> list:
    """Records at `indices`; on a read error the failing one raises alone (with its index).

    One by one: the data source's batched read starts a thread pool per call, which costs
    more CPU than it saves on local files (the pipeline's own workers give the parallelism).
    """
    return [self.read_one(int(i)) for i in indices]

  def read_one(self, index: int):
    try:
      return self.records[index]
    except Exception as e:  # noqa: BLE001 - reported with the example's identity
      raise ReadError(self.describe(index), e) from e

  def describe(self, index: int) -> str:
    return f"{self.name} split {self.split!r} example {index}"


class ReadError(Exception):
  """Reading or decoding one example failed; `where` names it."""

  def __init__(self, where: str, cause: BaseException):
    super().__init__(f"{where}: {type(cause).__name__}: {cause}")
    self.where = where
    self.cause = cause


def feature_keys(info: tfds.core.DatasetInfo) -> tuple[str, str]:
  """(image, label) feature names: the supervised keys, else the first Image and ClassLabel."""
  keys = info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys[0], keys[1]
  features = info.features
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if not images or not labels:
    raise ValueError(f"data set {info.name!r} has no image and class-label features: "
                     f"{list(features.keys())}")
  return images[0], labels[0]


def open_source(data_cfg, split: str, *, process_count: int = 1) -> Source:
  """Opens one split of config.data for random access (array_record, no TensorFlow)."""
  settings = data_settings(data_cfg)
  builder = ensure_prepared(settings, process_count=process_count)
  image_key, label_key = feature_keys(builder.info)
  raw = settings.decoder in ("pillow", "opencv")  # the pipeline decodes the bytes itself
  decoders = {image_key: tfds.decode.SkipDecoding()} if raw else None
  known = sorted(builder.info.splits.keys()) if _is_prepared(builder) else []
  wanted = [part.split("[")[0].strip() for part in split.split("+")]  # "train[:10%]+test"
  if known and not set(wanted) <= set(known):
    raise DataError(f"{settings.name} has no split {split!r}; its splits: {', '.join(known)}")
  try:
    records = builder.as_data_source(split=split, decoders=decoders)
  except (AssertionError, FileNotFoundError, KeyError) as e:
    raise not_prepared(settings, f"{settings.name} split {split!r}", builder.data_dir) from e
  except (NotImplementedError, ValueError) as e:
    raise DataError(f"cannot read {settings.name} split {split!r} with tfds.data_source "
                    f"({e}); it must be prepared as array_record",
                    hint=prepare_hint(settings.name, settings.data_dir, settings.source_dir)
                    ) from e
  return Source(records, image_key, label_key, settings.name, split)


def num_examples(data_cfg, split: str) -> int:
  """Examples in a split (TFDS split syntax such as "train[:10%]" works)."""
  return len(open_source(data_cfg, split))


def num_classes(data_cfg) -> int:
  settings = data_settings(data_cfg)
  builder = ensure_prepared(settings)
  _, label_key = feature_keys(builder.info)
  return int(builder.info.features[label_key].num_classes)


# ----------------------------------------------------------------------------- image sizes


def image_sizes(data_cfg, split: str, *, process_count: int = 1) -> np.ndarray:
  """(N, 2) int32 (height, width) of every image of a split, from the encoded headers.

  Full-image batches are grouped by shape before anything is decoded, so the sizes are read
  once (headers only) and cached next to the prepared files when that directory is writable.
  Undecodable headers give (0, 0): the example is then handled as a bad image when read.
  """
  settings = data_settings(data_cfg)
  source = open_source(settings, split, process_count=process_count)
  builder = get_builder(settings)
  cache = None
  if _is_prepared(builder):
    safe = re.sub(r"[^A-Za-z0-9_.%-]+", "_", split)
    cache = paths.path(builder.data_path) / _SIZE_CACHE_DIR / (
        f"image_sizes-{safe}-{len(source)}.npy")
    if cache.exists():
      sizes = np.load(io.BytesIO(cache.read_bytes()))
      if sizes.shape == (len(source), 2):
        return sizes
  sizes = np.zeros((len(source), 2), np.int32)
  for start in range(0, len(source), _READ_CHUNK):
    idx = range(start, min(start + _READ_CHUNK, len(source)))
    for i, record in zip(idx, _read_tolerant(source, idx)):
      if record is None:
        continue
      try:
        sizes[i] = transforms.image_size_of(record[source.image_key])
      except Exception:  # noqa: BLE001 - a bad image: decided when the example is read
        pass
  if cache is not None:
    try:
      cache.parent.mkdir(parents=True, exist_ok=True)
      buffer = io.BytesIO()
      np.save(buffer, sizes)
      paths.write_atomic(cache, buffer.getvalue())
    except OSError as e:
      log.info("image sizes not cached (%s)", e)
  return sizes


def _read_tolerant(source: Source, indices) -> list:
  try:
    return source.read(indices)
  except ReadError:
    out = []
    for i in indices:
      try:
        out.append(source.read_one(i))
      except ReadError:
        out.append(None)
    return out
