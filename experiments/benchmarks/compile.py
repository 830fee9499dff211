r"""Compilations of a multi-size run, cold and warm persistent cache; loop vs bare step time.

  python experiments/benchmarks/compile.py                 # both parts
  python experiments/benchmarks/compile.py --part compile  # cold vs warm cache only
  python experiments/benchmarks/compile.py --part loop     # loop step time vs bare jitted step

Part "compile": the trainer runs `--epochs` epochs of the real `--model` with training sizes
`--sizes` (schedule "alternate", one epoch each) and one centre-crop eval view, in a fresh
subprocess each time: first with an empty temporary compilation cache (cold), then again with
the same cache and a new workdir (warm). Input is SyntheticData (in memory) so data preparation
does not blur the numbers. Printed per run: compilations of the train/eval steps against the
distinct input shapes; how many of all programs (init, train and eval steps) JAX's persistent
compilation cache served; seconds spent tracing, lowering and compiling (or loading) them; and
the time from process start to the end of the first training step. Goal: compilations ==
distinct shapes.

Part "loop": in this process, the median step time the trainer logs (metrics.jsonl, compile and
checkpoint time excluded) against the same jitted step called back to back on one device batch,
alternated `--repeats` times. The loop's input is pre-built batches, so the difference is the
loop's own host work (batch to global array, dispatch, iterator state, metrics). Goal: within
10 %.
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

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(_REPO, "tests"))  # fakes.py: the in-memory data fake


def _config(args, workdir_cache: str | None):
  import fakes
  from spp_jax.train import view

  sizes = tuple(int(s) for s in args.sizes.split(","))
  c = fakes.tiny_config(**{
      "model.name": args.model, "model.spp_levels": None, "model.fc_width": args.fc_width,
      "model.width_multiplier": args.width, "data.crop_size": sizes[0],
      "train.batch_size": args.batch, "train.num_epochs": args.epochs, "train.sizes": sizes,
      "train.schedule": "alternate" if len(sizes) > 1 else "single",
      "train.log_every_steps": max(1, args.steps // 2), "train.checkpoint_every_steps": 10_000,
      "eval.batch_size": args.batch, "eval.every_epochs": 0,
      "eval.views": [view("center", "center", size=sizes[0])]})
  c.compilation_cache_dir = workdir_cache
  return c


def _synthetic(args):
  import fakes
  return fakes.SyntheticData(num_train=args.batch * args.steps, num_eval=args.batch,
                             num_classes=10)


# ----------------------------------------------------------------------------- compile part


def worker(args):
  """Runs one training in this (fresh) process; the parent reads workdir/metrics.jsonl."""
  import fakes
  from spp_jax import models, runtime
  from spp_jax.train import train_and_evaluate

  runtime.configure_cpu_flags()  # As spp_jax.main does.
  train_and_evaluate(_config(args, args.cache_dir), args.workdir, models=models,
                     data=_synthetic(args))


def _run_worker(args, cache_dir: str, workdir: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--cache-dir", cache_dir,
         "--workdir", workdir, "--model", args.model, "--sizes", args.sizes,
         "--epochs", str(args.epochs), "--steps", str(args.steps), "--batch", str(args.batch),
         "--width", str(args.width), "--fc-width", str(args.fc_width)]
  start = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO)
  wall = time.time() - start
  if proc.returncode:
    raise RuntimeError(f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  compiles = [r for r in records if r.get("event") == "compile"]
  first = next(r for r in records if r.get("event") == "first_step")
  return dict(
      programs=len(compiles), loaded=sum(bool(r.get("cache_hit")) for r in compiles),
      train_compiles=sum(r["fn"] == "train_step" for r in compiles),
      eval_compiles=sum(r["fn"].startswith("eval_step") for r in compiles),
      train_shapes=len({r["shapes"] for r in compiles if r["fn"] == "train_step"}),
      compile_s=sum(r["seconds"] for r in compiles),
      first_step_s=first["time"] - start, first_step_in_run_s=first["seconds_since_start"],
      wall_s=wall)


def compile_part(args):
  sizes = args.sizes.split(",")
  distinct = len(dict.fromkeys(sizes[e % len(sizes)] for e in range(args.epochs)))
  print(f"model {args.model} (width x{args.width}), batch {args.batch}, sizes {args.sizes}, "
        f"{args.epochs} epochs of {args.steps} steps, 1 eval view; distinct train shapes: "
        f"{distinct}, eval shapes: 1")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    for label in ("cold", "warm"):
      rows.append((label, _run_worker(args, cache, os.path.join(tmp, label))))
  print("first step: seconds from process start (in train_and_evaluate, imports excluded)")
  print(f"{'run':<5} {'train compiles':>14} {'eval compiles':>13} {'cached':>7} "
        f"{'compile s':>10} {'first step s':>20} {'wall s':>7}")
  for label, r in rows:
    first = f"{r['first_step_s']:.2f} ({r['first_step_in_run_s']:.2f})"
    loaded = f"{r['loaded']}/{r['programs']}"
    print(f"{label:<5} {r['train_compiles']:>14} {r['eval_compiles']:>13} {loaded:>7} "
          f"{r['compile_s']:>10.2f} {first:>20} {r['wall_s']:>7.1f}")
  cold, warm = rows[0][1], rows[1][1]
  print(f"compilations == distinct shapes: {cold['train_compiles'] == distinct} (cold), "
        f"{warm['train_compiles'] == distinct} (warm)")
  print(f"first step: warm {cold['first_step_s'] / warm['first_step_s']:.2f}x sooner than cold "
        f"from process start, {cold['first_step_in_run_s'] / warm['first_step_in_run_s']:.2f}x "
        f"in train_and_evaluate; compile time "
        f"{cold['compile_s'] / max(warm['compile_s'], 1e-9):.1f}x less")


# ----------------------------------------------------------------------------- loop part


class _RepeatData:
  """SyntheticData's format, but every batch of a size is one pre-built batch (no host work)."""

  def __init__(self, inner):
    self.inner = inner
    self._cache = {}

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def train_iterator(self, data_cfg, *, batch_size, image_size, epoch, seed, **kwargs):
    from fakes import EpochIterator

    key = (batch_size, image_size)
    if key not in self._cache:
      it = self.inner.train_iterator(data_cfg, batch_size=batch_size, image_size=image_size,
                                     epoch=0, seed=seed, **kwargs)
      self._cache[key] = next(it)
    batch = self._cache[key]
    n = self.inner.steps_per_epoch(data_cfg, batch_size * kwargs.get("process_count", 1),
                                   mode="crop")
    return EpochIterator(lambda b: batch, n)


