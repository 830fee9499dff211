r"""Pyramid-level ablation on the embedded data set: SPP levels and the no-SPP head, x seeds.

  python -m spp_jax.sweep --sweep experiments/sweeps/levels.py --dir sweeps/levels
  python -m spp_jax.sweep --sweep experiments/sweeps/levels.py --dir sweeps/levels --dry_run
  python -m spp_jax.sweep --sweep experiments/sweeps/levels.py:tiny --dir /tmp/levels_tiny

Argument (comma separated): `single` trains at the base size only (default: multi-size),
`seeds=N` (default 3), `tiny` for a seconds-long smoke run per variant.
"""

from spp_jax import sweep

LEVELS = ((1,), (2, 1), (4, 2, 1), (4, 3, 2, 1), (6, 3, 2, 1), (8, 4, 2, 1))


def get_config(arg=None):
  opts = dict(p.partition("=")[::2] for p in (arg or "").split(",") if p)
  base = "demo.py:" + ("single" if "single" in opts else "multi")
  if "tiny" in opts:
    base += ",tiny"
  levels = {"-".join(map(str, lv)): {"model.spp_levels": lv} for lv in LEVELS}
  levels["no-SPP"] = {sweep.ARG: "nospp"}
  seeds = range(int(opts.get("seeds") or 3))
  return sweep.define(base, {"levels": levels, "seed": {str(s): {"seed": s} for s in seeds}},
                      x="levels", average_over="seed")
