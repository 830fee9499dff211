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

from spp_jax.detection import defaults

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
  variants = defaults.parse_variants(arg, ("5scales", "nocompare", "sliding", "tiny"),
                                     "detect_demo")
  c = defaults.default_config()   # the paper's detection settings, resized below
  c.compare_rcnn = "nocompare" not in variants

  backbone_cls = _classification_config(epochs=5)
  # The backbone's own network keys (None: the architecture's default, as in training).
  for key in ("name", "spp_levels", "width_multiplier", "fc_width", "dropout_rate"):
    c.model[key] = backbone_cls.model.get(key)

  c.data.name = "fashion_mnist_detection"
  c.data.source_dir = placeholder(str)  # None: /usr/share/datasets/fashion-mnist
  c.data.seed = 0
  c.data.num_train = 300
  c.data.num_test = 150
  c.data.mean = tuple(backbone_cls.data.mean)
  c.data.std = tuple(backbone_cls.data.std)
  c.data.scenes = ml_collections.ConfigDict(dict(
      min_side=160, max_side=224, max_aspect=1.5, items=(2, 4), item_side=(28, 96),
      max_overlap=0.15, fragments=(1, 4), noise_std=6.0, classes=None))

  if "sliding" in variants:
    c.proposals.method = "sliding"
  c.proposals.min_size = 8
  c.proposals.num_workers = 2
  c.features.scales = (128, 160, 192, 240, 288) if "5scales" in variants else (192,)
  c.features.max_aspect = 1.5
  c.features.window_block = 128
  c.finetune.update(dict(steps=1500, positives_per_image=None, negatives_per_image=48,
                         learning_rate=0.01, log_every=500))
  c.detection.score_threshold = 0.01
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
