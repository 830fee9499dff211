r"""Demo: the "small" SPP network on the embedded multi-scale Fashion-MNIST, multi-size training.

  make demo
  python -m spp_jax.main --config configs/demo.py --workdir workdirs/demo
  python -m spp_jax.main --config configs/demo.py:single --workdir workdirs/demo_single
  python -m spp_jax.main --config configs/demo.py:nospp --workdir workdirs/demo_nospp
  python -m spp_jax.main --config configs/demo.py:tiny --workdir /tmp/demo_tiny  # seconds

Fits in 10 minutes on 2 CPU cores, data set preparation included. The images are 40-160 pixels a
side with the item at varied scales and positions, so size and scale really vary. Training: 64
crops (short side resized to 72) and the same crops at 48, one epoch each in turn (the paper's
multi-size training at this scale, 64/48 ~ 224/180), SGD momentum with a cosine schedule.
Evaluation views: the centre 64 crop, the full image (short side 72, padded buckets, each image
pooled over its own map), and 10-view (centre and corner crops with flips, scores averaged).

Variants (comma separated): multi (default), single, uniform, nospp, levels=NNN, full_image,
feature_views (also multi-view testing on feature maps: 98 views, ~18x the 10-view's cost),
tiny (alias runlocal: the data set's "tiny" configuration, one short epoch).
"""

from __future__ import annotations

from spp_jax.train import default_config, variants


def get_config(arg=None):
  c = default_config()
  c.model.name = "small"  # Its own levels {4, 2, 1} and fc width 256 (models/small.py).
  # The paper's 0.5 slows learning too much for a few minutes of training at this width.
  c.model.dropout_rate = 0.25

  c.data.name = "multiscale_fashion_mnist/small"
  c.data.eval_split = "test"
  c.data.resize_short = 72
  c.data.crop_size = 64
  c.data.color_jitter = 0.0
  c.data.mean = (128.0, 128.0, 128.0)
  c.data.std = (64.0, 64.0, 64.0)
  c.data.full_image.short_side = 72
  # Five padded shapes (five eval compilations); wider images shrink to fit (aspect <= 2.5).
  c.data.full_image.buckets = ((72, 72), (72, 112), (112, 72), (72, 180), (180, 72))

  c.train.batch_size = 32
  c.train.num_epochs = 8
  c.train.size_range = (48, 64)
  c.train.log_every_steps = 100
  c.train.keep_checkpoints = 2

  c.optimizer.learning_rate = 0.02
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 0.25

  c.eval.batch_size = 100
  c.eval.every_epochs = 0
  variants.apply_variants(c, arg, small_size=48, default="multi")
  if variants.is_tiny(arg):
    c.data.name = "multiscale_fashion_mnist/tiny"
    c.train.num_epochs = 2 if len(c.train.sizes) > 1 else 1
    c.train.log_every_steps = 4
    c.optimizer.warmup_epochs = 0
    c.eval.batch_size = 32
  return c
