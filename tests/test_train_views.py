"""Evaluation views on the real pipeline and network (the embedded data set's "tiny" config)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from spp_jax import data, models
from spp_jax.train import parallel, schedules, state as state_lib
from spp_jax.train import view
from spp_jax.train.evaluate import Evaluator
from spp_jax.train.loop import prepared_data_config
from spp_jax.train.model import model_spec

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  spec = importlib.util.spec_from_file_location("demo", os.path.join(_REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.data_dir = os.environ.get("SPP_JAX_TEST_TFDS_DIR",
                                        str(tmp_path_factory.mktemp("tfds")))
  config.eval.batch_size = 64
  config.data.full_image.buckets = ((72, 72), (72, 112))  # fewer shapes, fewer compilations
  data_cfg = prepared_data_config(config, model_spec(models, config.model).min_input_size)
  num_classes = data.num_classes(data_cfg)
  mesh = parallel.make_mesh()
  tx = schedules.make_optimizer(config.optimizer, lambda step: 0.0)
  state = state_lib.create_train_state(models, config.model, num_classes, 0, tx,
                                       parallel.replicated(mesh))
  defs = state_lib.model_defs(models, config.model, num_classes)
  return config, data_cfg, mesh, state, defs


class _Unsliced:
  """The data module, but every multiscale view runs on the whole padded shape."""

  def __getattr__(self, name):
    return getattr(data, name)

  def multiscale_view_shapes(self, data_cfg, view_cfg, padded_shape):
    n = len(data.multiscale_view_shapes(data_cfg, view_cfg, padded_shape))
    return [tuple(padded_shape)] * n


def _evaluator(setup, views, slice_multiscale=True):
  config, data_cfg, mesh, _, defs = setup
  config.eval.views = views
  return Evaluator(defs.eval, mesh, data if slice_multiscale else _Unsliced(), data_cfg,
                   config.eval)


def test_every_example_counted_once_per_view(setup):
  config, data_cfg, _, state, _ = setup
  views = [view("center", "center", size=64), view("full", "full", short_side=72),
           view("ten_view", "ten_view", size=64)]
  n = data.num_examples(data_cfg, data_cfg.eval_split)
  ev = _evaluator(setup, views)
  for v in views:
    got = ev.evaluate_view(state, v)
    assert got["count"] == n  # 256 examples, batches of 64 (full view: per-bucket padding)
    assert 0 <= got["top1"] <= got["top5"] <= 1


def test_multiscale_views_sliced_to_their_shapes_give_the_same_scores(setup):
  _, _, _, state, _ = setup
  ms = view("multiscale", "multiscale", scales=(56, 72), flip=True)
  sliced = _evaluator(setup, [ms], slice_multiscale=True)
  padded = _evaluator(setup, [ms], slice_multiscale=False)
  a, b = sliced.evaluate_view(state, ms), padded.evaluate_view(state, ms)
  assert a["count"] == b["count"]
  # Masked networks: each view's logits do not depend on how much padding surrounds it.
  assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
  shapes = {k[1] for k in sliced.steps}
  assert len({hw for view_shapes in shapes for hw in view_shapes}) > 1
