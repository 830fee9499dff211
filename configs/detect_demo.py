r"""Detection demo: SPP-net on embedded Fashion-MNIST scenes, against R-CNN on the same windows.

  python -m spp_jax.main --config configs/detect_demo.py --workdir workdirs/detect_demo
  python -m spp_jax.main --config configs/detect_demo.py:5scales --workdir ...
  python -m spp_jax.main --config configs/detect_demo.py:tiny --workdir /tmp/det_tiny

Scenes of 160-224 pixels with 2-4 Fashion-MNIST items each (10 classes); selective search
(fast) proposals; the "small" network (stride 8, SPP {4, 2, 1}, fc 256) whose conv and fc
layers come from a classification checkpoint in backbone.workdir: if there is none, a short
single-size run of configs/demo.py is trained there first (reused on the next run; pass
--config.backbone.workdir=workdirs/demo to use the full classification demo instead). Then
fc6, fc7 and an 11-way classifier are fine-tuned on pooled window features, box regression is
fitted, and VOC 2007 mAP is reported for the SPP-net path and the R-CNN path.

Variants (comma separated): 5scales (five image scales instead of one), nocompare (skip the
R-CNN path), sliding (sliding-window proposals, no OpenCV), tiny (seconds: 48/16 images of two
classes, random backbone, 400 steps; for tests).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections.config_dict import placeholder

_HERE = os.path.dirname(os.path.abspath(__file__))


def _classification_config(epochs: int):
  spec = importlib.util.spec_from_file_location("_demo_config", os.path.join(_HERE, "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("single")
  c.train.num_epochs = epochs
  c.eval.views = [v for v in c.eval.views if v.name == "center"]
  return c


def get_config(arg=None):
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = variants - {"5scales", "nocompare", "sliding", "tiny"}
  if unknown:
    raise ValueError(f"unknown detect_demo variant(s) {sorted(unknown)}")
  c = ml_collections.ConfigDict()
  c.task = "detection"   # spp_jax.main runs spp_jax.detection.run for this task
  c.seed = 0
  c.compare_rcnn = "nocompare" not in variants

  backbone_cls = _classification_config(epochs=5)
  c.model = ml_collections.ConfigDict(dict(
      name=backbone_cls.model.name, spp_levels=tuple(backbone_cls.model.spp_levels),
      width_multiplier=backbone_cls.model.width_multiplier,
      fc_width=backbone_cls.model.fc_width, dropout_rate=backbone_cls.model.dropout_rate,
      base_size=None))

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist_detection"
  c.data.data_dir = placeholder(str)    # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.source_dir = placeholder(str)  # None: /usr/share/datasets/fashion-mnist
  c.data.seed = 0
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_train = 300
  c.data.num_test = 150
  c.data.mean = tuple(backbone_cls.data.mean)
  c.data.std = tuple(backbone_cls.data.std)
  c.data.scenes = ml_collections.ConfigDict(dict(
      min_side=160, max_side=224, max_aspect=1.5, items=(2, 4), item_side=(28, 96),
      max_overlap=0.15, fragments=(1, 4), noise_std=6.0, classes=None))

  c.proposals = ml_collections.ConfigDict(dict(
      method="sliding" if "sliding" in variants else "selective_search", mode="fast",
      max_per_image=2000, min_size=8, num_workers=2))

  c.features = ml_collections.ConfigDict(dict(
      scales=(128, 160, 192, 240, 288) if "5scales" in variants else (192,),
      max_aspect=1.5, window_block=128))

  c.finetune = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=128, positive_fraction=0.25, fg_iou=0.5, bg_low=0.1,
      positives_per_image=placeholder(int), negatives_per_image=48, learning_rate=0.01,
      momentum=0.9, weight_decay=5e-4, log_every=500))
  c.bbox_regression = ml_collections.ConfigDict(dict(enabled=True, min_iou=0.5, lam=1000.0))
  c.detection = ml_collections.ConfigDict(dict(
      nms_iou=0.3, score_threshold=0.01, max_per_class=100, max_per_image=100))

  c.backbone = ml_collections.ConfigDict()
  c.backbone.workdir = placeholder(str)
  c.backbone.workdir = "workdirs/detect_demo_backbone"
  c.backbone.classification = backbone_cls

  if "tiny" in variants:
    # Seconds: two classes (trouser, bag), a random backbone (conv features of random filters
    # still localise and separate two shapes; their larger norms need a smaller rate).
    c.data.num_train = 48
    c.data.num_test = 16
    c.data.scenes.classes = (1, 8)
    c.proposals.max_per_image = 300
    c.proposals.num_workers = 1
    c.finetune.steps = 400
    c.finetune.batch_size = 64
    c.finetune.learning_rate = 0.001
    c.finetune.log_every = 0
    c.backbone.workdir = None
  return c
