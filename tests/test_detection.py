"""Detection pipeline pieces: scenes, proposals, window features, labels, box regression,
detections, TFDS voc reading (mock data), and a tiny end-to-end run."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from spp_jax import models
from spp_jax.detection import proposals as P
from spp_jax.detection import scenes as S
from spp_jax.detection.bbox_regression import fit_box_regressor
from spp_jax.detection.evaluate import detect
from spp_jax.detection.features import WindowFeatures
from spp_jax.detection.head import label_windows
from spp_jax.ops.boxes import encode_boxes, project_boxes
from spp_jax.ops.spp import spatial_pyramid_pool

FMNIST = "/usr/share/datasets/fashion-mnist"


def _items(n=40, seed=0):
  rng = np.random.default_rng(seed)
  items = np.zeros((n, 28, 28), np.uint8)
  for i in range(n):   # blobs: a visible square of random size
    a, b = sorted(rng.integers(2, 26, 2))
    items[i, a:b + 2, a:b + 2] = 200
  return items, rng.integers(0, 10, n).astype(np.int32)


def test_scenes_are_deterministic_and_boxes_valid(tmp_path):
  items, labels = _items()
  opts = S.SceneOptions(min_side=64, max_side=96, item_side=(16, 40))
  a = S.build_scenes(items, labels, 6, seed=3, split="train", opts=opts)
  b = S.build_scenes(items, labels, 6, seed=3, split="train", opts=opts)
  c = S.build_scenes(items, labels, 6, seed=3, split="test", opts=opts)
  for i in range(6):
    np.testing.assert_array_equal(a.images[i], b.images[i])
    np.testing.assert_array_equal(a.boxes[i], b.boxes[i])
    h, w = a.images[i].shape[:2]
    assert 64 <= min(h, w) and max(h, w) <= 96 and a.images[i].dtype == np.uint8
    assert 1 <= len(a.boxes[i]) <= 4 and len(a.labels[i]) == len(a.boxes[i])
    bx = a.boxes[i]
    assert ((bx[:, 0] >= 0) & (bx[:, 1] >= 0) & (bx[:, 2] <= w) & (bx[:, 3] <= h)
            & (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])).all()
  assert any(not np.array_equal(a.images[i], c.images[i]) for i in range(6))
  path = str(tmp_path / "s.npz")
  a.save(path)
  r = S.Scenes.load(path)
  assert len(r) == 6 and r.class_names == S.CLASS_NAMES
  for i in range(6):
    np.testing.assert_array_equal(r.images[i], a.images[i])
    np.testing.assert_array_equal(r.boxes[i], a.boxes[i])
    np.testing.assert_array_equal(r.labels[i], a.labels[i])


def test_item_box_is_tight():
  item = np.zeros((28, 28), np.uint8)
  item[10:18, 4:20] = 255
  opts = S.SceneOptions(min_side=64, max_side=64, max_aspect=1.0, items=(1, 1),
                        item_side=(28, 28), fragments=(0, 0), noise_std=0.0)
  scene = S.compose_scene(item[None], np.array([3]), item[None], np.random.default_rng(0), opts)
  (x0, y0, x1, y1), = scene["boxes"]
  assert (x1 - x0, y1 - y0) == (16, 8) and scene["labels"].tolist() == [3]


def test_scene_boxes_are_the_tight_boxes_of_the_visible_item_pixels():
  """Items of 28 pixels are pasted unresized, so an item pixel is either fully the item's colour
  or untouched background. The item pixels are where the scene differs from the same scene
  drawn with blank items (the background is drawn before the items, from the same generator).
  Every box, (x0, y0, x1, y1) ends exclusive, must be exactly those pixels: items here are
  non-square rectangles, so swapping x and y fails."""
  rng = np.random.default_rng(5)
  items = np.zeros((40, 28, 28), np.uint8)
  for k in range(40):
    top, left = rng.integers(0, 10, 2)
    items[k, top:top + rng.integers(6, 18), left:left + rng.integers(6, 18)] = 255
  labels = np.arange(40) % 10
  opts = S.SceneOptions(min_side=96, max_side=128, items=(4, 4), item_side=(28, 28),
                        max_overlap=0.0, fragments=(0, 0), noise_std=0.0)
  checked = 0
  for seed in range(10):
    pick = np.random.default_rng(seed).choice(40, 4, replace=False)
    scene = S.compose_scene(items[pick], labels[pick], items[:0], np.random.default_rng(seed), opts)
    blank = S.compose_scene(np.zeros_like(items[pick]), labels[pick], items[:0],
                            np.random.default_rng(seed), opts)
    assert len(blank["boxes"]) == 0
    drawn = np.abs(scene["image"].astype(int) - blank["image"].astype(int)).max(-1) > 0
    covered = np.zeros_like(drawn)
    for x0, y0, x1, y1 in scene["boxes"].astype(int):
      assert drawn[y0:y1, x0:x1].all()        # a rectangle item fills its box
      covered[y0:y1, x0:x1] = True
      checked += 1
    np.testing.assert_array_equal(drawn, covered)   # and nothing is drawn outside the boxes
  assert checked >= 20


def test_scene_options_from_config():
  cfg = ml_collections.ConfigDict(dict(scenes=dict(items=[1, 2], min_side=50)))
  assert S.scene_options(cfg).items == (1, 2)
  with pytest.raises(ValueError, match="unknown data.scenes"):
    S.scene_options(ml_collections.ConfigDict(dict(scenes=dict(bogus=1))))


def test_sliding_windows_and_recall():
  boxes = P.sliding_windows((64, 96), sizes=(32,), aspects=(1.0,), overlap=0.5)
  assert len(boxes) == 3 * 5   # y: 0, 16, 32; x: 0, 16, ..., 64
  assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
  gt = [np.array([[0, 0, 32, 32], [60, 30, 90, 60]], np.float32)]
  assert P.recall([boxes], gt, 0.5) == 1.0
  assert P.recall([boxes[:1]], gt, 0.5) == 0.5
  with pytest.raises(ValueError, match="method"):
    P.compute_proposals([np.zeros((8, 8, 3), np.uint8)], "edge_boxes")


def test_selective_search_when_installed():
  pytest.importorskip("cv2")
  items, labels = _items()
  scene = S.build_scenes(items, labels, 1, seed=0, split="train",
                         opts=S.SceneOptions(min_side=80, max_side=96))
  image = scene.images[0]
  boxes = P.selective_search(image, max_proposals=50, min_size=4)
  h, w = image.shape[:2]
  assert 0 < len(boxes) <= 50 and boxes.dtype == np.float32
  assert ((boxes[:, 2] <= w) & (boxes[:, 3] <= h) & (boxes[:, 2] - boxes[:, 0] >= 4)).all()
  assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_label_windows_hand_case():
  gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  boxes = np.array([[0, 0, 10, 10],      # IoU 1 with gt 0 -> class 4 + 1
                    [20, 20, 30, 35],    # IoU 100/150 with gt 1 -> class 7 + 1
                    [0, 0, 10, 25],      # IoU 0.4 -> negative
                    [5, 5, 40, 40],      # best IoU 100/1225 with gt 1 < 0.1 -> unused
                    [50, 50, 60, 60]],   # IoU 0 -> unused
                   np.float32)
  labels, iou, best = label_windows(boxes, gt, np.array([4, 7]))
  np.testing.assert_allclose(iou[:3], [1.0, 100 / 150, 100 / 250], rtol=1e-6)
  np.testing.assert_array_equal(labels, [5, 8, 0, -1, -1])
  np.testing.assert_array_equal(best[:3], [0, 1, 0])


def _small_model(seed=0):
  return models.create("small", num_classes=3, rngs=nnx.Rngs(params=seed, dropout=1),
                       fc_width=16, dropout_rate=0.0)


def test_window_features_equal_spp_of_the_projected_cells():
  model = _small_model()
  model.eval()
  feats = WindowFeatures(model, (64,), (0, 0, 0), (1, 1, 1), max_aspect=1.5, window_block=8)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (64, 80, 3)).astype(np.uint8)
  boxes = np.array([[0, 0, 80, 64], [8, 8, 40, 30], [30, 20, 70, 60], [0, 0, 9, 9]], np.float32)
  pooled = feats.spp(image, boxes)
  fmap, _ = model.features(jnp.asarray(image, jnp.float32)[None])
  windows = project_boxes(boxes, model.feature_stride, model.feature_size((64, 80)))
  for r, (y0, x0, y1, x1) in enumerate(windows):
    ref = spatial_pyramid_pool(fmap[:, y0:y1, x0:x1], model.spp.levels)[0]
    np.testing.assert_allclose(pooled[r], ref, rtol=1e-5, atol=1e-5)
  # R-CNN path: same feature length, one vector per window.
  assert feats.rcnn(image, boxes, batch=4).shape == pooled.shape


def test_window_features_pick_the_scale_closest_to_base_size():
  model = _small_model()
  model.eval()
  feats = WindowFeatures(model, (64, 128), (0, 0, 0), (1, 1, 1), max_aspect=1.0, window_block=8)
  image = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
  # base 64: a 64x64 box is right at scale 64 (factor 1), a 32x32 box at scale 128 (factor 2).
  boxes = np.array([[0, 0, 64, 64], [16, 16, 48, 48]], np.float32)
  pooled = feats.spp(image, boxes)
  maps, valid, factors = feats.conv_maps(image)
  np.testing.assert_allclose(factors, [[1, 1], [2, 2]])
  w0 = project_boxes(boxes[:1], 8, tuple(valid[0]))[0]
  w1 = project_boxes(boxes[1:] * 2, 8, tuple(valid[1]))[0]
  for r, (k, (y0, x0, y1, x1)) in enumerate([(0, w0), (1, w1)]):
    ref = spatial_pyramid_pool(maps[k][:, y0:y1, x0:x1], model.spp.levels)[0]
    np.testing.assert_allclose(pooled[r], ref, rtol=1e-5, atol=1e-5)


def test_box_regressor_recovers_a_linear_map():
  rng = np.random.default_rng(0)
  n, d = 300, 12
  xy = rng.uniform(0, 50, (n, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(20, 40, (n, 2))], 1).astype(np.float32)
  true_w = rng.normal(size=(d, 4)) * 0.05
  feats = rng.normal(size=(n, d)).astype(np.float32)
  deltas = feats @ true_w
  from spp_jax.ops.boxes import decode_boxes
  gts = np.asarray(decode_boxes(boxes, deltas.astype(np.float32)))
  classes = np.zeros(n, np.int64)
  reg = fit_box_regressor(feats, boxes, gts, classes, np.ones(n), 2, lam=1e-3)
  assert reg.fitted.tolist() == [True, False]
  pred = reg.deltas(feats)
  np.testing.assert_allclose(pred[:, 0], encode_boxes(boxes, gts), atol=1e-3)
  np.testing.assert_array_equal(pred[:, 1], 0)      # unfitted class: boxes stay
  refined = reg.refine(feats, boxes)
  np.testing.assert_allclose(refined[:, 0], gts, atol=0.1)
  np.testing.assert_allclose(refined[:, 1], boxes, atol=1e-4)


def test_detect_applies_per_class_nms_and_thresholds():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40], [0, 0, 10, 10]],
                   np.float32)
  probs = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.3, 0.0, 0.7], [0.995, 0.0, 0.005]])
  out = detect(probs, boxes, (50, 50), nms_iou=0.3, score_threshold=0.01)
  # Class 0: box 1 suppressed by box 0 (IoU 0.68); class 1: box 2; box 3 below threshold.
  np.testing.assert_array_equal(out["labels"], [0, 1])
  np.testing.assert_allclose(out["scores"], [0.9, 0.7])
  np.testing.assert_array_equal(out["boxes"], boxes[[0, 2]])
  refined = np.repeat(boxes[:, None], 2, 1) + 100   # outside the image: clipped
  out = detect(probs, boxes, (50, 50), refined=refined, score_threshold=0.5)
  assert (out["boxes"] == 50).all()


def test_voc_records_through_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  from spp_jax.data import _tfds_compat

  _tfds_compat.install()
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = [tfds.builder("voc/2007").as_data_source(split="test")[i] for i in range(3)]
  # Mock sequences have independent random lengths; real VOC records are parallel arrays.
  assert "bbox" in raw[0]["objects"] and "is_difficult" in raw[0]["objects"]
  with pytest.raises(ValueError, match="record 0: objects have"):
    S.scenes_from_tfds([r for r in raw if len({len(v) for k, v in r["objects"].items()
                                               if k in ("bbox", "label", "is_difficult")}) > 1],
                       ["x"] * 20)
  fixed = []
  for r in raw:
    o = r["objects"]
    n = min(len(o["bbox"]), len(o["label"]), len(o["is_difficult"]))
    fixed.append(dict(r, objects=dict(o, bbox=o["bbox"][:n], label=o["label"][:n],
                                      is_difficult=o["is_difficult"][:n])))
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: fixed):
    cfg = ml_collections.ConfigDict(dict(name="voc/2007", data_dir=None, num_test=2))
    scenes = S.load_scenes(cfg, "test")
  assert len(scenes) == 2 and scenes.num_classes == 20 and scenes.class_names[0] == "aeroplane"
  for i in range(2):
    h, w = scenes.images[i].shape[:2]
    bbox = fixed[i]["objects"]["bbox"]
    np.testing.assert_allclose(scenes.boxes[i][:, 0], np.clip(bbox[:, 1] * w - 1, 0, w),
                               rtol=1e-5)
    np.testing.assert_allclose(scenes.boxes[i][:, 3], np.clip(bbox[:, 2] * h, 0, h), rtol=1e-5)
    np.testing.assert_array_equal(scenes.difficult[i], fixed[i]["objects"]["is_difficult"])


def test_voc_pixel_convention_hand_case():
  # VOC xmin=1..xmax=10 (10 pixels), ymin=5..ymax=8 on a 20x40 (h x w) image.
  rec = dict(image=np.zeros((20, 40, 3), np.uint8),
             objects=dict(bbox=np.array([[5 / 20, 1 / 40, 8 / 20, 10 / 40]], np.float32),
                          label=np.array([2]), is_difficult=np.array([True])))
  s = S.scenes_from_tfds([rec], ["a", "b", "c"])
  np.testing.assert_allclose(s.boxes[0], [[0, 4, 10, 8]], atol=1e-5)
  assert s.difficult[0].tolist() == [True] and s.labels[0].tolist() == [2]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the Fashion-MNIST idx files")
def test_tiny_end_to_end_beats_an_untrained_head(tmp_path):
  import importlib.util

  from spp_jax.detection import run

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "detect_demo.py")
  spec = importlib.util.spec_from_file_location("detect_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny,nocompare,sliding")
  config.data.data_dir = str(tmp_path / "data")
  results = run(config, str(tmp_path / "work"), log=lambda m: None)
  with open(tmp_path / "work" / "results.json") as f:
    saved = json.load(f)
  assert saved["map_11point"] == pytest.approx(results["map_11point"])
  spp = results["spp"]
  assert spp["train_windows"]["positive"] > 0 and spp["train_windows"]["negative"] > 0
  assert spp["finetune_loss"]["last"] < spp["finetune_loss"]["first"]
  assert spp["map_11point"] > spp["untrained"]["map_11point"] + 0.05


def test_a_workdir_in_use_is_refused_before_anything_is_written(tmp_path):
  from spp_jax.detection import run
  from spp_jax.errors import WorkdirLockedError
  from spp_jax.train.lock import WorkdirLock

  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "results.json").write_text("{}")  # an earlier run's
  config = ml_collections.ConfigDict({"data": {"name": "never read"}})
  with WorkdirLock(workdir):
    with pytest.raises(WorkdirLockedError, match="in use"):
      run(config, str(workdir), log=lambda m: None)
  assert sorted(os.listdir(workdir)) == ["results.json"]


def test_backbone_comes_from_a_classification_run_by_name(tmp_path):
  """load_backbone copies every conv and fc layer of a classification checkpoint and keeps the
  detection model's own (classes + 1)-way classifier."""
  import jax

  from spp_jax.detection.run import build_model, load_backbone
  from spp_jax.train.checkpoint import load_params
  from workdirs import demo_config, untrained_run

  cls = demo_config("tiny")
  workdir = untrained_run(tmp_path / "cls", cls)
  det = build_model(cls.model, num_classes=11, seed=7)
  before = nnx.to_pure_dict(nnx.state(det, nnx.Param))
  logs = []
  assert load_backbone(det, dict(workdir=workdir), log=logs.append) == workdir
  after = nnx.to_pure_dict(nnx.state(det, nnx.Param))
  saved = load_params(workdir)
  np.testing.assert_array_equal(after["fc6"]["kernel"], saved["fc6"]["kernel"])
  np.testing.assert_array_equal(after["conv1"]["conv"]["kernel"],
                                saved["conv1"]["conv"]["kernel"])
  for a, b in zip(jax.tree.leaves(after["classifier"]), jax.tree.leaves(before["classifier"])):
    np.testing.assert_array_equal(a, b)
  assert "classifier" in logs[-1]
