r"""SPP-net detection on PASCAL VOC 2007 with ZF-5 (docs/paper.md §6): train on trainval, test
on test.

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
with the default caps (32 positives and 64 negatives per image) about 5,011 x 96 x 25.6 kB
= 12 GB. The R-CNN comparison path is off
(2,000 windows x 5k images through the conv layers); turn it on with compare (and patience).
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from spp_jax.detection import defaults


def get_config(arg=None):
  variants = defaults.parse_variants(arg, ("5scales", "compare"), "detect_voc07")
  c = defaults.default_config()   # ZF-5, SPP {6,3,2,1} and the paper's detection settings
  c.compare_rcnn = "compare" in variants

  c.data.name = "voc/2007"
  c.data.train_split = "trainval"
  c.data.num_trainval = placeholder(int)   # None: all 5,011
  c.data.num_test = placeholder(int)       # None: all 4,952
  c.data.mean = (123.68, 116.78, 103.94)   # as configs/zf5_imagenet.py
  c.data.std = (58.39, 57.12, 57.38)

  if "5scales" in variants:
    c.features.scales = defaults.PAPER_SCALES
  c.backbone.workdir = "workdirs/zf5_single"   # never trained here: bring a checkpoint
  return c
