"""Detection data: images with boxes, from the embedded Fashion-MNIST scenes or TFDS voc/2007.

Every split is held as `Scenes`: images (uint8, any size) with their boxes in the project's
pixel convention (x0, y0, x1, y1) continuous, ends exclusive (spp_jax.ops.boxes), class labels
0..K-1 and VOC "difficult" flags.

The embedded set ("fashion_mnist_detection") is built offline from the Fashion-MNIST idx files
with the drawing pieces of the classification set (spp_jax.data.synth): each image is a
cluttered canvas (smooth colour field, blocky noise, faint fragments of other items) with
several items pasted at different scales and positions, each tinted to contrast with the
background; an item's box is the tight box of its visible pixels (`synth.visible_box`).
Deterministic for (seed, split, index); items of the "train" split come from Fashion-MNIST's
training items, those of "test" from its test items. A split is built once and cached as one
.npz under data_dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from spp_jax.data import synth
from spp_jax.data.idx import has_fashion_mnist, load_split
from spp_jax.ops.boxes import box_iou

EMBEDDED = "fashion_mnist_detection"
# Part of the cache key: bump it when the drawing changes, so old cached splits are not reused.
# 2: drawn with spp_jax.data.synth's pieces (its resize instead of Pillow's).
DRAWING_VERSION = 2
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle-boot")


@dataclasses.dataclass
class Scenes:
  """A split: images[i] (H, W, 3) uint8, boxes[i] (G, 4) float32, labels[i] (G,) int32,
  difficult[i] (G,) bool."""
  images: list
  boxes: list
  labels: list
  difficult: list
  class_names: tuple

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def subset(self, count: int) -> "Scenes":
    return Scenes(self.images[:count], self.boxes[:count], self.labels[:count],
                  self.difficult[:count], self.class_names)

  def save(self, path: str) -> None:
    shapes = np.array([im.shape for im in self.images], np.int64).reshape(-1, 3)
    counts = np.array([len(b) for b in self.boxes], np.int64)
    tmp = path + ".tmp.npz"
    np.savez(tmp, pixels=np.concatenate([im.reshape(-1) for im in self.images]),
             shapes=shapes, counts=counts,
             boxes=np.concatenate(self.boxes).reshape(-1, 4).astype(np.float32),
             labels=np.concatenate(self.labels).astype(np.int32),
             difficult=np.concatenate(self.difficult).astype(bool),
             class_names=np.array(self.class_names))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Scenes":
    with np.load(path) as f:
      shapes, counts = f["shapes"], f["counts"]
      pix_ends = np.cumsum(shapes.prod(1))
      box_ends = np.cumsum(counts)
      pixels, boxes, labels, difficult = f["pixels"], f["boxes"], f["labels"], f["difficult"]
      images = [pixels[e - s.prod():e].reshape(s) for s, e in zip(shapes, pix_ends)]
      sl = [slice(e - c, e) for c, e in zip(counts, box_ends)]
      return cls(images, [boxes[s] for s in sl], [labels[s] for s in sl],
                 [difficult[s] for s in sl], tuple(str(n) for n in f["class_names"]))


# ----------------------------------------------------------------------------- composition


@dataclasses.dataclass(frozen=True)
class SceneOptions:
  """How the embedded scenes are drawn (every field can come from the config)."""
  min_side: int = 160
  max_side: int = 224
  max_aspect: float = 1.5
  items: tuple = (2, 4)             # items per image, inclusive range
  item_side: tuple = (28, 96)       # side of an item's 28x28 square, pixels (log-uniform)
  max_overlap: float = 0.15         # IoU limit between the squares of two items
  fragments: tuple = (1, 4)         # faint fragments of other items (clutter), inclusive
  noise_std: float = 6.0
  classes: tuple | None = None      # Fashion-MNIST classes to use (relabelled 0..k-1); None: all

  def __post_init__(self):
    if not 16 <= self.min_side <= self.max_side:
      raise ValueError(f"need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
    if not 1 <= self.items[0] <= self.items[1]:
      raise ValueError(f"items must be (lo, hi) with 1 <= lo <= hi, got items={self.items}")
    if not 8 <= self.item_side[0] <= self.item_side[1]:
      raise ValueError(f"item_side must be (lo, hi) with 8 <= lo <= hi, got {self.item_side}")
    if self.max_aspect < 1:
      raise ValueError(f"max_aspect must be >= 1, got max_aspect={self.max_aspect}")
    if self.classes is not None and (not self.classes or len(set(self.classes)) != len(
        self.classes) or not all(0 <= c < len(CLASS_NAMES) for c in self.classes)):
      raise ValueError(f"classes must be distinct Fashion-MNIST classes 0..9, got {self.classes}")


def _draw_fragment(canvas: np.ndarray, item: np.ndarray, rng: np.random.Generator, h: int,
                   w: int) -> None:
  """A faint piece of another item: an 8..20 pixel crop scaled to 10..40 % of the short side,
  20..50 % opaque, any colour, centred anywhere on the canvas."""
  ch, cw = rng.integers(8, 21, 2)
  cy, cx = rng.integers(0, 28 - ch + 1), rng.integers(0, 28 - cw + 1)
  scale = min(h, w) * rng.uniform(0.1, 0.4) / max(ch, cw)
  fh, fw = max(int(ch * scale), 2), max(int(cw * scale), 2)
  opacity = rng.uniform(0.2, 0.5)
  color = rng.uniform(0, 255, 3)
  at = int(rng.integers(-fh // 2, h - fh // 2)), int(rng.integers(-fw // 2, w - fw // 2))
  synth.paste_fragment(canvas, item, (cy, cx, ch, cw), (fh, fw), opacity, color, at)


def _place(rng: np.random.Generator, side: int, h: int, w: int, squares: list,
           max_overlap: float):
  """Top-left (y, x) of a side x side square whose IoU with every square placed before is at
  most max_overlap (the square joins `squares`); None after 20 tries."""
  for _ in range(20):
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    square = np.array([[x, y, x + side, y + side]], np.float32)
    # box_iou is float32: so is the threshold, or an exact tie (IoU 3/20 at 0.15) would fail.
    if not squares or box_iou(square, np.concatenate(squares)).max() <= np.float32(max_overlap):
      squares.append(square)
      return y, x
  return None


def compose_scene(items: np.ndarray, labels: np.ndarray, fragment_items: np.ndarray,
                  rng: np.random.Generator, opts: SceneOptions = SceneOptions()) -> dict:
  """Draws one scene with the drawing pieces of spp_jax.data.synth.

  Args:
    items: (K, 28, 28) uint8 candidates, tried in order (placements that overlap earlier items
      too much are skipped; the first always fits).
    labels: (K,) their classes.
    fragment_items: (F, 28, 28) uint8 items to cut faint clutter fragments from.
    rng: the scene's generator.
    opts: drawing options.

  Returns:
    dict(image (H, W, 3) uint8, boxes (G, 4) float32 (x0, y0, x1, y1) pixels, ends exclusive:
    the tight box of each item's visible pixels, labels (G,) int32).
  """
  h, w = synth.canvas_size(rng.random(), rng.random(), opts.min_side, opts.max_side,
                           opts.max_aspect)
  base = rng.uniform(20, 235, 3)
  field = base + rng.standard_normal((3, 3, 3)) * rng.uniform(10, 40)
  noise = rng.standard_normal(((h + 1) // 2, (w + 1) // 2)).astype(np.float32)
  noise *= np.float32(opts.noise_std)
  canvas = synth.background(np.clip(field, 0, 255).astype(np.float32), noise, h, w)
  for k in range(rng.integers(opts.fragments[0], opts.fragments[1] + 1)):
    _draw_fragment(canvas, fragment_items[k % len(fragment_items)], rng, h, w)

  boxes, out_labels, squares = [], [], []
  lo, hi = opts.item_side
  for item, label in zip(items, labels):
    side = int(round(min(np.exp(rng.uniform(np.log(lo), np.log(hi))), min(h, w))))
    alpha = synth.item_alpha(item, side)
    box = synth.visible_box(alpha, 0, 0)
    if box is None:   # a blank item: nothing to detect
      continue
    at = _place(rng, side, h, w, squares, opts.max_overlap)
    if at is None:
      continue
    y, x = at
    bright = canvas[y:y + side, x:x + side].mean() > 128
    synth.blend(canvas, alpha, synth.item_color(rng.uniform(0, 1, 3), rng.integers(0, 3),
                                                bright, 70.0, 90.0), y, x)
    boxes.append(box + np.array([x, y, x, y], np.int32))
    out_labels.append(int(label))
  return dict(image=synth.to_uint8(canvas), boxes=np.array(boxes, np.float32).reshape(-1, 4),
              labels=np.array(out_labels, np.int32))


def build_scenes(items: np.ndarray, item_labels: np.ndarray, num_images: int, *, seed: int,
                 split: str, opts: SceneOptions = SceneOptions()) -> Scenes:
  """num_images scenes of a split from that split's items (deterministic per index)."""
  if split not in synth.SPLIT_CODES:
    raise ValueError(f"split must be one of {sorted(synth.SPLIT_CODES)}, got split={split!r}")
  images, boxes, labels = [], [], []
  for index in range(num_images):
    rng = np.random.default_rng((int(seed), synth.SPLIT_CODES[split], int(index), 0xDE7))
    k = int(rng.integers(opts.items[0], opts.items[1] + 1))
    pick = rng.integers(0, len(items), k + opts.fragments[1])
    scene = compose_scene(items[pick[:k]], item_labels[pick[:k]], items[pick[k:]], rng, opts)
    images.append(scene["image"])
    boxes.append(scene["boxes"])
    labels.append(scene["labels"])
  return Scenes(images, boxes, labels, [np.zeros(len(b), bool) for b in boxes], CLASS_NAMES)


def scene_options(data_cfg) -> SceneOptions:
  fields = {f.name for f in dataclasses.fields(SceneOptions)}
  given = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
           for k, v in dict(data_cfg.get("scenes", {}) or {}).items()}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"unknown data.scenes option(s) {unknown}; known: {sorted(fields)}")
  return SceneOptions(**given)


