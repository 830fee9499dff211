"""Image transforms of the training and testing protocols (docs/paper.md §3, §4), numpy + Pillow.

Pure functions on one image: uint8 (H, W, 3) arrays while the geometry changes (Pillow resizes
uint8 fast), float32 once colours change. backend="opencv" (data.decoder = "opencv", OpenCV
from the detection extra) decodes with libjpeg-turbo straight to a numpy array (the same pixels
as Pillow) and resamples with OpenCV: bilinear when enlarging or shrinking by less than 2x
(2x2 taps: not antialiased, the small aliasing of TF-style bilinear crops), area averaging when
shrinking by 2x or more (antialiased); a fractional crop box is rounded to whole source pixels (costs: experiments/benchmarks/input_pipeline.py --jpeg).
Randomness comes in as a `np.random.Generator`, so a caller that seeds it from (seed, epoch,
position) gets the same augmentation in any process.
Sizes are (height, width) everywhere; Pillow's (width, height) stays inside this module.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# The 10 views of docs/paper.md §4: centre and four corners, then the same five flipped.
TEN_VIEW_CORNERS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


# ----------------------------------------------------------------------------- decoding


def decode_image(data, *, draft_short_side: int | None = None) -> np.ndarray:
  """Decodes encoded bytes with Pillow (or passes a decoded array through) to uint8 RGB.

  Args:
    data: encoded image bytes (JPEG, PNG, ... anything Pillow reads) or a decoded array
      (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
    draft_short_side: if given, JPEG decoding may use DCT scaling down to the smallest
      power-of-two reduction whose short side stays >= this (Pillow's `draft`): much faster for
      large photos that are resized down anyway.

  Returns:
    (H, W, 3) uint8. Raises whatever Pillow raises for undecodable bytes (the caller decides
    whether to skip or stop).
  """
  if isinstance(data, np.ndarray):
    return to_rgb(data)
  return np.asarray(decode_pil(data, draft_short_side=draft_short_side))


def decode_pil(data, *, draft_short_side: int | None = None) -> Image.Image:
  """Like `decode_image` but returns a loaded RGB `PIL.Image` (arrays are converted)."""
  if isinstance(data, np.ndarray):
    return Image.fromarray(to_rgb(data))
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise ValueError(f"image must be encoded bytes or a numpy array, got {type(data).__name__}")
  img = Image.open(io.BytesIO(data))
  if draft_short_side is not None and img.format == "JPEG":
    w, h = img.size
    scale = draft_short_side / max(min(h, w), 1)
    if scale < 1:
      img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
  if img.mode != "RGB":
    img = img.convert("RGB")
  img.load()  # decode now: errors belong to this example
  return img


def decode_cv2(data, *, draft_short_side: int | None = None) -> np.ndarray:
  """`decode_image` with OpenCV: (H, W, 3) uint8 RGB, JPEG reduced exactly as Pillow's draft
  reduces it (EXIF orientation ignored, as Pillow does)."""
  import cv2
  if isinstance(data, np.ndarray):
    return to_rgb(data)
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise ValueError(f"image must be encoded bytes or a numpy array, got {type(data).__name__}")
  flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
  if draft_short_side is not None and bytes(data[:2]) == b"\xff\xd8":  # JPEG
    h, w = image_size_of(bytes(data))
    scale = draft_short_side / max(min(h, w), 1)
    if scale < 1:  # Pillow's rule: the largest of 1/8, 1/4, 1/2 keeping the requested size
      k = min(w // math.ceil(w * scale), h // math.ceil(h * scale))
      reduced = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 2: cv2.IMREAD_REDUCED_COLOR_2}
      for s in (8, 4, 2):
        if k >= s:
          flags |= reduced[s] & ~cv2.IMREAD_COLOR
          break
  out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  if out is None:
    raise ValueError("OpenCV cannot decode the image")
  return out


def to_rgb(array: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W, 3) uint8 (alpha dropped)."""
  a = np.asarray(array)
  if a.ndim == 2:
    a = a[:, :, None]
  if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or min(a.shape[:2]) < 1:
    raise ValueError(f"an image must be (H, W[, 1|3|4]), got shape {a.shape}")
  if a.dtype != np.uint8:
    a = np.clip(a, 0, 255).astype(np.uint8)
  if a.shape[2] == 1:
    return np.repeat(a, 3, axis=2)
  return a[:, :, :3]


def image_size_of(data) -> tuple[int, int]:
  """(height, width) of encoded bytes (header only, no decoding) or of an array."""
  if isinstance(data, np.ndarray):
    return int(data.shape[0]), int(data.shape[1])
  w, h = Image.open(io.BytesIO(data)).size
  return int(h), int(w)


# ----------------------------------------------------------------------------- geometry


def _cv2_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  import cv2
  h, w = size
  if image.shape[:2] == (h, w):
    return image
  far = h * 2 <= image.shape[0] and w * 2 <= image.shape[1]  # area filter from 2x down
  return cv2.resize(np.ascontiguousarray(image), (w, h),
                    interpolation=cv2.INTER_AREA if far else cv2.INTER_LINEAR)


def resize(image, size: tuple[int, int], backend: str = "pillow") -> np.ndarray:
  """Bilinear resize of uint8 (H, W, 3) (or a PIL image) to size = (h, w), antialiased when
  shrinking (backend="opencv": see the module doc)."""
  h, w = int(size[0]), int(size[1])
  if h < 1 or w < 1:
    raise ValueError(f"size must be positive, got size={size}")
  if backend == "opencv":
    return _cv2_resize(np.asarray(image), (h, w))
  if isinstance(image, Image.Image):
    return np.asarray(image if image.size == (w, h) else image.resize((w, h), Image.BILINEAR))
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resized_crop(image, box: tuple[float, float, float, float], size: tuple[int, int],
                 backend: str = "pillow") -> np.ndarray:
  """The region box = (top, left, height, width) of image (source pixels, fractional ok)
  resampled to size = (h, w) in one bilinear pass (what resizing the whole image and then
  cropping gives, without resizing the rest)."""
  top, left, bh, bw = box
  if (bh, bw) == tuple(size) and float(top).is_integer() and float(left).is_integer():
    # Scale 1 on the pixel grid (e.g. storage pre-resized to the training short side):
    # bilinear weights are 0 and 1, so the resample is exactly a crop.
    t, l, h, w = int(top), int(left), int(bh), int(bw)
    if isinstance(image, Image.Image):
      return np.asarray(image.crop((l, t, l + w, t + h)))
    return image[t:t + h, l:l + w]
  if backend == "opencv":
    a = np.asarray(image)
    t0, l0 = round(top), round(left)
    t1, l1 = max(t0 + 1, round(top + bh)), max(l0 + 1, round(left + bw))
    return _cv2_resize(a[t0:t1, l0:l1], (int(size[0]), int(size[1])))
  pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
  out = pil.resize((int(size[1]), int(size[0])), Image.BILINEAR,
                   box=(left, top, left + bw, top + bh))
  return np.asarray(out)


def image_hw(image) -> tuple[int, int]:
  """(height, width) of an array or a PIL image."""
  if isinstance(image, Image.Image):
    return image.size[1], image.size[0]
  return int(image.shape[0]), int(image.shape[1])


def short_side_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
  """(h, w) scaled so that min(h, w) == short_side, aspect ratio kept (long side rounded)."""
  h, w = int(size[0]), int(size[1])
  if short_side < 1:
    raise ValueError(f"short_side must be >= 1, got short_side={short_side}")
  if h <= w:
    return short_side, max(short_side, round(w * short_side / h))
  return max(short_side, round(h * short_side / w)), short_side


def resize_short_side(image, short_side: int, backend: str = "pillow") -> np.ndarray:
  """Resizes uint8 (H, W, 3) (or a PIL image) so its short side is `short_side`, aspect kept."""
  return resize(image, short_side_size(image_hw(image), short_side), backend)


def crop(image: np.ndarray, top: int, left: int, size: tuple[int, int]) -> np.ndarray:
  """image[top:top+h, left:left+w] with bounds checked."""
  h, w = size
  H, W = image.shape[:2]
  if not (0 <= top and top + h <= H and 0 <= left and left + w <= W):
    raise ValueError(f"crop {size} at ({top}, {left}) does not fit an image of size {(H, W)}")
  return image[top:top + h, left:left + w]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A size x size crop at a uniformly random position (the image must be at least that big)."""
  H, W = image.shape[:2]
  if H < size or W < size:
    raise ValueError(f"cannot crop {size}x{size} from an image of size {(H, W)}")
  top = int(rng.integers(0, H - size + 1))
  left = int(rng.integers(0, W - size + 1))
  return image[top:top + size, left:left + size]


def corner_offsets(image_size: tuple[int, int], size: int) -> dict[str, tuple[int, int]]:
  """(top, left) of the centre and the four corner size x size crops."""
  H, W = image_size
  if H < size or W < size:
    raise ValueError(f"cannot crop {size}x{size} from an image of size {(H, W)}")
  return {
      "center": ((H - size) // 2, (W - size) // 2),
      "top_left": (0, 0),
      "top_right": (0, W - size),
      "bottom_left": (H - size, 0),
      "bottom_right": (H - size, W - size),
  }


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  top, left = corner_offsets(image.shape[:2], size)["center"]
  return image[top:top + size, left:left + size]


def ten_views(image: np.ndarray, size: int) -> list[np.ndarray]:
  """The 10-view crops (docs/paper.md §4): centre and four corners, then the same five flipped."""
  offsets = corner_offsets(image.shape[:2], size)
  views = [crop(image, *offsets[name], (size, size)) for name in TEN_VIEW_CORNERS]
  return views + [v[:, ::-1] for v in views]


def flip_left_right(image: np.ndarray) -> np.ndarray:
  return image[:, ::-1]


# ----------------------------------------------------------------------------- buckets


def choose_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
  """Index of the padded shape for an image of size (h, w).

  The smallest bucket (by area, then by position) that holds the image; if none does, the one
  whose aspect ratio is closest to the image's (the image is then shrunk to fit, see
  `fit_to_bucket`).
  """
  h, w = size
  holding = [k for k, (bh, bw) in enumerate(buckets) if bh >= h and bw >= w]
  if holding:
    return min(holding, key=lambda k: (buckets[k][0] * buckets[k][1], k))
  log_aspect = math.log(h / w)
  return min(range(len(buckets)),
             key=lambda k: (abs(math.log(buckets[k][0] / buckets[k][1]) - log_aspect),
                            -buckets[k][0] * buckets[k][1], k))


def fit_to_bucket(size: tuple[int, int], bucket: tuple[int, int], min_size: int = 1
                  ) -> tuple[int, int]:
  """Size (h, w) shrunk (aspect ratio kept) to fit inside bucket, and at least min_size a side.

  An image too elongated for both (its short side would fall below min_size) keeps min_size
  on that side and fills the bucket on the other: its aspect ratio changes.
  """
  h, w = size
  bh, bw = bucket
  if min(bh, bw) < min_size:
    raise ValueError(f"bucket {bucket} is smaller than min_size={min_size}")
  scale = min(1.0, bh / h, bw / w)
  nh, nw = min(bh, max(1, round(h * scale))), min(bw, max(1, round(w * scale)))
  return max(nh, min_size), max(nw, min_size)


def scale_buckets(buckets: Sequence[tuple[int, int]], base_short_side: int, short_side: int
                  ) -> tuple[tuple[int, int], ...]:
  """Buckets for another short side: the smallest shapes that hold, at short_side, every image
  that bucket holds at base_short_side.

  A side of length b at the base holds images whose exact length is below b + 1/2 (lengths
  are rounded); scaled by r = short_side / base_short_side they stay below (b + 1/2) r, so
  rounded they are at most ceil((b + 1/2) r - 1/2). For r = 1 that is b itself.
  """
  r = short_side / base_short_side
  return tuple((math.ceil((bh + 0.5) * r - 0.5 - 1e-9), math.ceil((bw + 0.5) * r - 0.5 - 1e-9))
               for bh, bw in buckets)


# ----------------------------------------------------------------------------- colour


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
  """Random brightness, contrast and saturation, each a factor in [1 - s, 1 + s].

  image: (H, W, 3) float32 at pixel scale 0..255; returns a new float32 array (not clipped:
  the network sees the altered values, as with AlexNet-style colour alteration).
  """
  if strength <= 0:
    return image
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
  gray = image @ _LUMA  # (H, W)
  out = image * b
  gray = gray * b
  mean = gray.mean()
  out = mean + (out - mean) * c
  gray = mean + (gray - mean) * c
  return gray[:, :, None] + (out - gray[:, :, None]) * s


_LUMA_ROWS = np.outer(_LUMA.astype(np.float64), np.ones(3))  # (x @ _LUMA_ROWS)[j] = luma


def jitter_factors(strength: float, rng: np.random.Generator) -> np.ndarray:
  """(3,) brightness, contrast, saturation factors, drawn exactly as `color_jitter` draws them."""
  return rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32).astype(np.float64)


def apply_colors(images: np.ndarray, factors: np.ndarray | None, mean: np.ndarray,
                 std: np.ndarray) -> np.ndarray:
  """`color_jitter` then `normalize` for a stack of images, as one affine map per image.

  Brightness b, contrast c and saturation s are linear in the pixel, so with luma weights w
  and an image's mean luma m = b * (channel means @ w) the jittered pixel is x @ M + o with
    M = c b (s I + (1 - s) w^T 1),  o = m (1 - c) 1;
  normalising divides by std and subtracts mean / std. One batched matrix product for all.

  Args:
    images: (B, H, W, 3) uint8 or float, pixel scale 0..255.
    factors: (B, 3) from `jitter_factors`, or None for no colour alteration.
    mean, std: (3,).
  Returns:
    (B, H, W, 3) float32.
  """
  b_, h, w = images.shape[:3]
  flat = images.reshape(b_, h * w, 3).astype(np.float32)
  inv = 1.0 / np.asarray(std, np.float64)
  mean = np.asarray(mean, np.float64)
  if factors is None:
    return ((flat - mean.astype(np.float32)) * inv.astype(np.float32)).reshape(images.shape)
  b, c, s = (np.asarray(factors, np.float64)[:, k] for k in range(3))
  channel_means = (np.ones((h * w,), np.float32) @ flat).astype(np.float64) / (h * w)  # (B, 3)
  m = b * (channel_means @ _LUMA.astype(np.float64))
  matrix = (c * b * (1 - s))[:, None, None] * _LUMA_ROWS + (c * b * s)[:, None, None] * np.eye(3)
  matrix = (matrix * inv).astype(np.float32)
  offset = (((m * (1 - c))[:, None] - mean) * inv).astype(np.float32)
  return (flat @ matrix + offset[:, None, :]).reshape(images.shape)


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(image - mean) / std per channel, float32."""
  return (image.astype(np.float32) - mean) / std
