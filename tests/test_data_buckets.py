"""Full-image buckets: padding fraction under the real bucket rules, the chooser against brute
force, the iterator's logged figure, and `python -m spp_jax.data.buckets`."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from spp_jax import data
from spp_jax.data import buckets, sources, transforms
from test_data_pipeline import BUCKETS, _cfg, data_dir  # noqa: F401  (fixture)


def test_padding_counts_pixels_of_each_bucket():
  hist = collections.Counter({(10, 10): 2, (10, 15): 1, (14, 10): 1})
  pad, total = buckets.padding(hist, [(10, 10), (10, 16), (16, 10)])
  assert total == 2 * 100 + 160 + 160 and pad == 0 + 10 + 20
  # An image longer than every bucket is shrunk into the closest aspect ratio's bucket.
  pad, total = buckets.padding(collections.Counter({(10, 40): 1}), [(10, 10), (10, 20)])
  assert (pad, total) == (10 * 20 - 5 * 20, 200)


def test_chooser_is_as_good_as_brute_force(rng):
  s = 16
  longs = rng.integers(16, 40, size=300)
  portrait = rng.random(300) < 0.3
  hist = collections.Counter(
      (int(l), s) if p else (s, int(l)) for l, p in zip(longs, portrait))
  shapes = sorted({(s, w) for h, w in hist if h == s} | {(h, s) for h, w in hist if w == s})
  for k in (1, 2, 3):
    chosen = buckets.choose_buckets(hist, s, k)
    assert len(chosen) <= k
    best = min(buckets._cost(hist, c) for c in itertools.combinations(shapes, k))
    assert buckets._cost(hist, chosen) <= best * 1.001 + 1
  # More shapes never waste more; all images of one shape need no padding.
  costs = [buckets._cost(hist, buckets.choose_buckets(hist, s, k)) for k in (1, 2, 4, 8)]
  assert costs == sorted(costs, reverse=True) and costs[0] > 2 * costs[-1]
  assert buckets.choose_buckets(collections.Counter({(s, 20): 5}), s, 3) == ((s, 20),)


def test_iterator_logs_the_padding_fraction_of_its_batches(data_dir):
  cfg = _cfg(data_dir)
  it = data.eval_iterator(cfg, dict(kind="full", short_side=40), batch_size=32)
  assert it.padding_fraction is None
  list(it)
  hist = buckets.size_histogram(sources.image_sizes(cfg, "test"), 40)
  expected = buckets.padding_fraction(hist, BUCKETS, min_size=16)
  assert it.padding_fraction == pytest.approx(expected) and 0.05 < expected < 0.6
  assert data.train_iterator(cfg, batch_size=8, image_size=32, epoch=0,
                             seed=0).padding_fraction is None  # crop mode: no buckets


def test_buckets_cli_prints_a_choice_with_less_padding(data_dir, capsys):
  cfg = _cfg(data_dir)
  # The same budget as the schema default's five buckets.
  assert buckets.main(["--data", cfg.name, "--data_dir", str(data_dir), "--max_shapes", "5",
                       "--short_side", "40"]) == 0
  out = capsys.readouterr().out
  default = float(out.split("default buckets")[1].split("padding fraction")[1].split()[0][:-1])
  chosen = float(out.split("chosen")[1].split("padding fraction")[1].split()[0][:-1])
  assert chosen <= default and "data.full_image.buckets = ((" in out
  hist = buckets.size_histogram(sources.image_sizes(cfg, "train"), 40)
  picked = buckets.choose_buckets(hist, 40, 3)
  assert all(min(b) == 40 for b in picked)
  for b in picked:  # every bucket holds some image exactly at its long side
    assert any(transforms.choose_bucket(hw, picked) == picked.index(b) for hw in hist)
