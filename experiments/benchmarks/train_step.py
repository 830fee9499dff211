"""ZF-5 training step (forward, backward, SGD with momentum) in JAX, and in PyTorch when importable.

  python experiments/benchmarks/train_step.py                   # batch 32 at 224 and 180, f32
  python experiments/benchmarks/train_step.py --steps 5 --rounds 2 --sizes 224
  python experiments/benchmarks/train_step.py --mixed           # padded mixed sizes vs one size

Every measurement runs in a fresh child process (clean peak memory, no idle thread pool of the
other framework competing for the cores); frameworks alternate round by round so that both
see the same machine load. Reported per (framework, size): the median step time over all timed
steps of all rounds, images/s, the compile (JAX) or first-step (PyTorch) time, the peak
resident memory of the child (ru_maxrss) and, for JAX, XLA's buffer plan for the step.

PyTorch is never a dependency: it runs only if `import torch` works (e.g. PYTHONPATH pointing at
a separate install). It builds the same network from the same Architecture (Caffe ceil pooling,
the same LRN, SPP by adaptive max pooling with the same bins) in NCHW.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- JAX worker


def _jax_worker(args) -> dict:
  sys.path.insert(0, _ROOT)
  from spp_jax import models  # first: sets the XLA:CPU flags before JAX starts its backend

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  model = models.create(args.model, num_classes=args.num_classes,
                        rngs=nnx.Rngs(params=0, dropout=1), width_multiplier=args.width_multiplier,
                        dtype=args.dtype)
  optimizer = nnx.Optimizer(model, optax.sgd(args.lr, momentum=0.9), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def loss_fn(model, images, labels, sizes):
    logits = model(images, sizes)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, images, labels, sizes):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels, sizes)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  jitted = jax.jit(step, donate_argnums=0)
  rng = np.random.default_rng(0)
  b, s = args.batch, args.size
  labels = jnp.asarray(rng.integers(0, args.num_classes, b), jnp.int32)
  variants = {"uniform": (jnp.asarray(rng.normal(size=(b, s, s, 3)), jnp.float32), None)}
  if args.mixed:
    lo = args.mixed_min
    sizes = rng.integers(lo, s + 1, size=(b, 2)).astype(np.int32)
    images = np.zeros((b, s, s, 3), np.float32)
    for i, (h, w) in enumerate(sizes):
      images[i, :h, :w] = rng.normal(size=(h, w, 3))
    variants["mixed"] = (jnp.asarray(images), jnp.asarray(sizes))

  out = {"framework": "jax", "size": s, "batch": b, "backend": jax.default_backend(),
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  compiled = {}
  for name, (images, sizes) in variants.items():
    t0 = time.perf_counter()
    compiled[name] = jitted.lower(state, images, labels, sizes).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled[name].memory_analysis()
    cost = compiled[name].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = {
        "step_times": [], "compile_s": compile_s,
        "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None,
        "flops": float(cost.get("flops", 0.0)) if cost else None,
    }
  for _ in range(args.warmup):
    for name, (images, sizes) in variants.items():
      state, loss = compiled[name](state, images, labels, sizes)
  loss.block_until_ready()
  # Variants alternate step by step so that they see the same machine load.
  for _ in range(args.steps):
    for name, (images, sizes) in variants.items():
      t0 = time.perf_counter()
      state, loss = compiled[name](state, images, labels, sizes)
      loss.block_until_ready()
      out[name]["step_times"].append(time.perf_counter() - t0)
      out[name]["loss"] = float(loss)
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


# ----------------------------------------------------------------------------- PyTorch worker


def _torch_net(arch, num_classes, levels, fc_width, dropout_rate):
  import torch
  import torch.nn.functional as tf
  from torch import nn

  from spp_jax.models.arch import ConvSpec, LRNSpec, PoolSpec

  class WithinChannelLRNFn(torch.autograd.Function):
    """Caffe WITHIN_CHANNEL LRN with a hand-written backward: about 2x faster than autograd
    through avg_pool2d and pow (measured here), so that PyTorch is not handicapped."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
      s = tf.avg_pool2d(x * x, size, 1, size // 2, count_include_pad=True).mul_(alpha).add_(k)
      p = s.pow(-beta)
      ctx.save_for_backward(x, s, p)
      ctx.consts = (size, alpha, beta)
      return x * p

    @staticmethod
    def backward(ctx, g):
      x, s, p = ctx.saved_tensors
      size, alpha, beta = ctx.consts
      t = tf.avg_pool2d(g * x * p / s, size, 1, size // 2, count_include_pad=True)
      return g * p - (2 * beta * alpha) * x * t, None, None, None, None

  class WithinChannelLRN(nn.Module):
    """x / (k + alpha * mean of x^2 over size x size, zero padded, padding counted)^beta."""

    def __init__(self, s):
      super().__init__()
      self.s = s

    def forward(self, x):
      s = self.s
      return WithinChannelLRNFn.apply(x, s.size, s.alpha, s.beta, s.k)

  layers, c = [], arch.in_channels
  for _, spec in arch.layers:
    if isinstance(spec, ConvSpec):
      layers += [nn.Conv2d(c, spec.features, spec.kernel, spec.stride, spec.padding),
                 nn.ReLU(inplace=True)]
      c = spec.features
    elif isinstance(spec, LRNSpec):
      layers.append(nn.LocalResponseNorm(spec.size, spec.alpha, spec.beta, spec.k)
                    if spec.region == "across_channels" else WithinChannelLRN(spec))
    elif isinstance(spec, PoolSpec):
      layers.append(nn.MaxPool2d(spec.window, spec.stride, spec.padding, ceil_mode=True))

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      dim = c * sum(n * n for n in levels)
      self.head = nn.Sequential(
          nn.Linear(dim, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout_rate),
          nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout_rate),
          nn.Linear(fc_width, num_classes))

    def forward(self, x):
      f = self.features(x)
      pooled = torch.cat([tf.adaptive_max_pool2d(f, n).flatten(1) for n in levels], 1)
      return self.head(pooled)

  return Net()


def _torch_worker(args) -> dict:
  sys.path.insert(0, _ROOT)
  os.environ.setdefault("SPP_JAX_NO_XLA_FLAGS", "1")
  import numpy as np
  import torch

  from spp_jax import models

  s_ = models.spec(args.model, width_multiplier=args.width_multiplier)
  torch.manual_seed(0)
  net = _torch_net(s_.arch, args.num_classes, [lv[0] for lv in s_.option("spp_levels")],
                   s_.option("fc_width"), s_.option("dropout_rate"))
  fmt = torch.channels_last if args.torch_channels_last else torch.contiguous_format
  net = net.to(memory_format=fmt).train()
  opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
  rng = np.random.default_rng(0)
  b, s = args.batch, args.size
  images = torch.from_numpy(rng.normal(size=(b, 3, s, s)).astype(np.float32))
  images = images.contiguous(memory_format=fmt)
  labels = torch.from_numpy(rng.integers(0, args.num_classes, b))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    opt.step()
    return loss

  t0 = time.perf_counter()
  loss = step()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  return {"framework": "torch", "size": s, "batch": b, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "channels_last": args.torch_channels_last,
          "uniform": {"step_times": times, "compile_s": first_s, "loss": float(loss)},
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- driver


def _run_child(framework: str, size: int, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--size", str(size)]
  for key in ("model", "batch", "steps", "warmup", "num_classes", "width_multiplier", "dtype",
              "lr", "mixed_min"):
    cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
  if args.mixed and framework == "jax":
    cmd.append("--mixed")
  if args.torch_channels_last:
    cmd.append("--torch-channels-last")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(results: list[dict], variant: str) -> dict:
  times = [t for r in results for t in r[variant]["step_times"]]
  med = statistics.median(times)
  first = results[0]
  return {
      "step_s": med, "images_per_s": first["batch"] / med,
      "spread": (min(times), max(times)),
      "compile_s": statistics.median(r[variant]["compile_s"] for r in results),
      "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
      "xla_temp_mb": first[variant].get("xla_temp_mb"),
      "flops": first[variant].get("flops"),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="zf5")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--sizes", default="224,180", help="comma-separated input sides")
  p.add_argument("--steps", type=int, default=3, help="timed steps per round")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--rounds", type=int, default=1, help="alternating rounds per size")
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--width-multiplier", type=float, default=1.0)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--mixed", action="store_true",
                 help="JAX only: a batch of random sizes in [--mixed-min, size] zero-padded to "
                      "size with image_sizes, against the same batch at one size")
  p.add_argument("--mixed-min", type=int, default=180)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-channels-last", action="store_true")
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--size", type=int, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    out = _jax_worker(args) if args.worker == "jax" else _torch_worker(args)
    print(json.dumps(out))
    return 0

  have_torch = importlib.util.find_spec("torch") is not None and not args.no_torch
  frameworks = ["jax"] + (["torch"] if have_torch else [])
  print(f"{args.model} train step, batch {args.batch}, {args.dtype}, SGD momentum 0.9; "
        f"{args.steps} timed steps x {args.rounds} round(s), {os.cpu_count()} CPUs; "
        f"torch {'found' if have_torch else 'skipped' if args.no_torch else 'not importable'}")
  for size in (int(v) for v in args.sizes.split(",")):
    results = {fw: [] for fw in frameworks}
    for _ in range(args.rounds):
      for fw in frameworks:
        results[fw].append(_run_child(fw, size, args))
    rows = {fw: _summarise(results[fw], "uniform") for fw in frameworks}
    if args.mixed:
      rows["jax mixed"] = _summarise(results["jax"], "mixed")
    for name, r in rows.items():
      flops = f", {r['flops'] / r['step_s'] / 1e9:.0f} GFLOP/s" if r.get("flops") else ""
      xla = f", XLA temp {r['xla_temp_mb']:.0f} MB" if r.get("xla_temp_mb") else ""
      print(f"  {size}px {name:<10} {r['step_s']:.3f} s/step ({r['spread'][0]:.3f}-"
            f"{r['spread'][1]:.3f}), {r['images_per_s']:.1f} img/s, "
            f"{'compile' if name.startswith('jax') else 'first step'} {r['compile_s']:.1f} s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB{xla}{flops}")
    if "torch" in rows:
      ratio = rows["jax"]["images_per_s"] / rows["torch"]["images_per_s"]
      print(f"  {size}px jax/torch throughput ratio: {ratio:.2f}x")
    if args.mixed:
      ratio = rows["jax mixed"]["step_s"] / rows["jax"]["step_s"]
      print(f"  {size}px mixed sizes [{args.mixed_min}, {size}] padded to {size} vs all at "
            f"{size}: {ratio:.2f}x the step time")
  return 0


if __name__ == "__main__":
  sys.exit(main())
