r"""ZF-5 on ImageNet-2012 with the paper's protocol (docs/paper.md §3), SPP {6,3,2,1} by default.

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
Evaluation views: centre 224 crop, the full image (short side 256), 10-view (docs/paper.md §4).
"""

from __future__ import annotations

from spp_jax.train import default_config, variants


def get_config(arg=None):
  c = default_config()  # The paper's protocol with ZF-5 and SPP {6, 3, 2, 1}.
  c.data.num_workers = 8
  c.data.full_image.buckets = ((256, 256), (256, 320), (320, 256), (256, 384), (384, 256),
                               (256, 448), (448, 256))
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2000
  variants.apply_variants(c, arg, small_size=180)
  if variants.is_tiny(arg):
    variants.apply_tiny(c)
  return c
