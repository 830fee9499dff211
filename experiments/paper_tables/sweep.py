r"""The embedded data set's analogue of the paper's Table 2 and of its full-image vs crop test.

  python -m spp_jax.sweep --sweep experiments/paper_tables/sweep.py --dir sweeps/paper_tables

Three training regimes of the same "small" network (configs/demo.py), three seeds each:
no SPP (fixed pooling, base-size crops only), SPP single-size, SPP multi-size (64 and 48, one
epoch each in turn: 64/48 ~ 224/180). Every run is evaluated with the centre crop and 10-view;
the SPP runs also with the full image and with multi-view testing on feature maps (the
`feature_views` variant: 6 scales x 18 windows of the conv map + 2 full-image views, 98 views,
docs/paper.md §4), which the fixed head cannot take. The same runs give both tables.
Arguments (comma separated): `seeds=N` (default 3); `tiny` makes a seconds-long smoke run.
"""

from spp_jax import sweep


def get_config(arg=None):
  opts = dict(p.partition("=")[::2] for p in (arg or "").split(",") if p)
  base = "demo.py" + (":tiny" if "tiny" in opts else "")
  regimes = {"no SPP": {sweep.ARG: "nospp"},
             "SPP single-size": {sweep.ARG: "single,feature_views"},
             "SPP multi-size": {sweep.ARG: "multi,feature_views"}}
  seeds = range(int(opts.get("seeds") or 3))
  return sweep.define(base, {"training": regimes, "seed": {str(s): {"seed": s} for s in seeds}},
                      x="training", average_over="seed")
