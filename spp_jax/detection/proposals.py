"""Region proposals: selective search (OpenCV contrib, docs/paper.md §6 step 1) or sliding
windows.

Selective search needs `opencv-contrib-python-headless` (the `detection` extra). Proposals are
computed once per image (in `num_workers` processes) and cached as one .npz next to the data.
Boxes are (x0, y0, x1, y1) pixels, ends exclusive (spp_jax.ops.boxes).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os

import numpy as np

METHODS = ("selective_search", "sliding")


def _clean(boxes: np.ndarray, image_hw, min_size: int, max_proposals: int) -> np.ndarray:
  """Clips to the image, drops boxes under min_size a side and duplicates, keeps the order."""
  h, w = image_hw
  boxes = np.clip(boxes.astype(np.float32), 0, np.array([w, h, w, h], np.float32))
  ok = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
  boxes = boxes[ok]
  _, first = np.unique(boxes, axis=0, return_index=True)
  return boxes[np.sort(first)][:max_proposals].reshape(-1, 4).astype(np.float32)


def selective_search(image: np.ndarray, *, mode: str = "fast", max_proposals: int = 2000,
                     min_size: int = 8) -> np.ndarray:
  """Selective search proposals of one (H, W, 3) uint8 RGB image, in OpenCV's order."""
  try:
    import cv2
  except ImportError:
    raise ValueError("selective search needs OpenCV contrib: pip install "
                     "opencv-contrib-python-headless (the spp_jax[detection] extra)") from None
  if mode not in ("fast", "quality", "single"):
    raise ValueError(f"mode must be 'fast', 'quality' or 'single', got mode={mode!r}")
  cv2.setNumThreads(1)
  ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
  ss.setBaseImage(np.ascontiguousarray(image[..., ::-1]))  # OpenCV wants BGR
  {"fast": ss.switchToSelectiveSearchFast, "quality": ss.switchToSelectiveSearchQuality,
   "single": ss.switchToSingleStrategy}[mode]()
  rects = np.asarray(ss.process(), np.float32).reshape(-1, 4)   # (x, y, w, h)
  boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1)
  return _clean(boxes, image.shape[:2], min_size, max_proposals)


def sliding_windows(image_hw, *, sizes=(24, 32, 48, 64, 96, 128), aspects=(0.5, 1.0, 2.0),
                    overlap: float = 0.5, max_proposals: int = 2000,
                    min_size: int = 8) -> np.ndarray:
  """Dense boxes of several sizes and aspect ratios on a grid (a proposal-free baseline)."""
  h, w = image_hw
  out = []
  for s in sizes:
    for a in aspects:
      bw, bh = s * np.sqrt(a), s / np.sqrt(a)
      if bw > w or bh > h:
        continue
      step_x, step_y = max(bw * (1 - overlap), 1), max(bh * (1 - overlap), 1)
      xs = np.arange(0, w - bw + 1, step_x)
      ys = np.arange(0, h - bh + 1, step_y)
      gx, gy = np.meshgrid(xs, ys)
      out.append(np.stack([gx.ravel(), gy.ravel(), gx.ravel() + bw, gy.ravel() + bh], 1))
  boxes = np.concatenate(out) if out else np.zeros((0, 4))
  if len(boxes) > max_proposals:   # an even subset over all sizes, not the smallest ones only
    boxes = boxes[np.linspace(0, len(boxes) - 1, max_proposals).round().astype(int)]
  return _clean(boxes, image_hw, min_size, max_proposals)


def propose(image: np.ndarray, method: str, **options) -> np.ndarray:
  if method == "selective_search":
    return selective_search(image, **options)
  if method == "sliding":
    options.pop("mode", None)
    return sliding_windows(image.shape[:2], **options)
  raise ValueError(f"proposals.method must be one of {METHODS}, got method={method!r}")


def _work(args):
  image, method, options = args
  return propose(image, method, **options)


def compute_proposals(images, method: str, *, num_workers: int = 1, **options) -> list:
  """Proposals of every image (a list of (P, 4) float32), in `num_workers` processes."""
  if method not in METHODS:
    raise ValueError(f"proposals.method must be one of {METHODS}, got method={method!r}")
  jobs = [(im, method, options) for im in images]
  if num_workers <= 1 or len(jobs) < 2:
    return [_work(j) for j in jobs]
  # spawn: forking a process that has started JAX's threads is unsafe.
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    return pool.map(_work, jobs, chunksize=max(1, len(jobs) // (4 * num_workers)))


def proposal_options(cfg) -> dict:
  return dict(mode=cfg.get("mode", "fast"), max_proposals=int(cfg.max_per_image),
              min_size=int(cfg.min_size))


def cached_proposals(images, cache_dir: str, split: str, cfg) -> list:
  """Proposals of a split, loaded from cache_dir or computed and saved there."""
  options = proposal_options(cfg)
  key = json.dumps(dict(method=cfg.method, n=len(images), **options), sort_keys=True)
  path = os.path.join(cache_dir, f"proposals_{split}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
                      ".npz")
  if os.path.exists(path):
    with np.load(path) as f:
      counts, boxes = f["counts"], f["boxes"]
    ends = np.cumsum(counts)
    return [boxes[e - c:e] for c, e in zip(counts, ends)]
  props = compute_proposals(images, cfg.method, num_workers=int(cfg.get("num_workers", 1)),
                            **options)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, counts=np.array([len(p) for p in props], np.int64),
           boxes=np.concatenate(props).reshape(-1, 4).astype(np.float32))
  os.replace(tmp, path)
  return props


def recall(proposals: list, gt_boxes: list, iou: float = 0.5) -> float:
  """Fraction of ground-truth boxes covered by some proposal at IoU >= iou."""
  from spp_jax.ops.boxes import box_iou

  hit = total = 0
  for p, g in zip(proposals, gt_boxes):
    total += len(g)
    if len(g) and len(p):
      hit += int((box_iou(g, p).max(1) >= iou).sum())
  return hit / max(total, 1)
