"""What checkpointing costs the training loop: step time with a save every N steps, against none.

  python experiments/benchmarks/checkpoint_async.py                 # ZF-5 x0.25, 200 steps
  python experiments/benchmarks/checkpoint_async.py --every 50 --rounds 3 --sync

The run is the real loop (spp_jax.train.train_and_evaluate) on ZF-5 with width_multiplier 0.25
(1000 classes: the ImageNet head), at tiny images (64x64, batch 8) so that compute stays small
and the state (parameters and momentum, about 270 MB) dominates, fed by tests/fakes.py's
in-memory SyntheticData. Each measurement is a fresh process; the modes alternate round by
round so that they see the same machine load, and both the fastest round (the least disturbed
by other load on a shared machine) and the median are printed. The step time is the wall time between the
first and the last training record divided by the steps between them: it includes everything
a save costs the loop (the copy to the host before `save` returns, the background writes and
checksums competing for the cores), not only the time `save` blocks. --sync adds a mode that
waits for each save to finish before the next step (what saving cost before async saves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(args, every: int):
  sys.path.insert(0, os.path.join(_ROOT, "tests"))
  import fakes
  from spp_jax.train import view

  c = fakes.tiny_config()
  c.model.name = "zf5"
  c.model.width_multiplier = 0.25
  c.model.spp_levels = ((6, 6), (3, 3), (2, 2), (1, 1))
  c.model.fc_width = 4096
  c.model.dropout_rate = 0.5
  c.data.crop_size = args.size
  c.train.sizes = (args.size,)
  c.train.batch_size = args.batch
  c.train.num_epochs = 1
  c.train.log_every_steps = args.log_every
  c.train.checkpoint_every_steps = every
  c.train.keep_checkpoints = 2
  c.eval.every_epochs = 0
  c.eval.views = [view("center", "center", size=args.size)]
  return c


def _child(args) -> dict:
  from spp_jax import runtime

  runtime.configure_cpu_flags()
  sys.path.insert(0, os.path.join(_ROOT, "tests"))
  import fakes
  from spp_jax.train import checkpoint, loop
  from spp_jax.train.model import default_registry

  every = args.every if args.child in ("async", "sync") else 10 ** 9
  save, blocked = checkpoint.Checkpointer.save, []

  def timed_save(self, state, meta, data_state):
    start = time.perf_counter()
    step = save(self, state, meta, data_state)
    if args.child == "sync":  # each save finished before the next step
      self.wait()
    if meta["step"] < args.steps:  # the last save, after training, is not the loop's cost
      blocked.append(time.perf_counter() - start)
    return step
  checkpoint.Checkpointer.save = timed_save
  data = fakes.SyntheticData(num_train=args.steps * args.batch, num_eval=args.batch,
                             num_classes=1000)
  with tempfile.TemporaryDirectory(prefix="ckpt_bench_", dir=args.tmp) as workdir:
    loop.train_and_evaluate(_config(args, every), workdir, models=default_registry(), data=data)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
    saves = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                   if n.isdigit())
  train = [r for r in records if "loss" in r and "event" not in r]
  first, last = train[0], train[-1]
  step_s = (last["time"] - first["time"]) / (last["step"] - first["step"])
  import jax
  return dict(mode=args.child, step_s=step_s, window=(first["step"], last["step"]), kept=saves,
              backend=jax.default_backend(), blocked_s=blocked)


def _state_mb(args) -> float:
  """Size of the train state (parameters and optimiser state) in MB."""
  import jax
  import numpy as np

  from spp_jax.train import parallel, schedules, state as state_lib
  from spp_jax.train.model import default_registry

  c = _config(args, 1)
  tx = schedules.make_optimizer(c.optimizer, lambda count: 0.0)
  abstract = state_lib.abstract_train_state(default_registry(), c.model, 1000, 0, tx,
                                            parallel.replicated(parallel.make_mesh()))
  return sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract)
             if hasattr(x, "shape") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
             ) / 1e6


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--every", type=int, default=50, help="steps between checkpoints")
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--sync", action="store_true", help="also measure synchronous saves")
  parser.add_argument("--tmp", default=None, help="directory for the workdirs (a local disk)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(_child(args)), flush=True)
    return
  modes = ["none", "async"] + (["sync"] if args.sync else [])
  results: dict[str, list[float]] = {m: [] for m in modes}
  blocked: dict[str, list[float]] = {m: [] for m in modes}
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  passed = [a for a in sys.argv[1:] if a != "--sync"]
  for r in range(args.rounds):
    for mode in modes:
      start = time.perf_counter()
      out = subprocess.run([sys.executable, __file__, *passed, "--child", mode], env=env,
                           capture_output=True, text=True, check=False)
      line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
      if line is None:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
      got = json.loads(line[len("RESULT "):])
      results[mode].append(got["step_s"])
      blocked[mode] += got["blocked_s"]
      print(f"round {r + 1} {mode:5s}: {got['step_s'] * 1e3:8.1f} ms/step over steps "
            f"{got['window'][0]}-{got['window'][1]}, {len(got['blocked_s'])} saves blocking "
            f"{', '.join(f'{b * 1e3:.0f}' for b in got['blocked_s']) or '-'} ms "
            f"({time.perf_counter() - start:.0f} s with start-up)", flush=True)
  print(f"\nZF-5 x0.25 train state: {_state_mb(args):.0f} MB; {args.steps} steps of batch "
        f"{args.batch} at {args.size}x{args.size}, {os.cpu_count()} CPUs, backend "
        f"{got['backend']}; {args.rounds} rounds")
  for stat in (min, statistics.median):
    base = stat(results["none"])
    print(f"{stat.__name__} over rounds:")
    print(f"  no checkpoints      : {base * 1e3:8.1f} ms/step")
    for mode in modes[1:]:
      t = stat(results[mode])
      print(f"  {mode:5s} every {args.every:4d}  : {t * 1e3:8.1f} ms/step  overhead "
            f"{100 * (t / base - 1):+.1f} %")
  for mode in modes[1:]:
    b = statistics.median(blocked[mode]) if blocked[mode] else float("nan")
    print(f"{mode}: the loop waits {b * 1e3:.0f} ms per save (median of "
          f"{len(blocked[mode])} saves)")


if __name__ == "__main__":
  main()