def _default_data_dir(data_cfg) -> str:
  return (data_cfg.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _definition(data_cfg) -> dict:
  """What defines the embedded set's images (the cache key, also saved as options.json)."""
  return dict(seed=int(data_cfg.seed), opts=dataclasses.asdict(scene_options(data_cfg)),
              drawing=DRAWING_VERSION)


def split_dir(data_cfg) -> str:
  """Cache directory of the embedded set for this config (a hash of what defines it)."""
  key = json.dumps(_definition(data_cfg), sort_keys=True)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  return os.path.join(_default_data_dir(data_cfg), EMBEDDED, digest)


def load_embedded(data_cfg, split: str) -> Scenes:
  """The embedded split of data_cfg, built on first use and cached (num_<split> images)."""
  count = int(data_cfg[f"num_{split}"])
  directory = split_dir(data_cfg)
  path = os.path.join(directory, f"{split}_{count}.npz")
  if os.path.exists(path):
    return Scenes.load(path)
  source = data_cfg.get("source_dir") or "/usr/share/datasets/fashion-mnist"
  if not has_fashion_mnist(source):
    raise ValueError(f"Fashion-MNIST idx files not found in data.source_dir={source!r} "
                     f"(Debian: apt-get install dataset-fashion-mnist)")
  items, item_labels = load_split(source, split)
  opts = scene_options(data_cfg)
  names = CLASS_NAMES
  if opts.classes is not None:
    keep = np.isin(item_labels, opts.classes)
    remap = np.zeros(len(CLASS_NAMES), np.int32)
    remap[list(opts.classes)] = np.arange(len(opts.classes))
    items, item_labels = items[keep], remap[item_labels[keep]]
    names = tuple(CLASS_NAMES[c] for c in opts.classes)
  scenes = build_scenes(items, item_labels, count, seed=int(data_cfg.seed), split=split,
                        opts=opts)
  scenes.class_names = names
  os.makedirs(directory, exist_ok=True)
  scenes.save(path)
  with open(os.path.join(directory, "options.json"), "w") as f:
    json.dump(_definition(data_cfg), f, indent=1)
  return scenes


# ----------------------------------------------------------------------------- TFDS voc


def scenes_from_tfds(records, class_names) -> Scenes:
  """Scenes from TFDS voc-style records (dicts with "image" and "objects").

  objects: "bbox" (G, 4) in TFDS's BBoxFeature order, normalised (ymin, xmin, ymax, xmax). TFDS
  voc divides VOC's 1-based inclusive pixel numbers by the image size without shifting them, so
  here x0 = xmin - 1, y0 = ymin - 1, x1 = xmax, y1 = ymax in pixels. "label" (G,),
  "is_difficult" (G,) optional.
  """
  images, boxes, labels, difficult = [], [], [], []
  for i, rec in enumerate(records):
    image = np.asarray(rec["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, -1)
    h, w = image.shape[:2]
    obj = rec["objects"]
    bbox = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)
    label = np.asarray(obj["label"], np.int32).reshape(-1)
    diff = obj.get("is_difficult")
    diff = np.zeros(len(bbox), bool) if diff is None else np.asarray(diff, bool).reshape(-1)
    if not len(bbox) == len(label) == len(diff):
      raise ValueError(f"record {i}: objects have {len(bbox)} boxes, {len(label)} labels and "
                       f"{len(diff)} difficult flags")
    px = synth.from_tfds_bbox(bbox, (h, w)) - np.float32([1, 1, 0, 0])   # VOC's 1-based starts
    boxes.append(np.clip(px, 0, [w, h, w, h]).astype(np.float32))
    labels.append(label)
    difficult.append(diff)
    images.append(image.astype(np.uint8))
  return Scenes(images, boxes, labels, difficult, tuple(class_names))


def load_tfds(data_cfg, split: str) -> Scenes:
  """A split of a TFDS detection data set (e.g. voc/2007), read with tfds.data_source."""
  import tensorflow_datasets as tfds

  from spp_jax.data import _tfds_compat

  _tfds_compat.install()
  builder = tfds.builder(data_cfg.name, data_dir=data_cfg.get("data_dir"))
  try:
    source = builder.as_data_source(split=split)
  except (AssertionError, FileNotFoundError, KeyError, NotImplementedError, ValueError) as e:
    from spp_jax.data.sources import prepare_hint
    from spp_jax.errors import DataError
    raise DataError(f"{data_cfg.name} split {split!r} is not prepared as array_record in "
                    f"{builder.data_dir}", hint=prepare_hint(data_cfg.name,
                                                             data_cfg.get("data_dir"))) from e
  count = data_cfg.get(f"num_{split}")
  n = len(source) if not count else min(int(count), len(source))
  names = builder.info.features["objects"]["label"].names
  return scenes_from_tfds((source[i] for i in range(n)), names)


def load_scenes(data_cfg, split: str) -> Scenes:
  """A split of config.data: the embedded set or a TFDS one."""
  if data_cfg.name == EMBEDDED:
    return load_embedded(data_cfg, split)
  return load_tfds(data_cfg, split)
