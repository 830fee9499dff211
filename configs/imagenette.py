r"""ZF-5 with SPP on Imagenette (10 ImageNet classes, ~9.5k / 3.9k images): GPU/TPU scale.

  python -m spp_jax.main --config configs/imagenette.py --workdir workdirs/imagenette
  python -m spp_jax.main --config configs/imagenette.py:single --workdir workdirs/imagenette_single
  python -m spp_jax.main --config configs/imagenette.py:nospp --workdir workdirs/imagenette_nospp
  python -m spp_jax.main --config configs/imagenette.py:full_image --workdir workdirs/imagenette_fi
  python -m spp_jax.main --config configs/imagenette.py:tiny --workdir /tmp/imagenette_tiny

Variants (comma separated): multi (default: 224 and 180, one epoch each in turn), single,
uniform, nospp, levels=NNNN, full_image, tiny (alias runlocal: a narrow net on the embedded data
set, to check the pipeline on a CPU). Prepare the data set as array_record first (see the data
README: `imagenette/full-size-v2`). bfloat16 compute with float32 parameters; the batch is
global and must divide over the devices (add hosts with jax.distributed, see spp_jax/main.py).
Evaluation views: centre 224 crop, the full image (short side 256), 10-view.
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
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"

  c.data.name = "imagenette/full-size-v2"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_workers = 8
  c.data.resize_short = 256
  c.data.crop_size = 224
  c.data.flip = True
  c.data.color_jitter = 0.1
  c.data.full_image.short_side = 256
  c.data.full_image.buckets = ((256, 256), (256, 320), (320, 256), (256, 384), (384, 256))

  c.train.batch_size = 128
  c.train.num_epochs = 60
  c.train.sizes = (224, 180)
  c.train.schedule = "alternate"
  c.train.size_range = (180, 224)
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500
  c.train.keep_checkpoints = 3

  c.optimizer.learning_rate = 0.02
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 2

  c.eval.batch_size = 128
  c.eval.every_epochs = 5
  c.eval.views = [
      defaults.view("center", "center", size=224),
      defaults.view("full", "full", short_side=256),
      defaults.view("ten_view", "ten_view", size=224),
  ]
  defaults.apply_variants(c, arg, small_size=180, default="multi")
  if defaults.is_tiny(arg):
    defaults.apply_tiny(c)
  return c

