r"""Bytes accessed on TPU by max pooling, LRN and the SPP op, fwd + bwd: CPU kernels vs defaults.

The real XLA:TPU compiler runs without a chip (libtpu's compile-only devices), so this needs
libtpu on PYTHONPATH and no network (libtpu looks for a cloud metadata server);
ALLOW_MULTIPLE_LIBTPU_LOAD lets it run beside another process that holds libtpu:

    pip install --no-deps --target /work/libtpu "libtpu==0.0.42.*"   # what jax[tpu] 0.10.2 pins
    unshare -n env TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu \
        PYTHONPATH=/work/libtpu python experiments/benchmarks/kernels_tpu.py \
        [--topology v5e:2x2] [--batch 128]

Per op it prints XLA's "bytes accessed" of one jitted fwd + bwd step (y and dx from x and a
cotangent) for: the CPU kernel (spp_jax/ops/cpu_kernels.py, which every platform ran before
the per-platform choice), the GPU/TPU default called directly, and the public function,
which must pick the default when compiled for TPU. Shapes: ZF-5 at 224 in bf16 (pool1 and norm1
on the 110x110x96 conv1 map) and SPP (6, 3, 2, 1) on 15x19x256 maps, unmasked and masked.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from spp_jax.models import functional as F
from spp_jax.ops import cpu_kernels, masked_max, spp
from spp_jax.ops.bins import edge_arrays, max_bin_len, static_bins, traced_edges

LEVELS = ((6, 6), (3, 3), (2, 2), (1, 1))


def tpu_bytes(f, args, sharding) -> float:
  """GB accessed by jit(x, g -> f(x), vjp(g)) compiled for the TPU topology."""
  x, *rest = args

  def step(x, g, *rest):
    y, vjp = jax.vjp(lambda x: f(x, *rest), x)
    return y, vjp(g)[0]

  out = jax.eval_shape(f, x, *rest)
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
           for a in (x, out, *rest)]
  compiled = jax.jit(step).trace(*avals).lower().compile()
  return compiled.cost_analysis()["bytes accessed"] / 1e9


def cases(batch: int):
  """(name, args, CPU kernel, default, public function) for each op."""
  conv1 = jax.ShapeDtypeStruct((batch, 110, 110, 96), jnp.bfloat16)
  (oh, pad_h), (ow, pad_w) = F._pool_geometry(conv1.shape, 3, 2, 0)
  pads = (pad_h, pad_w)
  coef = 5e-5 / 9
  lrn_in = lambda f: lambda x: f(x.astype(jnp.float32)).astype(x.dtype)
  fmap = jax.ShapeDtypeStruct((batch, 15, 19, 256), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((batch, 2), jnp.int32)

  def static_root(kernel):
    def pool(x):
      def root(lv):
        if kernel == "cpu":
          return cpu_kernels.spp_static_max(x, static_bins(15, lv[0]), static_bins(19, lv[1]))
        return masked_max.separable_max(x, edge_arrays(15, lv[0]), edge_arrays(19, lv[1]))
      return spp._max_pyramid(x, LEVELS, root)
    return pool

  def masked_root(kernel):
    def pool(x, s):
      def root(lv):
        (rs, re), (cs, ce) = traced_edges(s[:, 0], lv[0]), traced_edges(s[:, 1], lv[1])
        if kernel == "cpu":
          return cpu_kernels.spp_gathered_max(x, rs, re - rs, cs, ce - cs,
                                              max_bin_len(15, lv[0]), max_bin_len(19, lv[1]))
        return masked_max.separable_max(x, (rs, re), (cs, ce))
      return spp._max_pyramid(x, LEVELS, root)
    return pool

  public_spp = lambda x, s=None: spp.spatial_pyramid_pool(x, LEVELS, valid_sizes=s)
  return [
      ("ZF-5 pool1 3/2, 110x110x96", (conv1,),
       lambda x: cpu_kernels.max_pool(x, 3, 2, pads)[:, :oh, :ow],
       lambda x: F._reduce_window_max(x, 3, 2, pads)[:, :oh, :ow],
       lambda x: F.max_pool_caffe(x, 3, 2)),
      ("ZF-5 norm1 (3x3 within), 110x110x96", (conv1,),
       lrn_in(lambda x: cpu_kernels.lrn(x, 3, coef, 0.75, 1.0, (1, 2))),
       lrn_in(lambda x: F._lrn_default(x, 3, coef, 0.75, 1.0, (1, 2))),
       lambda x: F.local_response_norm(x, size=3, alpha=5e-5, beta=0.75,
                                       region="within_channel")),
      ("LRN 5 across channels, 110x110x96", (conv1,),
       lrn_in(lambda x: cpu_kernels.lrn(x, 5, 1e-4 / 5, 0.75, 2.0, (3,))),
       lrn_in(lambda x: F._lrn_default(x, 5, 1e-4 / 5, 0.75, 2.0, (3,))),
       lambda x: F.local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=2.0)),
      ("SPP 15x19x256, unmasked", (fmap,), static_root("cpu"), static_root("default"),
       public_spp),
      ("SPP 15x19x256, valid_sizes", (fmap, sizes), masked_root("cpu"), masked_root("default"),
       public_spp),
  ]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
  mesh = jax.sharding.Mesh(np.asarray(topo.devices[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  print(f"XLA:TPU {args.topology}, one chip, batch {args.batch}, bf16; GB accessed, fwd + bwd")
  print(f"{'op':<40}{'CPU kernel':>12}{'default':>10}{'public op':>11}{'old/new':>9}")
  for name, op_args, cpu, default, public in cases(args.batch):
    old, new, chosen = (tpu_bytes(f, op_args, sharding) for f in (cpu, default, public))
    print(f"{name:<40}{old:>12.3f}{new:>10.3f}{chosen:>11.3f}{old / new:>8.1f}x")


if __name__ == "__main__":
  main()
