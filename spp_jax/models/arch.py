"""Architectures as data: layer specs, width scaling and exact size arithmetic.

A network's conv stack is a tuple of named layer specs; everything about sizes (the last conv
map for an input size, the smallest accepted input, the total stride) is computed from that
data, for Python ints (static shapes, checked) and for int arrays (per-example sizes inside a
compiled function, unchecked).

Rounding follows Caffe: convolutions floor, max pooling ceils,
  conv: out = floor((a + 2p - k) / s) + 1
  pool: out = ceil((a + 2p - k) / s) + 1, minus one if p > 0 and the last window would start in
        the bottom/right padding.
A layer accepts an input when its window fits at least once: a + 2p >= k.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Union

_REGIONS = ("across_channels", "within_channel")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """Convolution + ReLU: `features` filters of k x k, stride s, zero padding p on every side."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0

  def __post_init__(self):
    _check_positive(self, "features", "kernel", "stride")
    _check_non_negative(self, "padding")

  def output_size(self, size):
    return conv_output_size(size, self.kernel, self.stride, self.padding)


@dataclasses.dataclass(frozen=True)
class LRNSpec:
  """Local response normalisation, Caffe convention (see functional.local_response_norm)."""
  size: int
  alpha: float
  beta: float
  k: float = 1.0
  region: str = "across_channels"

  def __post_init__(self):
    if self.size < 1 or self.size % 2 == 0:
      raise ValueError(f"LRN size must be a positive odd int, got size={self.size!r}")
    if self.region not in _REGIONS:
      raise ValueError(f"LRN region must be one of {_REGIONS}, got region={self.region!r}")

  def output_size(self, size):
    return size


@dataclasses.dataclass(frozen=True)
class PoolSpec:
  """Max pooling of `window` x `window`, stride s, Caffe (ceil) rounding, -inf padding p."""
  window: int
  stride: int
  padding: int = 0

  def __post_init__(self):
    _check_positive(self, "window", "stride")
    _check_non_negative(self, "padding")
    if self.padding >= self.window:
      raise ValueError(f"pool padding must be smaller than the window, got {self}")

  def output_size(self, size):
    return pool_output_size(size, self.window, self.stride, self.padding)


LayerSpec = Union[ConvSpec, LRNSpec, PoolSpec]


def _check_positive(spec, *names):
  for name in names:
    v = getattr(spec, name)
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{type(spec).__name__}.{name} must be a positive int, got {name}={v!r}")


def _check_non_negative(spec, *names):
  for name in names:
    v = getattr(spec, name)
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"{type(spec).__name__}.{name} must be an int >= 0, got {name}={v!r}")


# ----------------------------------------------------------------------------- arithmetic


def conv_output_size(size, kernel: int, stride: int = 1, padding: int = 0):
  """floor((size + 2p - k) / s) + 1; `size` may be an int or an int array."""
  return (size + 2 * padding - kernel) // stride + 1


