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
checkpoint. Collecting writes `DIR/results.csv` (one row per variant), `DIR/summary.md` (mean ±
std over `average_over`) and `DIR/plot.png` (top-1 against the `x` axis, one line per view).
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

import ml_collections
from absl import app, flags

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
  return os.path.exists(os.path.join(sweep_dir, variant["name"], RESULTS_FILE))


def run(sweep: ml_collections.ConfigDict, sweep_dir: str) -> list[str]:
  """Runs every unfinished variant in turn; returns the names of those that failed."""
  os.makedirs(sweep_dir, exist_ok=True)
  failed = []
  for i, variant in enumerate(sweep.variants, 1):
    tag = f"[{i}/{len(sweep.variants)}] {variant['name']}"
    if is_finished(sweep_dir, variant):
      print(f"{tag}: finished, skipped", flush=True)
      continue
    workdir = os.path.join(sweep_dir, variant["name"])
    os.makedirs(workdir, exist_ok=True)
    print(f"{tag}: running (log: {os.path.join(workdir, 'log.txt')})", flush=True)
    with open(os.path.join(workdir, "log.txt"), "a") as log:
      code = subprocess.call(command(sweep, variant, sweep_dir, sys.executable), stdout=log,
                             stderr=subprocess.STDOUT)
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
  """One row per finished variant: its labels and every metric of its results.json."""
  rows = []
  for variant in sweep.variants:
    path = os.path.join(sweep_dir, variant["name"], RESULTS_FILE)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      results = json.load(f)
    metrics = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    rows.append({"variant": variant["name"], **variant["labels"], **metrics})
  return rows


def summarize(sweep: ml_collections.ConfigDict, rows: Sequence[dict]) -> tuple[list, list, dict]:
  """Groups rows by every axis but `average_over`: (group keys, metric names, stats)."""
  keys = [a for a in sweep.axes if a != sweep.average_over]
  metrics = sorted({k for r in rows for k in r if "/" in k})
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
  columns = ["variant", *sweep.axes, *sorted({k for r in rows for k in r if "/" in k})]
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  keys, metrics, stats = summarize(sweep, rows)
  with open(paths["markdown"], "w") as f:
    f.write(markdown_table(sweep, keys, metrics, stats))
  if rows:
    plot(sweep, keys, metrics, stats, paths["plot"])
  else:
    paths.pop("plot")
  return paths


def markdown_table(sweep, keys, metrics, stats) -> str:
  over = f" over {sweep.average_over}" if sweep.average_over else ""
  head = [*keys, "runs", *(f"{m} (%)" for m in metrics)]
  lines = [f"Accuracy in %, mean ± std{over}.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g, s in stats.items():
    cells = [*g, str(s["n"]), *(_percent(*s[m]) for m in metrics)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _percent(mean: float, std: float) -> str:
  """A cell of the table; a view that a variant does not evaluate gives a dash."""
  return "—" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def plot(sweep, keys, metrics, stats, path: str) -> None:
  """Top-1 accuracy against the x axis, one line per evaluation view (and other axis value)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x_axis = sweep.x
  xi = keys.index(x_axis)
  x_labels = list(dict.fromkeys(g[xi] for g in stats))
  fig, ax = plt.subplots(figsize=(7, 4))
  for m in (m for m in metrics if m.endswith("/top1")):
    lines: dict[tuple, list] = {}
    for g, s in stats.items():
      rest = tuple(v for i, v in enumerate(g) if i != xi)
      lines.setdefault(rest, []).append((x_labels.index(g[xi]), s[m]))
    for rest, points in lines.items():
      points.sort()
      label = m.removesuffix("/top1") + (f" ({', '.join(rest)})" if rest else "")
      ax.errorbar([p[0] for p in points], [100 * p[1][0] for p in points],
                  yerr=[100 * p[1][1] for p in points], marker="o", capsize=3, label=label)
  ax.set_xticks(range(len(x_labels)), x_labels)
  ax.set_xlabel(x_axis)
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
  with open(paths["markdown"]) as table:
    print(table.read())
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
