"""One decoded image -> what the network sees: the training inputs and the test views.

Training (docs/paper.md §3): crop mode resizes the short side to data.resize_short, takes a random
crop_size crop from the whole image, flips it, resizes it to the epoch's size (multi-size
training: the same region at another resolution), alters colours and subtracts the mean.
Full-image mode resizes the short side to s (aspect ratio kept), fits the result into its
padded bucket, flips and alters colours.

Testing (docs/paper.md §4): centre crop, full image, 10-view, and multi-scale full images (one per
scale; the evaluator takes windows on their feature maps).

Every function takes the decoded image (a PIL image or uint8 (H, W, 3)); each geometric step
is one resampling from the source pixels (a crop of the resized image is resampled directly
from the source region). The `*_pixels` functions and `ten_view_canvas` stop at uint8 pixels
and leave flips, colours and normalisation to the device (data.batch_dtype = "uint8",
`on_device.py`), drawing the same random numbers in the same order; the others return float32
images already normalised (data.batch_dtype = "float32"). The network's minimum size is
guaranteed here (`SmallImage` for the "reject" policy).
"""

from __future__ import annotations

import numpy as np

from spp_jax.data import transforms
from spp_jax.data.settings import DataSettings, ViewSettings


def _backend(settings: DataSettings) -> str:
  return "opencv" if settings.decoder == "opencv" else "pillow"


class SmallImage(Exception):
  """The image is smaller than data.min_size and data.small_image is "reject"."""


def check_small(image, settings: DataSettings):
  """Applies data.small_image to an image (array or PIL) whose short side is below min_size.

  "resize": scaled up so its short side is min_size; "reject": raises SmallImage. Later steps
  resize to configured sizes, all checked to be >= min_size, so nothing smaller leaves here.
  """
  h, w = transforms.image_hw(image)
  if min(h, w) >= settings.min_size:
    return image
  if settings.small_image == "reject":
    raise SmallImage(f"image of size {(h, w)} is below data.min_size={settings.min_size}")
  return transforms.resize_short_side(image, settings.min_size, _backend(settings))


def _factors(settings: DataSettings, rng: np.random.Generator | None) -> np.ndarray | None:
  """Colour alteration factors for one training image (None: none)."""
  if rng is None or settings.color_jitter <= 0:
    return None
  return transforms.jitter_factors(settings.color_jitter, rng)


def finish(images: np.ndarray, factors: list | None, settings: DataSettings) -> np.ndarray:
  """Colour alteration and normalisation of (B, H, W, 3) images of one size, float32.

  factors: per image, an array from `transforms.jitter_factors` or None (no alteration).
  """
  if factors is None or all(f is None for f in factors):
    return transforms.apply_colors(images, None, settings.mean_array, settings.std_array)
  f = np.stack([np.ones(3) if x is None else x for x in factors])  # 1, 1, 1: identity
  return transforms.apply_colors(images, f, settings.mean_array, settings.std_array)


def _finish(image: np.ndarray, settings: DataSettings, rng: np.random.Generator | None
            ) -> np.ndarray:
  return finish(image[None], [_factors(settings, rng)], settings)[0]


def _crop_geometry(hw: tuple[int, int], short_side: int | None, crop: int
                   ) -> tuple[int, int]:
  """Size of the image the crop is taken from: short side resized (if set), at least crop."""
  size = hw if short_side is None else transforms.short_side_size(hw, short_side)
  if min(size) < crop:
    size = transforms.short_side_size(size, crop)
  return size


def _resized_crop(image, resized: tuple[int, int], top: int, left: int, crop: int,
                  out: int, backend: str = "pillow") -> np.ndarray:
  """Crop (top, left, crop) of the image resized to `resized`, resampled to out x out, in one
  pass from the source pixels."""
  h, w = transforms.image_hw(image)
  sy, sx = h / resized[0], w / resized[1]
  return transforms.resized_crop(image, (top * sy, left * sx, crop * sy, crop * sx), (out, out),
                                 backend)


def train_crop_pixels(image, settings: DataSettings, out_size: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, bool]:
  """The geometry of `train_crop`: (uint8 (S, S, 3) unflipped, whether to mirror it)."""
  image = check_small(image, settings)
  crop = settings.crop_size
  resized = _crop_geometry(transforms.image_hw(image), settings.resize_short, crop)
  top = int(rng.integers(0, resized[0] - crop + 1))
  left = int(rng.integers(0, resized[1] - crop + 1))
  out = _resized_crop(image, resized, top, left, crop, out_size, _backend(settings))
  return out, bool(settings.flip and rng.random() < 0.5)


def train_crop_uint8(image, settings: DataSettings, out_size: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray | None]:
  """The geometry of `train_crop` and its colour factors: (uint8 (S, S, 3), factors or None).
  The pipeline colours a whole batch of these in one product (`finish`)."""
  out, flip = train_crop_pixels(image, settings, out_size, rng)
  if flip:
    out = transforms.flip_left_right(out)
  return out, _factors(settings, rng)


def train_crop(image, settings: DataSettings, out_size: int, rng: np.random.Generator
               ) -> np.ndarray:
  """(out_size, out_size, 3) float32: random crop_size crop of the image resized to
  data.resize_short, flipped, resized to out_size (one resampling), colours altered."""
  out, factors = train_crop_uint8(image, settings, out_size, rng)
  return finish(out[None], [factors], settings)[0]