def pool_output_size(size, window: int, stride: int, padding: int = 0):
  """Caffe's ceil((size + 2p - k) / s) + 1; `size` may be an int or an int array."""
  out = -((window - size - 2 * padding) // stride) + 1
  if padding:
    # Caffe drops a last window that would start inside the bottom/right padding.
    out = out - ((out - 1) * stride >= size + padding)
  return out


def _window_fits(spec: LayerSpec, size: int) -> bool:
  if isinstance(spec, LRNSpec):
    return size >= 1
  k = spec.kernel if isinstance(spec, ConvSpec) else spec.window
  return size + 2 * spec.padding >= k


# ----------------------------------------------------------------------------- architecture


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A network's conv stack and the facts that follow from it.

  Attributes:
    name: registry name.
    layers: ((layer_name, spec), ...) in order; convs are followed by a ReLU.
    base_size: the input size the network was designed for (224 for the paper's nets); the
      "fixed" head accepts only this size.
    fixed_pool: the ordinary pooling layer of the no-SPP baseline, applied to the last conv map.
    in_channels: image channels.
    defaults: per-network defaults of the model options, as ((option, value), ...).
  """
  name: str
  layers: tuple[tuple[str, LayerSpec], ...]
  base_size: int
  fixed_pool: PoolSpec
  in_channels: int = 3
  defaults: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    names = [n for n, _ in self.layers]
    if len(set(names)) != len(names):
      raise ValueError(f"layer names must be unique, got {names}")
    if not any(isinstance(s, ConvSpec) for _, s in self.layers):
      raise ValueError(f"architecture {self.name!r} has no conv layer")

  # --- widths

  def scaled(self, width_multiplier: float) -> Architecture:
    """The same network with every conv's filter count scaled (rounded, at least 1)."""
    if not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0:
      raise ValueError(f"width_multiplier must be a number > 0, got {width_multiplier!r}")
    if width_multiplier == 1:
      return self
    layers = tuple(
        (n, dataclasses.replace(s, features=max(1, int(round(s.features * width_multiplier))))
         if isinstance(s, ConvSpec) else s) for n, s in self.layers)
    return dataclasses.replace(self, layers=layers)

  @property
  def out_channels(self) -> int:
    """Channels of the last conv map."""
    return [s for _, s in self.layers if isinstance(s, ConvSpec)][-1].features

  # --- sizes

  @property
  def feature_stride(self) -> int:
    """Product of all strides: one step on the last conv map in input pixels."""
    return math.prod(s.stride for _, s in self.layers if not isinstance(s, LRNSpec))

  def layer_sizes(self, size: int) -> list[tuple[str, int]]:
    """Output size of every layer along one axis; ValueError if some window does not fit."""
    _check_size(size, "size")
    out = []
    for name, spec in self.layers:
      if not _window_fits(spec, size):
        raise ValueError(
            f"input size {size} is too small for {self.name}: layer {name} gets {size} cells; "
            f"the minimum input size is {self.min_input_size}")
      size = spec.output_size(size)
      out.append((name, size))
    return out

  def feature_size(self, size) -> tuple[int, int]:
    """(fh, fw) of the last conv map for an input (h, w) or a square side; ValueError if too small."""
    h, w = _pair(size)
    for axis, a in (("height", h), ("width", w)):
      if a < self.min_input_size:
        raise ValueError(f"{self.name} needs inputs of at least {self.min_input_size} pixels, "
                         f"got {axis} {a} (input size {(h, w)})")
    return self.layer_sizes(h)[-1][1], self.layer_sizes(w)[-1][1]

  def feature_sizes(self, sizes):
    """Per-example last-map sizes for an int array of input sizes (any shape); no checks."""
    for _, spec in self.layers:
      sizes = spec.output_size(sizes)
    return sizes

  @functools.cached_property
  def min_input_size(self) -> int:
    """Smallest input side for which every conv and pool window fits."""
    size = 1
    while not self._accepts(size):
      size += 1
    return size

  def _accepts(self, size: int) -> bool:
    for _, spec in self.layers:
      if not _window_fits(spec, size):
        return False
      size = spec.output_size(size)
    return size >= 1

  def fixed_map_size(self, base_size: int | None = None) -> int:
    """Side of the map the "fixed" head's pooling gives at `base_size` (default self.base_size)."""
    base = self.base_size if base_size is None else base_size
    fh, fw = self.feature_size(base)
    if not (_window_fits(self.fixed_pool, fh) and _window_fits(self.fixed_pool, fw)):
      raise ValueError(f"the fixed pooling {self.fixed_pool} does not fit the {fh}x{fw} last "
                       f"conv map of {self.name} at base_size={base}")
    return self.fixed_pool.output_size(fh)


def _check_size(size, name: str):
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f"{name} must be a positive int, got {name}={size!r}")


def _pair(size) -> tuple[int, int]:
  if isinstance(size, (tuple, list)):
    if len(size) != 2:
      raise ValueError(f"size must be an int or a pair (h, w), got size={size!r}")
    h, w = (int(v) if hasattr(v, "__index__") else v for v in size)
  else:
    h = w = int(size) if hasattr(size, "__index__") else size
  _check_size(h, "height")
  _check_size(w, "width")
  return h, w
