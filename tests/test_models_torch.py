"""Cross-check against PyTorch's own layers (ceil-mode max pooling, LocalResponseNorm, adaptive
max pooling) when torch happens to be importable; skipped otherwise (never a dependency).

The PyTorch network is the one experiments/benchmarks/train_step.py times, built from the same
Architecture, so this also shows that the benchmark compares the same network.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from flax import nnx

from spp_jax import models

torch = pytest.importorskip("torch")

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "benchmarks", "train_step.py")


def _bench_module():
  spec = importlib.util.spec_from_file_location("train_step_bench", _BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", models.names())
def test_logits_match_pytorch(name):
  options = dict(width_multiplier=0.125, fc_width=32)
  s = models.spec(name, **options)
  levels = [lv[0] for lv in s.option("spp_levels")]
  model = models.create(name, num_classes=7, rngs=nnx.Rngs(0), **options)
  model.eval()
  net = _bench_module()._torch_net(s.arch, 7, levels, 32, 0.5).eval().double()
  convs = [getattr(model, n).conv for n in model.layer_names if hasattr(getattr(model, n), "conv")]
  # Our SPP vector is (level, row, col, channel); PyTorch flattens (level, channel, row, col).
  c = s.out_channels
  order, offset = [], 0
  for n in levels:
    order.append(np.arange(n * n * c).reshape(n, n, c).transpose(2, 0, 1).ravel() + offset)
    offset += n * n * c
  fc6 = np.asarray(model.fc6.kernel[...])[np.concatenate(order)]
  dense = [(fc6, model.fc6.bias), (model.fc7.kernel[...], model.fc7.bias),
           (model.classifier.kernel[...], model.classifier.bias)]
  with torch.no_grad():
    for ours, theirs in zip(convs, [m for m in net.features if isinstance(m, torch.nn.Conv2d)]):
      theirs.weight.copy_(torch.from_numpy(np.asarray(ours.kernel[...], np.float64)
                                           .transpose(3, 2, 0, 1)))
      theirs.bias.copy_(torch.from_numpy(np.asarray(ours.bias[...], np.float64)))
    for (k, b), theirs in zip(dense, [m for m in net.head if isinstance(m, torch.nn.Linear)]):
      theirs.weight.copy_(torch.from_numpy(np.asarray(k, np.float64).T))
      theirs.bias.copy_(torch.from_numpy(np.asarray(b[...], np.float64)))
  x = np.random.default_rng(0).normal(size=(2, 97, 75, 3)).astype(np.float32) * 50
  ours = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
  with torch.no_grad():
    theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
