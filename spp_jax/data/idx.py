"""Reader for the idx format of (Fashion-)MNIST, gzip-compressed or not.

The format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number `0, 0, dtype, ndim`, then
`ndim` big-endian uint32 dimensions, then the data in C order, big-endian. Fashion-MNIST uses the
same files and names as MNIST.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

# idx type byte -> numpy dtype (big-endian where it matters).
_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The four files of a (Fashion-)MNIST release: split -> (images, labels) base names.
FILE_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
  """Parses the bytes of one idx file (already decompressed).

  Args:
    data: the file's content.
    name: used in error messages.

  Returns:
    An array of the file's shape in native byte order (uint8 for images and labels).
  """
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{name} is not an idx file: bad magic number {data[:4]!r}")
  type_code, ndim = data[2], data[3]
  if type_code not in _DTYPES:
    raise ValueError(f"{name}: unknown idx data type 0x{type_code:02x}")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{name}: truncated header ({len(data)} bytes for {ndim} dimensions)")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = _DTYPES[type_code]
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"{name}: expected {expected} bytes for shape {shape} of {dtype}, "
                     f"got {len(data)}")
  array = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an idx file; `.gz` files (by name or by their gzip magic bytes) are decompressed."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  return parse_idx(data, name=path)


def find_idx_file(directory: str | os.PathLike, base_name: str) -> str | None:
  """Path of `base_name` or `base_name.gz` in `directory`, or None when neither exists."""
  for candidate in (base_name + ".gz", base_name):
    path = os.path.join(os.fspath(directory), candidate)
    if os.path.isfile(path):
      return path
  return None


def has_fashion_mnist(directory: str | os.PathLike | None) -> bool:
  """Whether `directory` holds all four idx files (compressed or not)."""
  if not directory or not os.path.isdir(directory):
    return False
  return all(find_idx_file(directory, n) for names in FILE_NAMES.values() for n in names)


def load_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Images (N, 28, 28) uint8 and labels (N,) uint8 of a split ("train" or "test")."""
  if split not in FILE_NAMES:
    raise ValueError(f"split must be one of {sorted(FILE_NAMES)}, got split={split!r}")
  paths = []
  for base in FILE_NAMES[split]:
    path = find_idx_file(directory, base)
    if path is None:
      raise ValueError(f"{base}(.gz) not found in directory={os.fspath(directory)!r}")
    paths.append(path)
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"inconsistent idx files in {os.fspath(directory)!r}: images "
                     f"{images.shape}, labels {labels.shape}")
  return images, labels
