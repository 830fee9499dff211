"""What changes over training: each epoch's input size (docs/paper.md §3), and the learning rate.

Both are pure functions of the config and the epoch or step, so a resumed run and every
process of a multi-host run agree on them without saving or communicating anything.
"""

from __future__ import annotations

import numpy as np
import optax


def epoch_size(train_cfg, epoch: int, seed: int) -> int:
  """The training input size of `epoch` (crop mode).

  "single": sizes[0]; "alternate": sizes[epoch % len(sizes)], one full epoch per size (the
  paper's 224/180 multi-size training); "uniform": drawn uniformly from size_range (multiples of
  size_step), from a generator seeded by (seed, epoch).
  """
  if train_cfg.schedule == "single":
    return int(train_cfg.sizes[0])
  if train_cfg.schedule == "alternate":
    return int(train_cfg.sizes[epoch % len(train_cfg.sizes)])
  if train_cfg.schedule == "uniform":
    lo, hi = (int(v) for v in train_cfg.size_range)
    step = int(train_cfg.get("size_step", 1))
    choices = np.arange(hi, lo - 1, -step)[::-1]  # always includes the high (base) size
    rng = np.random.default_rng([int(seed), int(epoch), 0x5177])
    return int(rng.choice(choices))
  raise ValueError(f"config.train.schedule={train_cfg.schedule!r}: must be one of "
                   "'single', 'alternate', 'uniform'")


def distinct_sizes(train_cfg, num_epochs: int, seed: int) -> list[int]:
  """Every crop size the run will use, in order of first use (= the train compilations)."""
  seen: list[int] = []
  for e in range(num_epochs):
    s = epoch_size(train_cfg, e, seed)
    if s not in seen:
      seen.append(s)
  return seen


def learning_rate_schedule(opt_cfg, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
  """Step decay (x decay_factor at each of decay_epochs) or cosine to 0, after a linear warm-up."""
  total = max(1, int(steps_per_epoch * num_epochs))
  warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
  base = float(opt_cfg.learning_rate)
  if opt_cfg.schedule == "step":
    boundaries = {int(round(e * steps_per_epoch)) - warmup: float(opt_cfg.decay_factor)
                  for e in opt_cfg.decay_epochs if round(e * steps_per_epoch) > warmup}
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif opt_cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(base, decay_steps=max(1, total - warmup))
  else:
    raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r}: must be 'step' or 'cosine'")
  if warmup <= 0:
    return main
  # Step s of the warm-up trains at base * (s + 1) / warmup: never 0, full rate at its end.
  ramp = optax.linear_schedule(base / warmup, base, max(1, warmup - 1))
  return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(opt_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and weight decay (the paper's), decay on kernels unless decay_biases."""
  def decay_mask(params):
    import jax
    return jax.tree.map(lambda p: bool(opt_cfg.decay_biases) or p.ndim > 1, params)

  parts = []
  if opt_cfg.weight_decay:
    parts.append(optax.add_decayed_weights(float(opt_cfg.weight_decay), mask=decay_mask))
  parts.append(optax.sgd(schedule, momentum=float(opt_cfg.momentum) or None,
                         nesterov=bool(opt_cfg.nesterov)))
  return optax.chain(*parts)
