r"""SPP single- against multi-size training, and no SPP, at a multiple of the demo's budget.

  python -m spp_jax.sweep --sweep experiments/sweeps/budget.py --dir sweeps/budget
  python -m spp_jax.sweep --sweep experiments/sweeps/budget.py:times=8 --dir sweeps/budget8

At the demo's 8 epochs multi-size training (64 and 48, one epoch each in turn) scored below
single-size; the paper trained 70-90 epochs (docs/paper.md §5). This sweep trains the three
regimes of experiments/paper_tables/sweep.py (configs/demo.py's "small" network) for `times` x 8
epochs (default 4: 32 epochs, the cosine schedule stretched to match), three seeds each, and
scores the centre crop, the full image (SPP only) and 10-view.
Arguments (comma separated): `times=K` (default 4), `seeds=N` (default 3), `feature_views`
(also multi-view testing on feature maps, ~18x the 10-view's cost), `tiny` (a smoke run).
"""

from spp_jax import sweep

DEMO_EPOCHS = 8  # configs/demo.py's train.num_epochs


def get_config(arg=None):
  opts = dict(p.partition("=")[::2] for p in (arg or "").split(",") if p)
  base = "demo.py" + (":tiny" if "tiny" in opts else "")
  extra = ",feature_views" if "feature_views" in opts else ""
  epochs = {} if "tiny" in opts else {"train.num_epochs": DEMO_EPOCHS * int(opts.get("times") or 4)}
  regimes = {"no SPP": {sweep.ARG: "nospp", **epochs},
             "single-size": {sweep.ARG: "single" + extra, **epochs},
             "multi-size": {sweep.ARG: "multi" + extra, **epochs}}
  seeds = range(int(opts.get("seeds") or 3))
  return sweep.define(base, {"training": regimes, "seed": {str(s): {"seed": s} for s in seeds}},
                      x="training", average_over="seed")
