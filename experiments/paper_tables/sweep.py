r"""The embedded data set's analogue of the paper's Table 2 and of its full-image vs crop test.

  python -m spp_jax.sweep --sweep experiments/paper_tables/sweep.py --dir experiments/paper_tables/runs

Three training regimes of the same "small" network (configs/demo.py), three seeds each:
no SPP (fixed pooling, base-size crops only), SPP single-size, SPP multi-size (64 and 48, one
epoch each in turn: 64/48 ~ 224/180). Every run is evaluated with the centre crop, 10-view, and
(SPP only: the fixed head accepts only its base size) the full image, so the same runs give both
tables. Argument `seeds=N` changes the number of seeds; `tiny` makes a seconds-long smoke run.
"""

from spp_jax import sweep


def get_config(arg=None):
  opts = dict(p.partition("=")[::2] for p in (arg or "").split(",") if p)
  base = "demo.py" + (":tiny" if "tiny" in opts else "")
  regimes = {"no SPP": {sweep.ARG: "nospp"},
             "SPP single-size": {sweep.ARG: "single"},
             "SPP multi-size": {sweep.ARG: "multi"}}
  seeds = range(int(opts.get("seeds") or 3))
  return sweep.define(base, {"training": regimes, "seed": {str(s): {"seed": s} for s in seeds}},
                      x="training", average_over="seed")
