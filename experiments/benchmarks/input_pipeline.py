"""Input pipeline throughput on the embedded data set, against the small network's appetite.

  python experiments/benchmarks/input_pipeline.py                      # "small" config (12k)
  python experiments/benchmarks/input_pipeline.py --config full --rounds 3
  python experiments/benchmarks/input_pipeline.py --workers 0 2 4 --batches 40

Measures, in one run and alternating round by round so every variant sees the same machine
load:
  - training batches (crop mode: short side 72, random 64 crops, flip, colour jitter, mean/std)
    in images/s, with grain workers 0 and 2 (0: the batches are made in the main process, by
    `data.prefetch` threads);
  - full-image evaluation batches (short side 72, buckets 72x72, 72x112, 112x72), images/s;
  - a training step of `spp_jax.models.create("small")` (SGD with momentum, float32) on 64x64
    batches of the same size, images/s: what a training run consumes.
The time to start the workers and produce the first batch is reported apart ("first batch"),
the rate counts the batches after it. Medians over rounds; the ratio pipeline / network is
the goal's figure (>= 3 with 2 workers). CPU ms per image (process time of this process) is
less sensitive to other jobs on a shared machine than images/s: with 0 workers it is the whole
cost of making a training image, for the network the CPU cost of consuming one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)


def data_config(args, workers: int):
  import ml_collections
  return ml_collections.ConfigDict(dict(
      name=f"multiscale_fashion_mnist/{args.config}", data_dir=args.data_dir, train_split="train",
      eval_split="test", num_workers=workers, resize_short=72, crop_size=64, flip=True,
      color_jitter=0.1, mean=(122.0, 117.0, 104.0), std=(58.0, 57.0, 57.0),
      full_image=dict(short_side=72, buckets=((72, 72), (72, 112), (112, 72))),
      bad_image="skip", small_image="resize", min_size=32, prefetch=args.prefetch))


def time_iterator(it, batches: int) -> tuple[float, float, float]:
  """(seconds to the first batch, images/s over the next `batches`, CPU ms per image of this
  process over them: all the work with 0 workers, only the hand-over with workers)."""
  t0 = time.perf_counter()
  first = next(it)
  t1 = time.perf_counter()
  c1 = time.process_time()
  n = 0
  for _ in range(batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    n += int(batch["mask"].size)
  t2 = time.perf_counter()
  cpu_ms = (time.process_time() - c1) * 1e3 / max(n, 1)
  it.close()
  del first
  return t1 - t0, n / max(t2 - t1, 1e-9), cpu_ms


def bench_train(args, workers: int, epoch: int):
  from spp_jax import data
  it = data.train_iterator(data_config(args, workers), batch_size=args.batch, image_size=64,
                           epoch=epoch, seed=0)
  return time_iterator(it, args.batches)


def bench_eval_full(args, workers: int):
  from spp_jax import data
  it = data.eval_iterator(data_config(args, workers), dict(name="full", kind="full"),
                          batch_size=args.batch)
  return time_iterator(it, args.batches)


def make_network_step(args):
  """Returns run(steps) -> images/s of the small network's training step, compiled once."""
  from spp_jax import models

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  model = models.create("small", num_classes=10, rngs=nnx.Rngs(params=0, dropout=1))
  optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.batch, 64, 64, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
  compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels).compile()
  holder = {"state": state}
  for _ in range(3):
    holder["state"], loss = compiled(holder["state"], images, labels)
  loss.block_until_ready()

  def run(steps: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      holder["state"], loss = compiled(holder["state"], images, labels)
    loss.block_until_ready()
    n = steps * args.batch
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / n

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="small", choices=("tiny", "small", "full"))
  parser.add_argument("--data_dir", default=os.path.join(_ROOT, ".cache", "tfds"))
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--net_steps", type=int, default=20)
  parser.add_argument("--no_net", action="store_true", help="skip the network step")
  args = parser.parse_args()

  from spp_jax import data  # registers the builder
  t0 = time.perf_counter()
  n_train = data.num_examples(data_config(args, 0), "train")
  n_test = data.num_examples(data_config(args, 0), "test")
  data.eval_iterator(data_config(args, 0), dict(kind="full"), batch_size=args.batch)  # sizes
  print(f"data: multiscale_fashion_mnist/{args.config} ({n_train} train, {n_test} test) in "
        f"{args.data_dir}; ready in {time.perf_counter() - t0:.1f} s (built if missing)")
  print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")

  net = None
  if not args.no_net:
    try:
      net = make_network_step(args)
    except Exception as e:  # noqa: BLE001 - the network may not exist yet
      print(f"small network unavailable ({type(e).__name__}: {e}); pipeline numbers only")

  results: dict[str, list[float]] = {}
  firsts: dict[str, list[float]] = {}
  cpu: dict[str, list[float]] = {}

  def record(name, first, rate, cpu_ms):
    results.setdefault(name, []).append(rate)
    cpu.setdefault(name, []).append(cpu_ms)
    if first is not None:
      firsts.setdefault(name, []).append(first)

  for r in range(args.rounds):
    for w in args.workers:
      record(f"train crop 64, workers={w}", *bench_train(args, w, epoch=r))
      record(f"eval full image, workers={w}", *bench_eval_full(args, w))
    if net is not None:
      record("small net train step, 64x64", None, *net(args.net_steps))
  print(f"load average after: {os.getloadavg()[0]:.2f}\n")
  print(f"batch {args.batch}, {args.batches} timed batches, {args.rounds} rounds (median); "
        f"CPU ms/image: this process (with workers: only receiving the batches)")
  print(f"{'measurement':36s} {'images/s':>10s} {'first batch s':>14s} {'CPU ms/img':>11s}"
        f"  images/s per round")
  for name, rates in results.items():
    first = f"{statistics.median(firsts[name]):.2f}" if name in firsts else "-"
    rounds = " ".join(f"{x:.0f}" for x in rates)
    print(f"{name:36s} {statistics.median(rates):10.0f} {first:>14s} "
          f"{statistics.median(cpu[name]):11.3f}  {rounds}")
  if net is not None:
    consume = statistics.median(results["small net train step, 64x64"])
    for w in args.workers:
      produce = statistics.median(results[f"train crop 64, workers={w}"])
      print(f"pipeline / network, workers={w}: {produce / consume:.2f}x")


if __name__ == "__main__":
  main()
