"""Plan figures (XLA's bytes accessed, FLOPs, temporaries) of the old and the new kernels, side
by side, compiled for a TPU without a chip (spp_jax.plan).

    python experiments/benchmarks/plan_kernels.py             # the ops, on one v5e chip
    python experiments/benchmarks/plan_kernels.py --steps     # and the ZF-5 steps (minutes)
    python experiments/benchmarks/plan_kernels.py --old 9b6dca2 --new HEAD --topology v5e-1

"old" and "new" are two versions of this repository: git revisions (exported with `git
archive`) or "worktree" (the files as they are). Each is planned in its own child process from
its own tree, so each side compiles its own max pooling, LRN and SPP op exactly as its training
would; a revision without spp_jax/plan.py gets the plan of --plan_rev, the first revision with
one. The default old side, 9b6dca2, is the last revision before per-platform kernels: the
XLA:CPU-tuned custom VJPs on every platform. Two reference formulations written here
(`lax.reduce_window` max pooling with its select_and_scatter gradient, LRN by autodiff of
reduce_window sums) come with the old side, so the table means something even when both sides
hold the same kernels.

Op shapes are ZF-5's at B=128, 224x224 crops, bf16 (models/zf.py): conv1's output
110x110x96 (norm1, pool1), conv5's 13x13x256 (SPP) and a full-image bucket's 15x19x256 with
per-example sizes (masked SPP). Each op is compiled as forward + backward: f(x, g) = (y, dx).
With --steps, the ZF-5 train step at 224, the full-image step at the 256x320 bucket and the
ten_view eval step (bf16 compute, f32 parameters, B=128) come too.

libtpu runs inside `unshare -n` (no network) when unshare works here, with
TPU_SKIP_MDS_QUERY=1; see spp_jax/plan.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PLAN_FILES = ("spp_jax/plan.py", "spp_jax/chips.py")
# The first revision with spp_jax/plan.py; its plan fits the trainer of the revisions before.
PLAN_REV = "cb82b2c"
B = 128
LEVELS = (6, 3, 2, 1)
ZF_LRN = dict(size=3, alpha=5e-5, beta=0.75, k=1.0, region="within_channel")
STEPS = (("configs/zf5_imagenet.py", "train 224x224"),
         ("configs/zf5_imagenet.py:full_image", "train 256x320"),
         ("configs/zf5_imagenet.py", "eval:ten_view"))


# ----------------------------------------------------------------------------- worker


def _reference_ops():
  """Formulations written with plain lax ops and autodiff (what XLA:TPU handles itself)."""
  import jax.numpy as jnp
  from jax import lax

  def pool(x):  # Caffe ceil pooling 3/2 of 110 -> 55: pad one -inf row and column
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (0, 1), (0, 1), (0, 0)))

  def lrn(x):
    x32 = x.astype(jnp.float32)
    s = lax.reduce_window(x32 * x32, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    return (x32 * (1.0 + ZF_LRN["alpha"] / 9 * s) ** -ZF_LRN["beta"]).astype(x.dtype)

  return pool, lrn


def _op_programs(include_reference: bool):
  import jax.numpy as jnp
  from spp_jax.models import functional as F
  from spp_jax.ops.spp import spatial_pyramid_pool

  conv1 = ((B, 110, 110, 96), None)
  conv5 = ((B, 13, 13, 256), None)
  bucket = ((B, 15, 19, 256), (B, 2))
  ops = {
      "pool1 3/2 (repo)": (lambda x: F.max_pool_caffe(x, 3, 2), conv1),
      "norm1 LRN (repo)": (lambda x: F.local_response_norm(x, **ZF_LRN), conv1),
      "SPP 6321 static (repo)": (lambda x: spatial_pyramid_pool(x, LEVELS), conv5),
      "SPP 6321 masked (repo)": (lambda x, s: spatial_pyramid_pool(x, LEVELS, valid_sizes=s),
                                 bucket),
  }
  if include_reference:
    pool, lrn = _reference_ops()
    ops["pool1 3/2 (reduce_window)"] = (pool, conv1)
    ops["norm1 LRN (autodiff)"] = (lrn, conv1)
  return {name: (fn, shape, sizes, jnp.bfloat16) for name, (fn, (shape, sizes)) in ops.items()}


def _fwd_bwd(fn):
  """f(x, g, *sizes) = (fn(x, *sizes), the gradient of <g, fn> with respect to x)."""
  import jax

  def f(x, g, *sizes):
    y, vjp = jax.vjp(lambda x: fn(x, *sizes), x)
    return y, vjp(g)[0]
  return f


def _compile_op(fn, shape, sizes_shape, dtype, device):
  """XLA's figures for f(x, g[, sizes]) = forward + backward of fn, on one device."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  rep = NamedSharding(jax.sharding.Mesh([device], ("data",)), P())
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=rep)]
  if sizes_shape is not None:
    args.append(jax.ShapeDtypeStruct(sizes_shape, jnp.int32, sharding=rep))
  y = jax.eval_shape(fn, *args)
  g = jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=rep)
  start = time.perf_counter()
  compiled = jax.jit(_fwd_bwd(fn)).trace(args[0], g, *args[1:]).lower().compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(bytes=float(cost.get("bytes accessed", 0.0)), flops=float(cost.get("flops", 0.0)),
              temp=int(compiled.memory_analysis().temp_size_in_bytes), seconds=seconds)


