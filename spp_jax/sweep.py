"""Sweeps: the variants of one experiment, run in turn here or printed for a cluster.

A sweep is declared in a config file whose `get_config(arg)` returns `define(...)`:

    from spp_jax import sweep

    def get_config(arg=None):
      return sweep.define(
          base="demo.py:multi",  # a path relative to this file, or a shipped config's name
          axes={"levels": {"4-2-1": {"model.spp_levels": (4, 2, 1)},
                           "no-SPP": {ARG: "nospp"}},
                "seed": {str(s): {"seed": s} for s in (0, 1, 2)}},
          x="levels", average_over="seed")

Commands:

    python -m spp_jax.sweep --sweep experiments/sweeps/levels.py --dir sweeps/levels
    python -m spp_jax.sweep --sweep ... --dir ... --dry_run            # one command per variant
    python -m spp_jax.sweep --sweep ... --dir ... --slurm sweep.sbatch  # a SLURM array script
    python -m spp_jax.sweep --sweep ... --dir ... --collect_only

Each variant trains in its own workdir `DIR/<variant>` through `python -m spp_jax.main`, so a
variant whose `results.json` exists is skipped and an unfinished one resumes from its last
checkpoint. A view scored afterwards at the final checkpoint (`python -m spp_jax.evaluate
--workdir DIR/<variant> --views ...`) joins the variant's row (`later_evaluations`).
Collecting writes `DIR/results.csv` (one row per variant), `DIR/summary.md` (mean ± std over
`average_over`) and `DIR/plot.png` (top-1 per category of the `x` axis: a dot with a ±std
error bar per view, side by side, titled with the data set, the network and n).
DIR may be gs://bucket/sweep (spp_jax/paths.py): the variants' logs are then written locally
while they run and copied to DIR/<variant>/log.txt after.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

import ml_collections
from absl import app, flags

from spp_jax import paths as path_lib

RESULTS_FILE = "results.json"
# An axis value's key that appends a variant to the base config's argument (`file.py:a,b`)
# instead of overriding one key: for variants such as "nospp" that change several keys.
ARG = "_arg"


# ----------------------------------------------------------------------------- declaring


def define(base: str, axes: Mapping[str, Mapping[str, Mapping[str, object]]], *, x: str,
           average_over: str | None = None,
           main_module: str = "spp_jax.main") -> ml_collections.ConfigDict:
  """A sweep over the product of `axes`: {axis: {label: {dotted.config.key: value}}}."""
  if not axes or any(not values for values in axes.values()):
    raise ValueError(f"every sweep axis needs at least one value, got axes={dict(axes)!r}")
  if x not in axes:
    raise ValueError(f"x={x!r} must name one of the axes {list(axes)}")
  if average_over is not None and average_over not in axes:
    raise ValueError(f"average_over={average_over!r} must name one of the axes {list(axes)}")
  variants = []
  for combo in itertools.product(*(list(v.items()) for v in axes.values())):
    labels = {axis: label for axis, (label, _) in zip(axes, combo)}
    overrides, args = {}, []
    for _, values in combo:
      overrides.update({k: v for k, v in values.items() if k != ARG})
      args += [values[ARG]] if ARG in values else []
    variants.append({"name": variant_name(labels), "labels": labels, "overrides": overrides,
                     "config": _with_args(base, args)})
  return ml_collections.ConfigDict({
      "base": base, "axes": list(axes), "x": x, "average_over": average_over,
      "main_module": main_module, "variants": variants,
  })


def _with_args(base: str, args: Sequence[str]) -> str:
  """"configs/demo.py:multi" + ["nospp"] -> "configs/demo.py:multi,nospp"."""
  if not args:
    return base
  file, _, arg = base.partition(":")
  return f"{file}:{','.join([a for a in [arg, *args] if a])}"


def variant_name(labels: Mapping[str, str]) -> str:
  """A directory-safe name: `levels=4-2-1,seed=0`."""
  name = ",".join(f"{k}={v}" for k, v in labels.items())
  return "".join(c if c.isalnum() or c in "=,-_." else "_" for c in name)


def load(path: str) -> ml_collections.ConfigDict:
  """Loads `file.py[:arg]`, calls its get_config(arg), and resolves its config paths.

  The base config (and every variant's) is looked up relative to the sweep file first, then
  the working directory, then among the shipped configs by name (spp_jax.configs), and made
  absolute: the variants' commands then run from any directory.
  """
  if path_lib.is_remote(path):  # gs://bucket/sweep.py[:arg]: read from a local copy
    from spp_jax import configs
    path = configs.resolve_argv(["--config", path])[1]
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_sweep_config", file)
  if spec is None or not os.path.exists(file):
    raise ValueError(f"sweep config file not found: {file!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_config(arg or None) if arg else module.get_config()
  return resolve_configs(sweep, relative_to=file)


def resolve_configs(sweep: ml_collections.ConfigDict, *, relative_to: str
                    ) -> ml_collections.ConfigDict:
  """The sweep with its base and variant config paths found relative to `relative_to`."""
  from spp_jax import configs

  sweep.base = configs.resolve(sweep.base, relative_to=relative_to)
  for variant in sweep.variants:
    variant["config"] = configs.resolve(variant["config"], relative_to=relative_to)
  return sweep


# ----------------------------------------------------------------------------- running


def command(sweep: ml_collections.ConfigDict, variant: Mapping, sweep_dir: str,
            python: str = "python") -> list[str]:
  """The `python -m spp_jax.main` command line that trains one variant."""
  args = [python, "-m", sweep.main_module, f"--config={variant['config']}",
          f"--workdir={os.path.join(sweep_dir, variant['name'])}"]
  for key, value in variant["overrides"].items():
    args.append(f"--config.{key}={value if isinstance(value, str) else repr(value)}")
  return args


def is_finished(sweep_dir: str, variant: Mapping) -> bool:
  return path_lib.path(os.path.join(sweep_dir, variant["name"], RESULTS_FILE)).exists()


def run(sweep: ml_collections.ConfigDict, sweep_dir: str) -> list[str]:
  """Runs every unfinished variant in turn; returns the names of those that failed."""
  path_lib.path(sweep_dir, "--dir").mkdir(parents=True, exist_ok=True)
  failed = []
  for i, variant in enumerate(sweep.variants, 1):
    tag = f"[{i}/{len(sweep.variants)}] {variant['name']}"
    if is_finished(sweep_dir, variant):
      print(f"{tag}: finished, skipped", flush=True)
      continue
    workdir = os.path.join(sweep_dir, variant["name"])
    log_path = os.path.join(workdir, "log.txt")
    if path_lib.is_remote(workdir):  # a subprocess writes to a local file; copied up after
      log_path = os.path.join(tempfile.mkdtemp(prefix="spp_sweep_"), "log.txt")
    else:
      os.makedirs(workdir, exist_ok=True)
    print(f"{tag}: running (log: {log_path})", flush=True)
    with open(log_path, "a") as log:
      code = subprocess.call(command(sweep, variant, sweep_dir, sys.executable), stdout=log,
                             stderr=subprocess.STDOUT)
    if path_lib.is_remote(workdir):
      remote_log = path_lib.Appender(os.path.join(workdir, "log.txt"), binary=True)
      with open(log_path, "rb") as log:
        remote_log.write(log.read())
      remote_log.close()
    if code != 0 or not is_finished(sweep_dir, variant):
      print(f"{tag}: FAILED (exit code {code}); see its log.txt", flush=True)
      failed.append(variant["name"])
  return failed


def slurm_script(sweep: ml_collections.ConfigDict, sweep_dir: str, sweep_file: str | None = None,
                 resources=None, environment=None) -> str:
  """A SLURM array script (spp_jax/slurm.py): one variant per array task, then, when
  `sweep_file` is given, the collect step (--collect_only) after every task has ended."""
  from spp_jax import slurm  # pylint: disable=g-import-not-at-top

  collect = None if sweep_file is None else [
      "python", "-m", "spp_jax.sweep", f"--sweep={sweep_file}", f"--dir={sweep_dir}",
      "--collect_only"]
  return slurm.script([command(sweep, v, sweep_dir) for v in sweep.variants],
                      resources or slurm.Resources(), environment or slurm.Environment.here(),
                      name="spp_sweep", collect=collect, array=True)


# ----------------------------------------------------------------------------- collecting


def collect(sweep: ml_collections.ConfigDict, sweep_dir: str) -> list[dict]:
  """One row per finished variant: its labels, every metric of its results.json, and the
  views scored later at its final checkpoint (`later_evaluations`)."""
  rows = []
  for variant in sweep.variants:
    workdir = os.path.join(sweep_dir, variant["name"])
    path = path_lib.path(os.path.join(workdir, RESULTS_FILE))
    if not path.exists():
      continue
    results = json.loads(path.read_text())
    metrics = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    rows.append({"variant": variant["name"], **variant["labels"],
                 **later_evaluations(workdir), **metrics})
  return rows


def later_evaluations(workdir: str) -> dict[str, float]:
  """Metrics of `python -m spp_jax.evaluate` reports in workdir/eval/*.json that scored the
  run's final checkpoint on its own data set and eval split: a view added to a finished
  sweep without training again. Reports of other steps, data sets or splits are left out."""
  from spp_jax.train.init_from import saved_steps

  root = path_lib.path(workdir)
  try:
    data = json.loads((root / "config.json").read_text())["data"]
    name, split = data["name"], data["eval_split"]
    steps = saved_steps(workdir, "sweep variant")
    reports = sorted((root / "eval").glob("*.json")) if (root / "eval").is_dir() else []
  except (OSError, ValueError, KeyError, TypeError):
    return {}
  out = {}
  for report_path in reports:
    try:
      report = json.loads(report_path.read_text())
    except (OSError, ValueError):
      continue
    if (report.get("data"), report.get("split"), report.get("step")) == (
        name, split, max(steps, default=None)):
      out.update({k: v for k, v in report.get("results", {}).items()
                  if isinstance(v, (int, float))})
  return out


def summarize(sweep: ml_collections.ConfigDict, rows: Sequence[dict]) -> tuple[list, list, dict]:
  """Groups rows by every axis but `average_over`: (group keys, metric names, stats)."""
  keys = [a for a in sweep.axes if a != sweep.average_over]
  metrics = metric_names(rows)
  groups: dict[tuple, list[dict]] = {}
  order = {a: list(dict.fromkeys(v["labels"][a] for v in sweep.variants)) for a in keys}
  for r in rows:
    groups.setdefault(tuple(r[a] for a in keys), []).append(r)
  stats = {}
  for g in sorted(groups, key=lambda g: [order[a].index(v) for a, v in zip(keys, g)]):
    stats[g] = {m: _mean_std([r[m] for r in groups[g] if m in r]) for m in metrics}
    stats[g]["n"] = len(groups[g])
  return keys, metrics, stats


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  if not values:
    return math.nan, math.nan
  mean = sum(values) / len(values)
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
  return mean, math.sqrt(var)


def write_reports(sweep: ml_collections.ConfigDict, sweep_dir: str) -> dict[str, str]:
  rows = collect(sweep, sweep_dir)
  paths = {"csv": os.path.join(sweep_dir, "results.csv"),
           "markdown": os.path.join(sweep_dir, "summary.md"),
           "plot": os.path.join(sweep_dir, "plot.png")}
  columns = ["variant", *sweep.axes, *metric_names(rows)]
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, columns, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  path_lib.write_atomic(paths["csv"], table.getvalue())
  keys, metrics, stats = summarize(sweep, rows)
  setting = run_setting(sweep, sweep_dir)
  path_lib.write_atomic(paths["markdown"], markdown_table(sweep, keys, metrics, stats, setting))
  if rows:
    png = io.BytesIO()
    plot(sweep, keys, metrics, stats, png, setting)
    path_lib.write_atomic(paths["plot"], png.getvalue())
  else:
    paths.pop("plot")
  return paths


# ----------------------------------------------------------------------------- reports

# Readable names of the usual evaluation views (results keys "<view name>/top1"), in the order
# the tables and plots list them.
VIEW_LABELS = {"center": "centre crop", "full": "full image", "ten_view": "10-view",
               "feature_multiview": "multi-view (feature maps)", "multiscale": "multi-scale"}


def metric_names(rows: Sequence[dict]) -> list[str]:
  """The rows' "<view>/<metric>" keys, the usual views first in VIEW_LABELS' order."""
  known = list(VIEW_LABELS)
  names = {k for r in rows for k in r if "/" in k}
  def order(m):
    view, _, kind = m.rpartition("/")
    return (known.index(view) if view in known else len(known), view, kind)
  return sorted(names, key=order)


def view_label(name: str) -> str:
  return VIEW_LABELS.get(name, name.replace("_", " "))


def _metric_label(metric: str) -> str:
  """"ten_view/top1" -> "10-view top-1"."""
  view, _, kind = metric.rpartition("/")
  return f"{view_label(view)} {kind.replace('top', 'top-')}".strip()


def _category_label(axis: str, label: str) -> str:
  """Level tuples read as sets of pyramid levels: "4-2-1" -> "{4, 2, 1}"."""
  parts = label.split("-")
  if axis == "levels" and all(p.isdigit() for p in parts):
    return "{" + ", ".join(parts) + "}"
  return label


def run_setting(sweep, sweep_dir: str) -> dict[str, list[str]]:
  """The data sets and networks the finished variants ran (their workdirs' config.json)."""
  found: dict[str, list[str]] = {"data": [], "network": []}
  for variant in sweep.variants:
    path = path_lib.path(os.path.join(sweep_dir, variant["name"], "config.json"))
    try:
      config = json.loads(path.read_text())
      data, model = config["data"]["name"], config["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
      continue
    for key, value in (("data", data), ("network", model)):
      if value not in found[key]:
        found[key].append(value)
  return found


def _seeds_text(sweep, stats) -> str:
  counts = sorted({s["n"] for s in stats.values()})
  if not counts:
    return ""
  n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
  what = f"{sweep.average_over}s" if sweep.average_over else "runs"
  return f"n = {n} {what} per point"


def caption(sweep, stats, setting: Mapping[str, Sequence[str]] | None) -> str:
  """"multiscale_fashion_mnist/small, network small, n = 3 seeds per point"."""
  setting = setting or {}
  parts = []
  if setting.get("data"):
    parts.append(" / ".join(setting["data"]))
  if setting.get("network"):
    parts.append("network " + " / ".join(setting["network"]))
  parts.append(_seeds_text(sweep, stats))
  return ", ".join(p for p in parts if p)


def markdown_table(sweep, keys, metrics, stats, setting=None) -> str:
  over = f" over {sweep.average_over}" if sweep.average_over else ""
  head = [*keys, "runs", *(f"{_metric_label(m)} (%)" for m in metrics)]
  lines = [f"{caption(sweep, stats, setting)}: accuracy in %, mean ± std{over}.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g, s in stats.items():
    cells = [*(_category_label(a, v) for a, v in zip(keys, g)), str(s["n"]),
             *(_percent(*s[m]) for m in metrics)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _percent(mean: float, std: float) -> str:
  """A cell of the table; a view that a variant does not evaluate gives a dash."""
  return "—" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _series(keys, metrics, stats, xi: int, x_labels: list) -> list[tuple[str, list]]:
  """One series per top-1 view (and value of the other axes): [(label, [(x index, (mean,
  std)), ...])], points without a value left out."""
  out: dict[str, list] = {}
  top1 = [m for m in metrics if m.endswith("/top1")]  # metric_names' order
  for m in top1:
    for g, s in stats.items():
      if math.isnan(s[m][0]):
        continue
      rest = tuple(v for i, v in enumerate(g) if i != xi)
      label = view_label(m.removesuffix("/top1")) + (f" ({', '.join(rest)})" if rest else "")
      out.setdefault(label, []).append((x_labels.index(g[xi]), s[m]))
  return list(out.items())


def plot(sweep, keys, metrics, stats, path, setting=None) -> None:
  """Writes `figure(...)` to path (a local PNG file, or a binary file object)."""
  import matplotlib.pyplot as plt

  fig = figure(sweep, keys, metrics, stats, setting)
  fig.savefig(path, dpi=120, format="png")
  plt.close(fig)


def figure(sweep, keys, metrics, stats, setting=None):
  """Top-1 accuracy per category of the x axis: a dot per view (mean, ±std error bar), the
  views side by side within each category; categories are not joined by lines. The title
  names the data set, the network and n (setting: `run_setting`)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x_axis = sweep.x
  xi = keys.index(x_axis)
  x_labels = list(dict.fromkeys(g[xi] for g in stats))
  series = _series(keys, metrics, stats, xi, x_labels)
  fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(x_labels) + 5.0), 4.5))
  width = min(0.8 / max(len(series), 1), 0.22)
  markers = "osD^vP*X"
  for j, (label, points) in enumerate(series):
    offset = (j - (len(series) - 1) / 2) * width
    ax.errorbar([p[0] + offset for p in points], [100 * p[1][0] for p in points],
                yerr=[100 * p[1][1] for p in points], fmt=markers[j % len(markers)],
                linestyle="none", markersize=6, capsize=3, elinewidth=1.2, label=label)
  for i in range(1, len(x_labels)):
    ax.axvline(i - 0.5, color="0.85", linewidth=0.8, zorder=0)
  ax.set_xticks(range(len(x_labels)), [_category_label(x_axis, v) for v in x_labels])
  ax.set_xlim(-0.5, len(x_labels) - 0.5)
  ax.set_xlabel("pyramid levels" if x_axis == "levels" else x_axis.replace("_", " "))
  over = f" over {sweep.average_over}s" if sweep.average_over else ""
  ax.set_ylabel(f"top-1 accuracy (%), mean ± std{over}")
  ax.grid(axis="y", alpha=0.3)
  # Outside the axes: it can never hide a point.
  ax.legend(title="test view", fontsize=8, title_fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  ax.set_title(caption(sweep, stats, setting), fontsize=10)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------- command line

def _define_flags() -> None:
  # Defined only when run as a program: sweep files import this module as a library.
  flags.DEFINE_string("sweep", None, "Sweep config file, `file.py[:arg]`.", required=True)
  flags.DEFINE_string("dir", None, "Sweep directory; each variant trains in DIR/<variant>.",
                      required=True)
  flags.DEFINE_bool("dry_run", False, "Print one command per variant and run nothing.")
  flags.DEFINE_string("slurm", None, "Write a SLURM array script to this path and run nothing "
                      "(resources: the --slurm_* flags, spp_jax/slurm.py).")
  from spp_jax import slurm  # pylint: disable=g-import-not-at-top

  slurm.define_flags(prefix="slurm_")
  flags.DEFINE_bool("collect_only", False, "Only write results.csv, summary.md and plot.png.")


def main(argv):
  del argv
  f = flags.FLAGS
  sweep = load(f.sweep)
  if f.dry_run:
    for variant in sweep.variants:
      print(shlex.join(command(sweep, variant, f.dir)))
    return 0
  if f.slurm:
    from spp_jax import slurm  # pylint: disable=g-import-not-at-top

    resources, environment = slurm.from_flags(prefix="slurm_")
    slurm.write(f.slurm, slurm_script(sweep, f.dir, f.sweep, resources, environment),
                environment)
    print(f"wrote {f.slurm} ({len(sweep.variants)} array tasks of {resources.nodes} node(s) x "
          f"{resources.ntasks_per_node} task(s), then the collect step); submit with: "
          f"sbatch {f.slurm}")
    return 0
  failed = [] if f.collect_only else run(sweep, f.dir)
  paths = write_reports(sweep, f.dir)
  print(path_lib.path(paths["markdown"]).read_text())
  print("\n".join(f"{k}: {v}" for k, v in paths.items()))
  if failed:
    print(f"{len(failed)} variant(s) failed: {', '.join(failed)}")
    return 1
  return 0


def run_cli(argv=None):
  """Console script spp-sweep."""
  _define_flags()
  app.run(main, argv=argv)


if __name__ == "__main__":
  run_cli()
