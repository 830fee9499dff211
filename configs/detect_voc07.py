r"""SPP-net detection on PASCAL VOC 2007 with ZF-5 (SPEC §6): train on trainval, test on test.

  python -m spp_jax.main --config configs/detect_voc07.py --workdir workdirs/voc07 \
      --config.backbone.workdir=workdirs/zf5_single
  python -m spp_jax.main --config configs/detect_voc07.py:5scales --workdir ...

Needs TFDS voc/2007 prepared as array_record (tfds build voc/2007 --file_format=array_record),
opencv-contrib-python-headless (selective search, fast mode, up to 2,000 proposals per image,
cached next to the data on the first run) and a ZF-5 classification checkpoint trained with
configs/zf5_imagenet.py in backbone.workdir (the detection run does not train ImageNet).
One scale s = 688 (short side) or, with "5scales", {480, 576, 688, 864, 1200}; SPP {6,3,2,1};
fine-tuning of fc6, fc7 and a 21-way classifier with 25 % positives per minibatch of 128;
box regression on pooled conv5 features; NMS 0.3; VOC 2007 11-point mAP (and area).
The paper reports 58.0 (1 scale) and 59.2 (5 scales) with SVMs on fc7 of its own fine-tuned
ZF-5; this config was not run here (no VOC data, no GPU): its numbers are yours to measure.

Pooled features of the training windows are cached in memory as float16 (12,800 values each):
with the caps below about 5,011 x 96 x 25.6 kB = 12 GB. The R-CNN comparison path is off
(2,000 windows x 5k images through the conv layers); turn it on with compare (and patience).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = variants - {"5scales", "compare"}
  if unknown:
    raise ValueError(f"unknown detect_voc07 variant(s) {sorted(unknown)}")
  c = ml_collections.ConfigDict()
  c.task = "detection"   # spp_jax.main runs spp_jax.detection.run for this task
  c.seed = 0
  c.compare_rcnn = "compare" in variants
  c.model = ml_collections.ConfigDict(dict(
      name="zf5", spp_levels=(6, 3, 2, 1), width_multiplier=1.0, fc_width=4096,
      dropout_rate=0.5, base_size=None))

  c.data = ml_collections.ConfigDict()
  c.data.name = "voc/2007"
  c.data.data_dir = placeholder(str)
  c.data.train_split = "trainval"
  c.data.eval_split = "test"
  c.data.num_trainval = placeholder(int)   # None: all 5,011
  c.data.num_test = placeholder(int)       # None: all 4,952
  c.data.mean = (123.68, 116.78, 103.94)   # as configs/zf5_imagenet.py
  c.data.std = (58.39, 57.12, 57.38)

  c.proposals = ml_collections.ConfigDict(dict(
      method="selective_search", mode="fast", max_per_image=2000, min_size=16, num_workers=8))
  c.features = ml_collections.ConfigDict(dict(
      scales=(480, 576, 688, 864, 1200) if "5scales" in variants else (688,),
      max_aspect=2.0, window_block=512))
  c.finetune = ml_collections.ConfigDict(dict(
      steps=300_000, batch_size=128, positive_fraction=0.25, fg_iou=0.5, bg_low=0.1,
      positives_per_image=32, negatives_per_image=64, learning_rate=1e-4, momentum=0.9,
      weight_decay=5e-4, log_every=10_000))
  c.bbox_regression = ml_collections.ConfigDict(dict(enabled=True, min_iou=0.5, lam=1000.0))
  c.detection = ml_collections.ConfigDict(dict(
      nms_iou=0.3, score_threshold=0.001, max_per_class=100, max_per_image=100))

  c.backbone = ml_collections.ConfigDict()
  c.backbone.workdir = placeholder(str)
  c.backbone.workdir = "workdirs/zf5_single"
  c.backbone.classification = placeholder(ml_collections.ConfigDict)  # never trained here
  return c
