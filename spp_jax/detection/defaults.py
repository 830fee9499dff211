"""The detection config: every key `spp_jax.detection.run` reads, with paper-scale defaults.

Configs in `configs/detect_*.py` start from `default_config()` and set their data, network and
budget. The defaults are SPP-net's settings (docs/paper.md §6) where the paper gives them:
ZF-5 with SPP {6,3,2,1}, selective search in fast mode with up to 2,000 proposals, one scale of
688 (or PAPER_SCALES), positives at IoU >= 0.5 and negatives in [0.1, 0.5), a quarter of each
minibatch positive, box regression on windows with IoU >= 0.5, NMS at 0.3. The budget (steps,
learning rate, caps per image) is sized for PASCAL VOC 2007 (configs/detect_voc07.py).
Configs are data: nothing here reads a file or touches a device.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from spp_jax.train import config_schema

PAPER_SCALES = (480, 576, 688, 864, 1200)   # short sides of the five-scale pyramid


def parse_variants(arg, known, config_name: str) -> set:
  """The comma-separated variants of `file.py:arg`; unknown names are an error."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = variants - set(known)
  if unknown:
    raise ValueError(f"unknown {config_name} variant(s) {sorted(unknown)}")
  return variants


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "detection"   # spp_jax.main runs spp_jax.detection.run for this task
  c.seed = 0
  c.compare_rcnn = False   # also run the R-CNN path (each window through the conv layers)
  # The training schema's model keys and defaults (None: the architecture's own value).
  c.model = config_schema.default_config().model

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = placeholder(str)   # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.train_split = "train"
  c.data.eval_split = "test"

  c.proposals = ml_collections.ConfigDict(dict(
      method="selective_search", mode="fast", max_per_image=2000, min_size=16, num_workers=8))
  c.features = ml_collections.ConfigDict(dict(scales=(688,), max_aspect=2.0, window_block=512))
  c.finetune = ml_collections.ConfigDict(dict(
      steps=300_000, batch_size=128, positive_fraction=0.25, fg_iou=0.5, bg_low=0.1,
      positives_per_image=placeholder(int), negatives_per_image=64, learning_rate=1e-4,
      momentum=0.9, weight_decay=5e-4, log_every=10_000))
  c.finetune.positives_per_image = 32
  c.bbox_regression = ml_collections.ConfigDict(dict(enabled=True, min_iou=0.5, lam=1000.0))
  c.detection = ml_collections.ConfigDict(dict(
      nms_iou=0.3, score_threshold=0.001, max_per_class=100, max_per_image=100))

  c.backbone = ml_collections.ConfigDict()
  # A classification checkpoint's workdir; conv, fc6 and fc7 are copied from it.
  c.backbone.workdir = placeholder(str)
  # Trained into backbone.workdir first when it has no checkpoint (None: never).
  c.backbone.classification = placeholder(ml_collections.ConfigDict)
  return c
