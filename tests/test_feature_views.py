"""Multi-view testing on feature maps (docs/paper.md §4): windows of the whole image's conv map.

The reference for a window is the crop it stands for, run through the network on its own. For
a network with no padding whose receptive field R lies in (S, 2S] (S its total stride), a crop
whose offset is a multiple of S has a conv map that is exactly a block of the whole image's map,
and that block is the window the paper's rule projects the crop to (docs/paper.md §6 step 3):
two 3x3 stride-2 'VALID' convs have S = 4 and R = 7; a crop of 4m pixels has a map of m - 1
cells and the rule gives [x0 / 4, ceil((x0 + 4m) / 4) - 1), m - 1 cells from x0 / 4. For such
a network every view's score must equal its re-run crop's.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spp_jax.data import settings, transforms
from spp_jax.models.arch import Architecture, ConvSpec, PoolSpec
from spp_jax.models.net import SPPNet
from spp_jax.ops.boxes import project_boxes
from spp_jax.ops.roi_pool import roi_spatial_pyramid_pool
from spp_jax.train import config_schema, feature_views as fvs, steps

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRIDE = 4


@pytest.fixture(scope="module")
def valid_net():
  arch = Architecture(name="valid", base_size=16, fixed_pool=PoolSpec(2, 2),
                      layers=(("conv1", ConvSpec(4, 3, stride=2)),
                              ("conv2", ConvSpec(6, 3, stride=2))))
  return SPPNet(arch, num_classes=5, rngs=nnx.Rngs(0), spp_levels=(3, 2, 1), head="spp",
                fc_width=8, dropout_rate=0.0, base_size=None, dtype=jnp.float32,
                param_dtype=jnp.float32)


def _padded(images, shape):
  """Images of several sizes zero-padded into one (N, H, W, 3) batch, and their (N, 2) sizes."""
  out = np.zeros((len(images),) + tuple(shape) + (3,), np.float32)
  for i, x in enumerate(images):
    out[i, :x.shape[0], :x.shape[1]] = x
  return out, np.array([x.shape[:2] for x in images], np.int32)


def _softmax(logits):
  return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


# ----------------------------------------------------------------------------- exactness


def test_a_window_pools_what_its_rerun_crop_pools(valid_net):
  model = valid_net
  image = np.random.default_rng(0).normal(size=(32, 48, 3)).astype(np.float32)
  fmap, fsizes = model.features(image[None], np.array([[32, 48]]))
  boxes, distinct = fvs.window_boxes(jnp.array([[32, 48]]), 16, 9)
  assert bool(distinct.all())
  cells = fvs.window_cells(boxes, STRIDE, fmap.shape[1:3], fsizes)
  pooled = np.asarray(roi_spatial_pyramid_pool(fmap, cells[0], model.spp.levels))
  for r, ((x0, y0, x1, y1), (cy0, cx0, cy1, cx1)) in enumerate(
      zip(np.asarray(boxes[0]), np.asarray(cells[0]))):
    crop_map, _ = model.features(image[None, y0:y1, x0:x1])
    assert crop_map.shape[1:3] == (3, 3) == (cy1 - cy0, cx1 - cx0)
    np.testing.assert_allclose(fmap[0, cy0:cy1, cx0:cx1], crop_map[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pooled[r], model.pool(crop_map)[0], rtol=1e-6, atol=1e-6)


def test_scores_average_the_rerun_crops_and_full_images(valid_net):
  """Two examples of different shapes padded into one batch; image 0 of each example gives
  the 9 windows and their mirror images' (18), image 1 the two full-image views."""
  model = valid_net
  rng = np.random.default_rng(1)
  window_images = [rng.normal(size=s + (3,)).astype(np.float32) for s in ((32, 48), (48, 32))]
  full_images = [rng.normal(size=s + (3,)).astype(np.float32) for s in ((20, 24), (40, 28))]
  w_batch, w_sizes = _padded(window_images, (48, 48))
  f_batch, f_sizes = _padded(full_images, (48, 48))
  images = np.stack([w_batch, f_batch], axis=1)          # (2, S=2, 48, 48, 3)
  sizes = np.stack([w_sizes, f_sizes], axis=1)
  plan = fvs.FeatureViews(size=16, window_index=(0,), positions=9, mirrored=True,
                          full_index=1, full_views=2)
  got = np.asarray(fvs.average_probs(model, jnp.asarray(images), jnp.asarray(sizes), plan))

  for i in range(2):
    x, full = window_images[i], full_images[i]
    (h, w), views = x.shape[:2], []
    for top in (0, (h - 16) // 2, h - 16):
      for left in (0, (w - 16) // 2, w - 16):
        crop = x[top:top + 16, left:left + 16]
        views += [crop, crop[:, ::-1]]
    views = np.stack(views)
    probs = list(_softmax(model(views)))
    probs += list(_softmax(model(np.stack([full, full[:, ::-1]]))))
    assert len(probs) == 20
    np.testing.assert_allclose(got[i], np.mean(probs, axis=0), rtol=1e-5, atol=1e-6)
  assert fvs.view_counts(sizes, plan).tolist() == [20, 20]


def test_full_image_views_are_the_full_view(valid_net):
  """The whole map of an image pools what SPP over the image's own map pools."""
  model = valid_net
  rng = np.random.default_rng(2)
  imgs = [rng.normal(size=s + (3,)).astype(np.float32) for s in ((17, 30), (30, 19))]
  batch, sizes = _padded(imgs, (30, 30))
  plan = fvs.FeatureViews(size=16, window_index=(), positions=1, mirrored=False,
                          full_index=0, full_views=1)
  pooled, example, weight = fvs.pooled_views(model, jnp.asarray(batch[:, None]),
                                             jnp.asarray(sizes[:, None]), plan)
  np.testing.assert_array_equal(example, [0, 1])
  np.testing.assert_array_equal(weight, [1, 1])
  np.testing.assert_allclose(pooled, model.pool(*model.features(batch, sizes)), rtol=1e-6,
                             atol=1e-6)


# ----------------------------------------------------------------------------- geometry


def test_coinciding_windows_count_once():
  sizes = np.array([[16, 40], [16, 16], [30, 40], [40, 16]])
  _, distinct = fvs.window_boxes(sizes, 16, 9)
  # Short side == window: 3 positions along the long side (a square: 1); else all 9.
  assert distinct.sum(-1).tolist() == [3, 1, 9, 3]
  boxes, distinct = fvs.window_boxes(sizes[2:3], 16, 5)
  assert boxes[0].tolist() == [[12, 7, 28, 23], [0, 0, 16, 16], [24, 0, 40, 16],
                               [0, 14, 16, 30], [24, 14, 40, 30]]
  # A side shorter than the window (an image shrunk into its bucket): the whole side.
  boxes, _ = fvs.window_boxes(np.array([[10, 40]]), 16, 1)
  assert boxes[0].tolist() == [[12, 0, 28, 10]]


def test_the_papers_setting_is_96_plus_2_views():
  data = settings.data_settings({"crop_size": 224})
  view = settings.view_settings(config_schema.view("fmv", "feature_multiview"), data)
  assert view.window_scales == (224, 256, 300, 360, 448, 560)
  assert view.scales == view.window_scales  # the full views' 256 is one of them
  plan = fvs.plan(view)
  assert plan.positions == 9 and plan.mirrored and plan.full_views == 2
  assert plan.full_index == 1 and plan.nominal_views == 110
  # A 3:4 image: at 224 the 9 windows are 3 (6 with flips), at every other scale 18.
  sizes = np.array([[transforms.short_side_size((300, 400), s) for s in view.scales]])
  assert fvs.view_counts(sizes, plan).tolist() == [96 + 2]


def test_window_cells_follow_the_papers_rule_on_each_map():
  rng = np.random.default_rng(3)
  map_sizes = np.array([[5, 9], [8, 3]])
  boxes = np.stack([np.sort(rng.integers(0, 80, size=(6, 2, 2)), axis=1).reshape(6, 4)
                    for _ in range(2)])[..., [0, 2, 1, 3]]
  boxes[..., 2:] += 1  # non-empty
  got = np.asarray(fvs.window_cells(jnp.asarray(boxes), 8, (8, 9), jnp.asarray(map_sizes)))
  for i, fs in enumerate(map_sizes):
    np.testing.assert_array_equal(got[i], project_boxes(boxes[i], 8, tuple(fs)))


# ----------------------------------------------------------------------------- settings


def _data(**kw):
  return settings.data_settings(dict(crop_size=64, full_image=dict(short_side=72,
                                                                   buckets=((72, 72),)), **kw))


def test_view_settings_scale_the_papers_sizes_to_the_window():
  v = settings.view_settings(dict(name="f", kind="feature_multiview"), _data())
  assert v.window_scales == (64, 73, 86, 103, 128, 160)  # the paper's x 64 / 224
  assert v.scales == v.window_scales + (72,)  # the full views' short side, sent once more
  assert v.bucketed and v.per_scale and v.num_views == 7 and not v.flip
  plan = fvs.plan(v)
  assert plan.window_index == (0, 1, 2, 3, 4, 5) and plan.full_index == 6
  v = settings.view_settings(dict(kind="feature_multiview", scales=(64, 72), windows=5,
                                  full_views=1), _data())
  assert v.scales == (64, 72) and fvs.plan(v).full_index == 1
  assert not fvs.plan(v).mirrored and fvs.plan(v).nominal_views == 11
  assert not fvs.plan(v).runs_mirror


@pytest.mark.parametrize("fields, match", [
    (dict(flip=True), "not from flip"),
    (dict(scales=(48, 72)), "smaller than the window size"),
    (dict(scales=(72, 72)), "must differ"),
    (dict(windows=4), "windows must be one of"),
])
def test_bad_feature_views_are_refused(fields, match):
  with pytest.raises(ValueError, match=match):
    settings.view_settings(dict(name="f", kind="feature_multiview", **fields), _data())


def test_validation_refuses_the_no_spp_head_and_flip():
  from spp_jax import models
  from spp_jax.train.validation import validate_config

  def config(**fields):
    c = config_schema.default_config()
    c.eval.views = [config_schema.view("fmv", "feature_multiview", **fields)]
    return c

  validate_config(config(), device_count=1, process_count=1, models=models)
  for bad, match in ((dict(flip=True), "flips from windows"),
                     (dict(scales=(200, 256)), "smaller than the window size")):
    with pytest.raises(config_schema.ConfigError, match=match):
      validate_config(config(**bad), device_count=1, process_count=1, models=models)
  c = config()
  c.model.head = "fixed"
  with pytest.raises(config_schema.ConfigError, match="no SPP"):
    validate_config(c, device_count=1, process_count=1, models=models)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from spp_jax import data, models
  from spp_jax.train import parallel, schedules, state as state_lib
  from spp_jax.train.loop import prepared_data_config
  from spp_jax.train.model import model_spec

  spec = importlib.util.spec_from_file_location("demo", os.path.join(_REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.data_dir = os.environ.get("SPP_JAX_TEST_TFDS_DIR",
                                        str(tmp_path_factory.mktemp("tfds")))
  config.eval.batch_size = 64
  config.data.full_image.buckets = ((72, 72), (72, 112))  # fewer shapes, fewer compilations
  data_cfg = prepared_data_config(config, model_spec(models, config.model).min_input_size)
  mesh = parallel.make_mesh()
  num_classes = data.num_classes(data_cfg)
  tx = schedules.make_optimizer(config.optimizer, lambda step: 0.0)
  state = state_lib.create_train_state(models, config.model, num_classes, 0, tx,
                                       parallel.replicated(mesh))
  defs = state_lib.model_defs(models, config.model, num_classes)
  return config, data_cfg, mesh, state, defs


@pytest.mark.slow
def test_evaluator_counts_every_example_once_in_both_batch_layouts(tiny):
  from spp_jax import data
  from spp_jax.train.evaluate import Evaluator

  config, data_cfg, mesh, state, defs = tiny
  view = config_schema.view("fmv", "feature_multiview", scales=(64, 96))
  config.eval.views = [view]
  n = data.num_examples(data_cfg, data_cfg.eval_split)
  got = {}
  for dtype in ("uint8", "float32"):
    cfg = dict(data_cfg.to_dict(), batch_dtype=dtype)
    ev = Evaluator(defs.eval, mesh, data, type(data_cfg)(cfg), config.eval)
    got[dtype] = ev.evaluate_view(state, view)
    assert got[dtype]["count"] == n
    assert 0 <= got[dtype]["top1"] <= got[dtype]["top5"] <= 1
  # The host's float32 images and the device-finished uint8 ones are the same inputs.
  assert got["uint8"]["top1"] == got["float32"]["top1"]
  np.testing.assert_allclose(got["uint8"]["loss"], got["float32"]["loss"], rtol=1e-5)
  batch = next(iter(data.eval_iterator(data_cfg, view, batch_size=8)))
  assert batch["image"].shape[:2] == (8, 3)  # scales 64, 96 and the full views' 72
  # The step runs each scale on its own padded shape, not on the largest scale's.
  shapes = steps._per_scale_shapes(data_cfg, view, batch["image"].shape[2:4])
  assert len(set(shapes)) == 3 and max(shapes) == batch["image"].shape[2:4]
