"""Full-image buckets: which padded shapes hold the images, how much padding they cost, and a
chooser that picks the shapes with the least padding for a budget of compiled shapes.

Full-image batches (docs/paper.md §3) resize every image so its short side is S, keep the
aspect ratio, and pad it into the smallest bucket that holds it (`transforms.choose_bucket`);
an image too long for every bucket is shrunk into the bucket of the closest aspect ratio
(`transforms.fit_to_bucket`). Each bucket is one compiled shape of the training step, so few
buckets compile fast and many waste few pixels. Padding fraction = padding pixels / batch
pixels, over the examples. The chooser minimises padding plus the image pixels lost to
shrinking (padding alone would favour small buckets that shrink every image into them).

  python -m spp_jax.data.buckets --data imagenette/full-size-v2 --max_shapes 4
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from collections.abc import Sequence

import numpy as np

from spp_jax.data import sources, transforms
from spp_jax.data.settings import DataSettings, data_settings

Bucket = tuple[int, int]


# ----------------------------------------------------------------------------- per example


def example_buckets(settings: DataSettings, split: str, *, process_count: int = 1
                    ) -> np.ndarray:
  """(N,) int32 bucket of every example at the base short side (data.full_image)."""
  sizes = sources.image_sizes(settings, split, process_count=process_count)
  out = np.zeros((len(sizes),), np.int32)  # unknown sizes: bucket 0, reported when read
  cache: dict[tuple[int, int], int] = {}
  for i, (h, w) in enumerate(sizes.tolist()):
    if h > 0 and w > 0:
      key = (h, w)
      if key not in cache:
        size = transforms.short_side_size(key, settings.full_short_side)
        cache[key] = transforms.choose_bucket(size, settings.buckets)
      out[i] = cache[key]
  return out


def size_histogram(sizes: np.ndarray, short_side: int) -> collections.Counter:
  """Counter {(h, w) at short side S: examples} of (N, 2) source sizes (unknown (0, 0) left out)."""
  sizes = np.asarray(sizes).reshape(-1, 2)
  known = sizes[(sizes > 0).all(axis=1)]
  raw = collections.Counter(map(tuple, known.tolist()))
  out: collections.Counter = collections.Counter()
  for hw, n in raw.items():
    out[transforms.short_side_size(hw, short_side)] += n
  return out


def waste(histogram: collections.Counter, buckets: Sequence[Bucket], min_size: int = 1
          ) -> tuple[int, int, int]:
  """(padding pixels, pixels lost to shrinking, batch pixels) of a histogram's examples under
  the real rules."""
  pad = lost = total = 0
  for (h, w), n in histogram.items():
    b = buckets[transforms.choose_bucket((h, w), buckets)]
    fh, fw = transforms.fit_to_bucket((h, w), b, min_size)
    total += n * b[0] * b[1]
    pad += n * (b[0] * b[1] - fh * fw)
    lost += n * max(0, h * w - fh * fw)
  return pad, lost, total


def padding(histogram: collections.Counter, buckets: Sequence[Bucket], min_size: int = 1
            ) -> tuple[int, int]:
  """(padding pixels, batch pixels) of the examples of a histogram under the real rules."""
  pad, _, total = waste(histogram, buckets, min_size)
  return pad, total


def padding_fraction(histogram: collections.Counter, buckets: Sequence[Bucket],
                     min_size: int = 1) -> float:
  pad, total = padding(histogram, buckets, min_size)
  return pad / total if total else 0.0


# ----------------------------------------------------------------------------- chooser


def _one_orientation(longs: np.ndarray, counts: np.ndarray, short: int, k_max: int
                     ) -> list[tuple[float, list[int]]]:
  """Best long sides for 1..k_max buckets (short x t) for images (short x longs[i]).

  Dynamic programme over the sorted distinct long sides v: a bucket set is thresholds among
  the v; an image pads to the smallest threshold >= its side, or is shrunk into the largest
  (padding S t (1 - t / v), lost S v (1 - (t / v)^2)). Returns, per k, (padding + lost
  pixels, thresholds).
  """
  v = longs.astype(np.float64)
  c = counts.astype(np.float64)
  m = len(v)
  cum_c = np.concatenate([[0.0], np.cumsum(c)])
  cum_vc = np.concatenate([[0.0], np.cumsum(c * v)])
  # over[j]: shrinking every image longer than v[j] into a bucket of long side v[j].
  over = np.zeros((m,))
  for j in range(m - 1):  # fitted as `transforms.fit_to_bucket` does: (round(S t / v), t)
    t, longer = v[j], v[j + 1:]
    fitted = np.minimum(short, np.maximum(1, np.round(short * t / longer))) * t
    over[j] = np.sum(c[j + 1:] * ((short * t - fitted) + (short * longer - fitted)))
  cost = np.full((k_max + 1, m), np.inf)
  back = np.zeros((k_max + 1, m), np.int64)
  for j in range(m):  # one bucket, v[j], for images 0..j
    cost[1, j] = short * (v[j] * cum_c[j + 1] - cum_vc[j + 1])
  for q in range(2, k_max + 1):
    for j in range(1, m):
      p = np.arange(j)  # the previous threshold is v[p]; images p+1..j pad to v[j]
      cand = cost[q - 1, :j] + short * (v[j] * (cum_c[j + 1] - cum_c[p + 1])
                                        - (cum_vc[j + 1] - cum_vc[p + 1]))
      best = int(np.argmin(cand))
      cost[q, j], back[q, j] = cand[best], best
  results = []
  for k in range(1, k_max + 1):
    total = cost[1:k + 1] + over[None, :]
    q, j = np.unravel_index(int(np.argmin(total)), total.shape)
    q += 1
    picks = [int(j)]
    while q > 1:
      j = back[q, j]
      picks.append(int(j))
      q -= 1
    results.append((float(total.min()), sorted(int(longs[i]) for i in picks)))
  return results


def choose_buckets(histogram: collections.Counter, short_side: int, max_shapes: int,
                   min_size: int = 1) -> tuple[Bucket, ...]:
  """At most max_shapes buckets with the least padding + shrinking loss (`waste`) for a size
  histogram at short side S (`size_histogram`): landscape buckets (S, t) and portrait ones
  (t, S), the budget split between the two orientations by the exact waste of each split."""
  if max_shapes < 1:
    raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
  land = collections.Counter({w: n for (h, w), n in histogram.items() if h <= w})
  port = collections.Counter({h: n for (h, w), n in histogram.items() if h > w})
  if not land and not port:
    return ((short_side, short_side),)

  def best(group, k):
    keys = np.array(sorted(group))
    return _one_orientation(keys, np.array([group[x] for x in keys]), short_side, k)

  def land_shapes(k):
    return [(short_side, t) for t in best(land, k)[k - 1][1]]

  def port_shapes(k):
    return [(t, short_side) for t in best(port, k)[k - 1][1]]

  # Every split of the budget, including none for one orientation (its images are then
  # shrunk into the other's buckets); the exact waste decides.
  candidates = [land_shapes(max_shapes)] if land else []
  candidates += [port_shapes(max_shapes)] if port else []
  if land and port:
    candidates += [land_shapes(k) + port_shapes(max_shapes - k) for k in range(1, max_shapes)]
    if max_shapes == 1:  # a single shape for both: any side length
      candidates += [[(short_side, t)] for t in land] + [[(t, short_side)] for t in port]
  candidates = [tuple(sorted(set(c))) for c in candidates]
  return min(candidates, key=lambda b: (_cost(histogram, b, min_size), len(b)))


def _cost(histogram, buckets, min_size: int = 1) -> int:
  pad, lost, _ = waste(histogram, buckets, min_size)
  return pad + lost


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="TFDS name[/config] (prepared)")
  parser.add_argument("--max_shapes", type=int, required=True, help="budget of buckets")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--split", default="train")
  parser.add_argument("--short_side", type=int, default=None,
                      help="full-image short side S (default data.full_image.short_side)")
  args = parser.parse_args(argv)
  s = data_settings(dict(name=args.data, data_dir=args.data_dir))
  short = args.short_side or s.full_short_side
  hist = size_histogram(sources.image_sizes(s, args.split), short)
  n = sum(hist.values())
  chosen = choose_buckets(hist, short, args.max_shapes, s.min_size)
  default = transforms.scale_buckets(s.buckets, s.full_short_side, short)
  print(f"{args.data} split {args.split!r}: {n} images, {len(hist)} distinct shapes at short "
        f"side {short}")
  pixels = sum(n * h * w for (h, w), n in hist.items())
  for name, b in (("default buckets", default),
                  (f"chosen ({len(chosen)} of at most {args.max_shapes})", chosen)):
    pad, lost, total = waste(hist, b, s.min_size)
    print(f"{name} {list(b)}: padding fraction {pad / total:.4f}, image pixels lost to "
          f"shrinking {lost / pixels:.4f}")
  print(f"config: data.full_image.short_side = {short}; data.full_image.buckets = "
        f"{tuple(chosen)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
