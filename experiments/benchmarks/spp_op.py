"""SPP op, forward + backward, f32: this op against a plain JAX version and PyTorch.

    python experiments/benchmarks/spp_op.py [--reps 30] [--levels 6,3,2,1]

Prints, per input, the median time of each variant (rounds alternated within one process so
that machine noise hits them alike, in blocks of `--block` timed calls after two untimed ones),
the ratios, and the
memory-bandwidth floor: the bytes the op must move (read x, write y; read dy, write dx) over a
copy bandwidth measured here.
PyTorch is used only when it happens to be importable; it is never a dependency.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import spp_jax
from spp_jax.ops.spp import bin_edges, normalize_levels


def plain_jax_spp(x, levels, sizes):
  """One static slice per bin and jnp.max; per-example slices when sizes differ."""
  out = []
  for b, (h, w) in enumerate(sizes):
    feats = []
    for nh, nw in levels:
      for r0, r1 in zip(*bin_edges(h, nh)):
        for c0, c1 in zip(*bin_edges(w, nw)):
          feats.append(jnp.max(x[b, r0:r1, c0:c1], axis=(0, 1)))
    out.append(jnp.concatenate(feats))
  return jnp.stack(out)


def plain_jax_spp_batched(x, levels):
  n, h, w, _ = x.shape
  feats = []
  for nh, nw in levels:
    for r0, r1 in zip(*bin_edges(h, nh)):
      for c0, c1 in zip(*bin_edges(w, nw)):
        feats.append(jnp.max(x[:, r0:r1, c0:c1], axis=(1, 2)))
  return jnp.concatenate(feats, axis=1)


def jax_fwd_bwd(pool):
  """jit(value and gradient of sum(pool(x) * g))."""

  def loss(x, g):
    return jnp.sum(pool(x) * g)

  return jax.jit(jax.value_and_grad(loss))


def time_once(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def copy_bandwidth(nbytes=256 << 20, reps=10):
  """Bytes read + written per second by a large copy: numpy and an XLA elementwise op."""
  a = np.random.rand(nbytes // 8)
  b = np.empty_like(a)
  np_t = min(time_once(lambda: np.copyto(b, a)) for _ in range(reps))
  xa = jnp.asarray(a.astype(np.float32))
  scale = jax.jit(lambda v: v * 1.5)
  scale(xa).block_until_ready()
  xla_t = min(time_once(lambda: scale(xa).block_until_ready()) for _ in range(reps))
  return 2 * a.nbytes / np_t, 2 * xa.nbytes / xla_t


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--levels", default="6,3,2,1")
  parser.add_argument("--block", type=int, default=5, help="timed calls per switch")
  parser.add_argument("--case", action="append", default=None,
                      help="run only these inputs (repeatable), e.g. 64x13x13x256")
  args = parser.parse_args()
  levels = normalize_levels(tuple(int(v) for v in args.levels.split(",")))
  rng = np.random.default_rng(0)

  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    torch = None

  np_bw, xla_bw = copy_bandwidth()
  bandwidth = max(np_bw, xla_bw)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; levels {args.levels}; "
        f"torch {torch.__version__ if torch else 'not importable'}")
  print(f"copy bandwidth (read + write): numpy {np_bw / 1e9:.1f} GB/s, XLA {xla_bw / 1e9:.1f} GB/s "
        f"(XLA writes a fresh output buffer); floor uses the faster, {bandwidth / 1e9:.1f} GB/s")

  cases = [
      ("64x13x13x256", (64, 13, 13, 256), None),
      ("64x10x10x256", (64, 10, 10, 256), None),
      ("8x40x60x256 padded", (8, 40, 60, 256),
       np.stack([rng.integers(20, 41, 8), rng.integers(30, 61, 8)], 1).astype(np.int32)),
  ]
  if args.case:
    cases = [c for c in cases if c[0].split()[0] in args.case]
  rows = []
  for name, shape, sizes in cases:
    n, h, w, c = shape
    x_np = rng.standard_normal(shape).astype(np.float32)
    d = spp_jax.spp_output_dim(levels, c)
    g_np = rng.standard_normal((n, d)).astype(np.float32)
    x, g = jnp.asarray(x_np), jnp.asarray(g_np)
    variants = {}
    if sizes is None:
      variants["spp_jax"] = jax_fwd_bwd(lambda x: spp_jax.spatial_pyramid_pool(x, levels))
      variants["plain JAX"] = jax_fwd_bwd(lambda x: plain_jax_spp_batched(x, levels))
      real_cells = n * h * w
    else:
      s = jnp.asarray(sizes)
      variants["spp_jax"] = jax_fwd_bwd(
          lambda x: spp_jax.spatial_pyramid_pool(x, levels, valid_sizes=s))
      variants["plain JAX"] = jax_fwd_bwd(lambda x: plain_jax_spp(x, levels, sizes.tolist()))
      real_cells = int((sizes[:, 0] * sizes[:, 1]).sum())
    calls = {k: (lambda f=f: jax.block_until_ready(f(x, g))) for k, f in variants.items()}
    if torch is not None:
      torch.manual_seed(0)
      for layout in ("NCHW", "channels_last"):
        xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
        if layout == "channels_last":
          xt = xt.contiguous(memory_format=torch.channels_last)
        xt.requires_grad_(True)
        gt = torch.from_numpy(g_np)
        calls[f"torch {layout}"] = (
            lambda xt=xt, gt=gt: _torch_step(torch, F, xt, gt, levels, sizes))
    for call in calls.values():  # compile / warm up
      call()
      call()
    # Alternate variants in blocks of calls. The first two calls after a switch are not timed:
    # the previous framework's worker threads may still be spinning (torch's OpenMP pool does
    # after a parallel region), and this one's may be asleep.
    times = {k: [] for k in calls}
    for _ in range(max(1, -(-args.reps // args.block))):
      for k, call in calls.items():
        call()
        call()
        times[k] += [time_once(call) for _ in range(args.block)]
    med = {k: statistics.median(v) for k, v in times.items()}
    # Must read x and write dx once (f32), write y and read dy once.
    floor_bytes = 4 * (2 * real_cells * c + 2 * n * d)
    floor = floor_bytes / bandwidth
    rows.append((name, med, floor, floor_bytes))

  print()
  for name, med, floor, nbytes in rows:
    ours = med["spp_jax"]
    print(f"{name}: floor {floor * 1e3:.2f} ms ({nbytes / 1e6:.1f} MB); "
          f"spp_jax is {ours / floor:.1f}x the floor")
    print(f"  {'variant':<22}{'median ms':>10}{'vs spp_jax':>12}")
    for k, t in med.items():
      print(f"  {k:<22}{t * 1e3:>10.2f}{t / ours:>11.2f}x")


def _torch_step(torch, F, xt, gt, levels, sizes):
  xt.grad = None
  if sizes is None:
    feats = [F.adaptive_max_pool2d(xt, (nh, nw)).permute(0, 2, 3, 1).flatten(1)
             for nh, nw in levels]
    y = torch.cat(feats, 1)
  else:  # torch has no masked variant: pool each example's own region.
    y = torch.stack([
        torch.cat([F.adaptive_max_pool2d(xt[b:b + 1, :, :h, :w], (nh, nw))
                   .permute(0, 2, 3, 1).flatten(1) for nh, nw in levels], 1)[0]
        for b, (h, w) in enumerate(sizes.tolist())])
  (y * gt).sum().backward()
  return xt.grad


if __name__ == "__main__":
  main()