def full_image_pixels(image, settings: DataSettings, short_side: int, bucket: tuple[int, int],
                      rng: np.random.Generator | None = None) -> tuple[np.ndarray, bool]:
  """The geometry of `full_image`: (uint8 (h, w, 3) unflipped, whether to mirror it)."""
  image = check_small(image, settings)
  size = transforms.short_side_size(transforms.image_hw(image), short_side)
  size = transforms.fit_to_bucket(size, bucket, settings.min_size)
  out = transforms.resize(image, size, _backend(settings))
  return out, bool(rng is not None and settings.flip and rng.random() < 0.5)


def full_image(image, settings: DataSettings, short_side: int, bucket: tuple[int, int],
               rng: np.random.Generator | None = None, flip: bool = False) -> np.ndarray:
  """(h, w, 3) float32 with min(h, w) == short_side (aspect kept) fitted into bucket.

  With rng (training): random flip if data.flip, colour alteration. `flip` forces a flip.
  """
  out, drawn = full_image_pixels(image, settings, short_side, bucket, rng)
  if flip or drawn:
    out = transforms.flip_left_right(out)
  return _finish(out, settings, rng)


def eval_views(image, settings: DataSettings, view: ViewSettings,
               buckets: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
  """The V images of one evaluation view (V = view.num_views), float32.

  buckets: for "full", one padded shape; for "multiscale", one per scale (the example's bucket
  at that scale). Multiscale order: every scale, then (view.flip) every scale flipped.
  """
  image = check_small(image, settings)
  if view.kind == "center":
    resized = _crop_geometry(transforms.image_hw(image), view.short_side, view.size)
    top, left = transforms.corner_offsets(resized, view.size)["center"]
    return [_finish(_resized_crop(image, resized, top, left, view.size, view.size,
                                  _backend(settings)), settings, None)]
  if view.kind == "ten_view":
    resized = _crop_geometry(transforms.image_hw(image), view.short_side, view.size)
    whole = transforms.resize(image, resized, _backend(settings))
    return list(finish(np.stack(transforms.ten_views(whole, view.size)), None, settings))
  if view.kind == "full":
    return [full_image(image, settings, view.short_side, buckets[0])]
  out = [full_image(image, settings, s, b) for s, b in zip(view.scales, buckets)]
  if view.flip:
    out += [o[:, ::-1] for o in out]
  return out


def eval_pixels(image, settings: DataSettings, view: ViewSettings,
                buckets: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
  """uint8 images of a "center", "full" or "multiscale" view; multiscale: one per scale (the
  device appends the mirrored ones)."""
  image = check_small(image, settings)
  if view.kind == "center":
    resized = _crop_geometry(transforms.image_hw(image), view.short_side, view.size)
    top, left = transforms.corner_offsets(resized, view.size)["center"]
    return [_resized_crop(image, resized, top, left, view.size, view.size, _backend(settings))]
  if view.kind == "ten_view":
    raise ValueError("ten_view images travel as a canvas: use ten_view_canvas")
  scales = (view.short_side,) if view.kind == "full" else view.scales
  return [full_image_pixels(image, settings, sc, b)[0] for sc, b in zip(scales, buckets)]


def ten_view_canvas_shape(view: ViewSettings) -> tuple[int, int]:
  """(Hc, Wc) that holds every image's ten-view bands: short side first, at most 3 crops."""
  cap = 3 * view.size
  return (cap if view.short_side is None else min(view.short_side, cap)), cap


def _bands(length: int, size: int, cap: int) -> np.ndarray | None:
  """Indices along one axis that the 10 crops read, when the axis is longer than cap (None:
  keep it whole). The crops start at 0, (length - size) // 2 and length - size."""
  if length <= cap:
    return None
  starts = (0, (length - size) // 2, length - size)
  return np.unique(np.concatenate([np.arange(s, s + size) for s in starts]))


def ten_view_canvas(image, settings: DataSettings, view: ViewSettings
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
  """The resized image of a ten_view, laid out for `on_device.ten_view_crops`.

  Returns (pixels (h, w, 3) uint8 with h <= Hc and w <= Wc of `ten_view_canvas_shape`,
  offsets (5, 2) int32 (top, left) of the centre and corner crops in it, transposed): a
  portrait image is stored transposed (so one canvas shape holds both orientations), and an
  axis longer than the canvas keeps only the bands the crops read. The crops cut there equal
  `transforms.ten_views` of the resized image.
  """
  image = check_small(image, settings)
  resized = _crop_geometry(transforms.image_hw(image), view.short_side, view.size)
  whole = transforms.resize(image, resized, _backend(settings))
  offsets = transforms.corner_offsets(resized, view.size)
  offsets = np.array([offsets[name] for name in transforms.TEN_VIEW_CORNERS], np.int64)
  transposed = resized[0] > resized[1]
  if transposed:
    whole, offsets = whole.transpose(1, 0, 2), offsets[:, ::-1]
  hc, wc = ten_view_canvas_shape(view)
  rows = _bands(whole.shape[0], view.size, hc)
  cols = _bands(whole.shape[1], view.size, wc)
  if rows is not None:
    whole, offsets[:, 0] = whole[rows], np.searchsorted(rows, offsets[:, 0])
  if cols is not None:
    whole, offsets[:, 1] = whole[:, cols], np.searchsorted(cols, offsets[:, 1])
  return whole, offsets.astype(np.int32), bool(transposed)
