r"""Transfer: Oxford Flowers-102 fine-tuned from an Imagenette run of ZF-5 with SPP.

  python -m spp_jax.main --config configs/imagenette.py --workdir workdirs/imagenette
  python -m spp_jax.main --config configs/flowers_from_imagenette.py --workdir workdirs/flowers
  python -m spp_jax.main --config configs/flowers_from_imagenette.py \
      --workdir workdirs/flowers_30k --config.init_from=workdirs/imagenette \
      --config.init_from_step=30000
  python -m spp_jax.main --config configs/imagenette.py:tiny --workdir /tmp/imagenette_tiny
  python -m spp_jax.main --config configs/flowers_from_imagenette.py:tiny \
      --workdir /tmp/flowers_tiny  # init_from=/tmp/imagenette_tiny: the same 10 classes

config.init_from names the Imagenette workdir (default workdirs/imagenette, its latest
checkpoint; init_from_step picks another). Its conv and fc parameters are copied by name; the
10-way classifier becomes a new 102-way one (logged in metrics.jsonl as an "init_from" event);
any other difference, e.g. another width or pyramid, is refused naming the parameters, so the
network keys here are imagenette.py's own for the same variant (`:single`, `:levels=4321`,
`:tiny`, ... as for imagenette.py). Fine-tuning: the whole network at a tenth of the source
run's learning rate, 30 epochs with a cosine schedule, multi-size (224/180) as in the source.

Data: TFDS `oxford_flowers102` (1,020 train, 1,020 validation, 6,149 test images; prepare it
as array_record first: python -m spp_jax.data.prepare --dataset oxford_flowers102). The paper
(docs/paper.md §5) transfers ImageNet features to Caltech-101 and VOC the same way, with SVMs on
fixed features instead of fine-tuning.
"""

from __future__ import annotations

from spp_jax import configs
from spp_jax.train import variants


def get_config(arg=None):
  c = configs.load("imagenette.py", arg, relative_to=__file__)  # the source run's network
  c.init_from = "workdirs/imagenette"
  if variants.is_tiny(arg):  # the embedded data set: 10 classes, so the classifier is copied
    c.init_from = "/tmp/imagenette_tiny"
    return c
  c.data.name = "oxford_flowers102"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_workers = 8

  c.train.batch_size = 64
  c.train.num_epochs = 30
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 200

  c.optimizer.learning_rate = 0.002
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 1

  c.eval.batch_size = 64
  c.eval.every_epochs = 5
  return c