def loop_part(args):
  import jax

  from spp_jax import models
  from spp_jax.train import parallel, schedules, state as state_lib
  from spp_jax.train.loop import train_and_evaluate
  from spp_jax.train.steps import make_train_step

  size = int(args.sizes.split(",")[0])
  largs = argparse.Namespace(**{**vars(args), "sizes": str(size), "epochs": 1})
  data = _RepeatData(_synthetic(largs))
  config = _config(largs, None)
  config.train.log_every_steps = 5

  # Bare: the same jitted step, same shardings, one device batch, back to back.
  mesh = parallel.make_mesh()
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  num_classes = 10
  lr = schedules.learning_rate_schedule(config.optimizer, args.steps, 1)
  tx = schedules.make_optimizer(config.optimizer, lr)
  defs = state_lib.model_defs(models, config.model, num_classes)
  from spp_jax.train.loop import augment_key

  step = jax.jit(make_train_step(defs.train, tx, use_image_sizes=False, data=config.data,
                                 augment_key=augment_key(0)),
                 in_shardings=(rep, bsh), out_shardings=(rep, rep), donate_argnums=0)
  host_batch = next(data.train_iterator(config.data, batch_size=args.batch, image_size=size,
                                        epoch=0, seed=0, mode="crop"))
  batch = parallel.to_global(host_batch, bsh)
  state = state_lib.create_train_state(models, config.model, num_classes, 0, tx, rep)
  compiled = step.lower(state, batch).compile()
  state, m = compiled(state, batch)
  jax.block_until_ready(m)

  def bare() -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.steps

  def loop(i: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
      train_and_evaluate(config, os.path.join(tmp, f"w{i}"), models=models, data=data)
      with open(os.path.join(tmp, f"w{i}", "metrics.jsonl"), encoding="utf-8") as f:
        times = [r["step_time_s"] for r in map(json.loads, f)
                 if r.get("step_time_s") is not None]
    return statistics.median(times)

  loop(-1)  # compiles (also fills the in-memory jit caches); not timed
  bare_t, loop_t = [], []
  for i in range(args.repeats):
    bare_t.append(bare())
    loop_t.append(loop(i))
  b, l = statistics.median(bare_t), statistics.median(loop_t)
  print(f"model {args.model}, batch {args.batch}, size {size}, {args.steps} steps per run, "
        f"{args.repeats} alternated repeats, {jax.device_count()} device(s)")
  print(f"bare jitted step: {1000 * b:8.1f} ms  (runs: {', '.join(f'{1000*t:.1f}' for t in bare_t)})")
  print(f"training loop   : {1000 * l:8.1f} ms  (runs: {', '.join(f'{1000*t:.1f}' for t in loop_t)})")
  print(f"loop / bare = {l / b:.3f} (goal <= 1.10)")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--part", choices=("compile", "loop", "all"), default="all")
  p.add_argument("--model", default="small")
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--fc-width", type=int, default=256)
  p.add_argument("--sizes", default="64,48,56", help="training sizes, one epoch each in turn")
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--steps", type=int, default=20, help="steps per epoch")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  p.add_argument("--cache-dir", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    import logging
    logging.basicConfig(level=logging.WARNING)
    return worker(args)
  if args.part in ("compile", "all"):
    compile_part(args)
  if args.part in ("loop", "all"):
    loop_part(args)


if __name__ == "__main__":
  sys.exit(main())
