"""The demo's stated accuracy (configs/demo.py): part of `make test`, about 3 minutes on 2 cores.

  .venv/bin/pytest -q tests/test_train_demo.py        # alone (also: make demo-test)
  SPP_JAX_SKIP_DEMO_TEST=1 .venv/bin/pytest -q        # everything else

Measured here (2 CPU cores, cold compilation cache, data set already prepared, 2 min 23 s
wall): centre 55.3 %, full image 63.2 %, 10-view 64.2 % top-1. The bounds below are loose
(about 10 points under) so that other seeds or library versions pass while a broken pipeline
does not; the ordering full > centre is the paper's claim that the full-image view beats the
centre crop.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from spp_jax.train import train_and_evaluate

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("SPP_JAX_SKIP_DEMO_TEST") == "1",
                       reason="SPP_JAX_SKIP_DEMO_TEST=1"),
]


def test_demo_reaches_stated_accuracy(tmp_path):
  spec = importlib.util.spec_from_file_location("demo", os.path.join(_REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = os.environ.get("SPP_JAX_TEST_TFDS_DIR", str(tmp_path / "tfds"))
  results = train_and_evaluate(config, str(tmp_path / "demo"))
  assert results["center/top1"] >= 0.45
  assert results["full/top1"] >= 0.55
  assert results["ten_view/top1"] >= 0.55
  assert results["full/top1"] > results["center/top1"]
  assert results["ten_view/top5"] >= 0.9