def worker(args) -> dict:
  from spp_jax import chips

  devices, every, name = chips.select_devices(args.topology)
  out = dict(ops={}, steps={}, target=f"{devices[0].device_kind}, 1 of {len(every)} {name} "
             f"device(s)")
  for op, (fn, shape, sizes, dtype) in _op_programs(args.reference).items():
    out["ops"][op] = _compile_op(fn, shape, sizes, dtype, devices[0])
    print(f"  {op}: {out['ops'][op]['bytes'] / 1e9:.3f} GB", file=sys.stderr, flush=True)
  if args.steps:
    from spp_jax import plan
    for config_arg, program in STEPS:
      config = _load_config(config_arg)
      with config.unlocked():
        config.model.dtype = "bfloat16"
        config.train.batch_size = config.eval.batch_size = B
      (f,) = plan.make_plan(config, devices, every, only=(program,), num_classes=1000)
      out["steps"][f.name] = dict(bytes=f.bytes_accessed, flops=f.flops, temp=f.temp_bytes,
                                  total=f.total_bytes, bytes_per_pixel=f.bytes_per_pixel,
                                  bound_ms=None if f.bound_seconds is None
                                  else f.bound_seconds * 1e3, seconds=f.compile_seconds)
      print(f"  {f.name}: {f.bytes_accessed / 1e9:.2f} GB", file=sys.stderr, flush=True)
  return out


def _load_config(arg: str):
  import importlib.util
  path, _, config_arg = arg.partition(":")
  spec = importlib.util.spec_from_file_location("plan_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(config_arg or None)


# ----------------------------------------------------------------------------- driver


def _tree(rev: str, scratch: str, plan_rev: str) -> str:
  """A directory holding the repository at `rev` ("worktree": this checkout's files), with
  this script, and spp_jax/plan.py and chips.py from `plan_rev` where `rev` has none."""
  if rev == "worktree":
    return _ROOT
  path = os.path.join(scratch, rev.replace("/", "_"))
  os.makedirs(path)
  subprocess.run(["tar", "-x", "-C", path], check=True, input=subprocess.run(
      ["git", "-C", _ROOT, "archive", rev], check=True, capture_output=True).stdout)
  if not os.path.exists(os.path.join(path, "spp_jax", "plan.py")):
    for name in _PLAN_FILES:
      with open(os.path.join(path, name), "wb") as f:
        f.write(subprocess.run(["git", "-C", _ROOT, "show", f"{plan_rev}:{name}"], check=True,
                               capture_output=True).stdout)
  script = os.path.join(path, "experiments", "benchmarks", "plan_kernels.py")
  os.makedirs(os.path.dirname(script), exist_ok=True)
  shutil.copy(os.path.abspath(__file__), script)
  return path


def _run_side(tree: str, args, reference: bool) -> dict:
  cmd = [sys.executable, os.path.join(tree, "experiments", "benchmarks", "plan_kernels.py"),
         "--worker", "--topology", args.topology] + (["--steps"] if args.steps else []) + (
             ["--reference"] if reference else [])
  env = dict(os.environ, TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu", PYTHONPATH=tree)
  if args.topology != "local" and shutil.which("unshare") and subprocess.run(
      ["unshare", "-n", "true"], capture_output=True).returncode == 0:
    cmd = ["unshare", "-n"] + cmd
  out = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
  if out.returncode:
    raise SystemExit(f"the {tree} side failed (exit {out.returncode})")
  return json.loads(out.stdout)


def _table(title: str, old: dict, new: dict, key: str = "bytes") -> list[str]:
  rows = [(title, "old GB", "new GB", "new/old", "old temp MiB", "new temp MiB")]
  for name in old:
    o, n = old[name], new.get(name)
    if n is None:  # a reference formulation: only on the old side
      rows.append((name, f"{o[key] / 1e9:.3f}", "", "", f"{o['temp'] / 2**20:.0f}", ""))
      continue
    rows.append((name, f"{o[key] / 1e9:.3f}", f"{n[key] / 1e9:.3f}",
                 f"{n[key] / max(o[key], 1):.2f}", f"{o['temp'] / 2**20:.0f}",
                 f"{n['temp'] / 2**20:.0f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                    enumerate(zip(r, widths))) for r in rows]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--old", default="9b6dca2", help="revision or 'worktree'")
  parser.add_argument("--new", default="worktree", help="revision or 'worktree'")
  parser.add_argument("--plan_rev", default=PLAN_REV, help="spp_jax/plan.py for revisions "
                      "without one")
  parser.add_argument("--topology", default="v5e-1")
  parser.add_argument("--steps", action="store_true", help="also the whole ZF-5 steps")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return
  with tempfile.TemporaryDirectory() as scratch:
    sides = {}
    for label, rev, reference in (("old", args.old, True), ("new", args.new, False)):
      print(f"{label}: {rev}", file=sys.stderr, flush=True)
      sides[label] = _run_side(_tree(rev, scratch, args.plan_rev), args, reference)
  old, new = sides["old"], sides["new"]
  print(f"{new['target']}\nold: {args.old}   new: {args.new}   (ops: forward + backward, "
        f"bf16, B={B})")
  print("\n".join(_table("op", old["ops"], new["ops"])))
  if args.steps:
    print("\n".join(_table("ZF-5 step", old["steps"], new["steps"])))
    for label, side in (("old", old), ("new", new)):
      steps = side["steps"]
      crop, full = steps.get("train 224x224"), steps.get("train 256x320")
      if crop and full:
        print(f"{label}: full-image bytes per pixel / crop's = "
              f"{full['bytes_per_pixel'] / crop['bytes_per_pixel']:.2f}")


if __name__ == "__main__":
  main()
