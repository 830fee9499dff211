r"""ZF-5 with SPP on Imagenette (10 ImageNet classes, ~9.5k / 3.9k images): GPU/TPU scale.

  python -m spp_jax.main --config configs/imagenette.py --workdir workdirs/imagenette
  python -m spp_jax.main --config configs/imagenette.py:single --workdir workdirs/imagenette_single
  python -m spp_jax.main --config configs/imagenette.py:nospp --workdir workdirs/imagenette_nospp
  python -m spp_jax.main --config configs/imagenette.py:full_image --workdir workdirs/imagenette_fi
  python -m spp_jax.main --config configs/imagenette.py:tiny --workdir /tmp/imagenette_tiny

Variants (comma separated): multi (default: 224 and 180, one epoch each in turn), single,
uniform, nospp, levels=NNNN, full_image, tiny (alias runlocal: a narrow net on the embedded data
set, to check the pipeline on a CPU). Prepare the data set as array_record first (see the data
README: `imagenette/full-size-v2`). bfloat16 compute on GPU/TPU (float32 on CPU) with float32
parameters; the batch is
global and must divide over the devices (add hosts with jax.distributed, see spp_jax/main.py).
Evaluation views: centre 224 crop, the full image (short side 256), 10-view.
"""

from __future__ import annotations

from spp_jax.train import default_config, variants


def get_config(arg=None):
  c = default_config()
  c.data.name = "imagenette/full-size-v2"
  c.data.num_workers = 8

  c.train.num_epochs = 60
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500

  c.optimizer.learning_rate = 0.02
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 2

  c.eval.every_epochs = 5
  variants.apply_variants(c, arg, small_size=180, default="multi")
  if variants.is_tiny(arg):
    variants.apply_tiny(c)
  return c
