r"""ZF-5 on ImageNet-2012 with the paper's protocol (SPEC §3), SPP {6,3,2,1} by default.

  python -m spp_jax.main --config configs/zf5_imagenet.py --workdir workdirs/zf5_single
  python -m spp_jax.main --config configs/zf5_imagenet.py:multi --workdir workdirs/zf5_multi
  python -m spp_jax.main --config configs/zf5_imagenet.py:nospp --workdir workdirs/zf5_nospp
  python -m spp_jax.main --config configs/zf5_imagenet.py:levels=4321 --workdir workdirs/zf5_4321
  python -m spp_jax.main --config configs/zf5_imagenet.py:tiny --workdir /tmp/zf5_tiny  # smoke run

Variants (comma separated): single (default: 224 crops), multi (224 and 180, one epoch each in
turn), uniform (each epoch's size drawn from [180, 224]), nospp (the fixed-pool baseline),
levels=NNNN, full_image (train on whole images in padded buckets), tiny (alias runlocal: a
narrow ZF-5 on the embedded data set for a minutes-long check of the whole pipeline).

ImageNet must be prepared as array_record first (manual download; see the data README). The
paper's protocol: short side 256, 224 crops from the whole image, flips and colour alteration,
SGD momentum 0.9, weight decay 5e-4, learning rate 0.01 divided by 10 twice, 70 epochs. The
paper does not give the decay epochs or the batch size: 40/60 and 128 are our choices.
Evaluation views: centre 224 crop, the full image (short side 256), 10-view (SPEC §4).
"""

from __future__ import annotations

from spp_jax.train import defaults


def get_config(arg=None):
  c = defaults.default_config()
  c.seed = 0
  c.model.name = "zf5"
  c.model.spp_levels = (6, 3, 2, 1)
  c.model.fc_width = 4096
  c.model.dropout_rate = 0.5

  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_workers = 8
  c.data.resize_short = 256
  c.data.crop_size = 224
  c.data.flip = True
  c.data.color_jitter = 0.1  # "colour alteration" (the paper cites Krizhevsky's PCA lighting)
  c.data.full_image.short_side = 256
  c.data.full_image.buckets = ((256, 256), (256, 320), (320, 256), (256, 384), (384, 256),
                               (256, 448), (448, 256))

  c.train.batch_size = 128
  c.train.num_epochs = 70
  c.train.sizes = (224,)
  c.train.schedule = "single"
  c.train.size_range = (180, 224)
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2000
  c.train.keep_checkpoints = 3

  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = (40, 60)
  c.optimizer.decay_factor = 0.1

  c.eval.batch_size = 128
  c.eval.every_epochs = 10
  c.eval.views = [
      defaults.view("center", "center", size=224),
      defaults.view("full", "full", short_side=256),
      defaults.view("ten_view", "ten_view", size=224),
  ]
  defaults.apply_variants(c, arg, small_size=180)
  if defaults.is_tiny(arg):
    defaults.apply_tiny(c)
  return c

