"""Sweeps: variants from axes, commands, skip/resume, reports (with a stand-in trainer)."""

import csv
import json
import os
import shlex
import sys
import textwrap

import pytest

from spp_jax import sweep

# A stand-in for `python -m spp_jax.main`: deterministic "accuracy" from the overrides, and a
# failure on the first attempt of the variant whose seed is 1 (to exercise re-running).
FAKE_TRAINER = textwrap.dedent('''
    import json, os, sys
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    workdir = args["workdir"]
    levels = eval(args.get("config.model.spp_levels", "(6, 3, 2, 1)"))
    seed = int(args.get("config.seed", 0))
    head = "fixed" if "nospp" in args["config"] else "spp"
    marker = os.path.join(workdir, "attempted")
    if seed == 1 and not os.path.exists(marker):
      open(marker, "w").close()
      sys.exit(3)
    acc = 0.5 + 0.01 * len(levels) + 0.001 * seed - (0.1 if head == "fixed" else 0)
    results = {"center/top1": acc, "center/top5": 0.9, "steps": 10}
    if head == "spp":  # like the real no-SPP runs, which have no full-image view
      results.update({"full/top1": acc + 0.02, "full/top5": 0.95})
    config = {"data": {"name": "multiscale_fashion_mnist/small", "eval_split": "test"},
              "model": {"name": "small"}}
    os.makedirs(os.path.join(workdir, "checkpoints", "10"), exist_ok=True)
    json.dump(config, open(os.path.join(workdir, "config.json"), "w"))
    json.dump(results, open(os.path.join(workdir, "results.json"), "w"))
''')


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
  (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  return sweep.define(
      base="configs/demo.py:multi",
      axes={"levels": {"2-1": {"model.spp_levels": (2, 1)},
                       "4-2-1": {"model.spp_levels": (4, 2, 1)},
                       "no-SPP": {sweep.ARG: "nospp"}},
            "seed": {"0": {"seed": 0}, "1": {"seed": 1}}},
      x="levels", average_over="seed", main_module="fake_trainer")


def test_variants_are_the_product_of_axes(fake_sweep):
  names = [v["name"] for v in fake_sweep.variants]
  assert names == ["levels=2-1,seed=0", "levels=2-1,seed=1", "levels=4-2-1,seed=0",
                   "levels=4-2-1,seed=1", "levels=no-SPP,seed=0", "levels=no-SPP,seed=1"]
  assert fake_sweep.variants[3]["overrides"] == {"model.spp_levels": (4, 2, 1), "seed": 1}


def test_dry_run_command_is_a_main_invocation(fake_sweep, tmp_path):
  cmd = sweep.command(fake_sweep, fake_sweep.variants[2], str(tmp_path / "s"))
  assert cmd[1:3] == ["-m", "fake_trainer"]
  assert "--config=configs/demo.py:multi" in cmd
  assert f"--workdir={tmp_path / 's' / 'levels=4-2-1,seed=0'}" in cmd
  assert "--config.model.spp_levels=(4, 2, 1)" in cmd and "--config.seed=0" in cmd
  nospp = sweep.command(fake_sweep, fake_sweep.variants[4], "s")
  assert "--config=configs/demo.py:multi,nospp" in nospp
  assert not any(a.startswith("--config._arg") for a in nospp)
  script = sweep.slurm_script(fake_sweep, "s")
  assert "#SBATCH --array=0-5" in script and script.count(" ;;") == 6
  shlex.split(script.splitlines()[4])  # every case line is valid shell


def test_run_skips_finished_reruns_failed_and_reports(fake_sweep, tmp_path):
  d = str(tmp_path / "sweep")
  failed = sweep.run(fake_sweep, d)
  assert failed == ["levels=2-1,seed=1", "levels=4-2-1,seed=1", "levels=no-SPP,seed=1"]
  before = os.path.getmtime(os.path.join(d, "levels=2-1,seed=0", "results.json"))
  assert sweep.run(fake_sweep, d) == []
  assert os.path.getmtime(os.path.join(d, "levels=2-1,seed=0", "results.json")) == before

  paths = sweep.write_reports(fake_sweep, d)
  rows = list(csv.DictReader(open(paths["csv"])))
  assert len(rows) == 6 and rows[3]["variant"] == "levels=4-2-1,seed=1"
  assert float(rows[3]["center/top1"]) == pytest.approx(0.531)
  table = open(paths["markdown"]).read()
  assert table.startswith("multiscale_fashion_mnist/small, network small, n = 2 seeds per "
                          "point: accuracy in %, mean ± std over seed.")
  assert "| levels | runs | centre crop top-1 (%) | centre crop top-5 (%) |" in table
  # 4-2-1: seeds give 0.530 and 0.531 -> 53.05 ± 0.07 (sample std).
  assert "| {4, 2, 1} | 2 | 53.05 ± 0.07 | 90.00 ± 0.00 | 55.05 ± 0.07 | 95.00 ± 0.00 |" in table
  assert table.index("| {2, 1} |") < table.index("| {4, 2, 1} |") < table.index("| no-SPP |")
  assert "| no-SPP | 2 | 44.05 ± 0.07 | 90.00 ± 0.00 | — | — |" in table
  assert os.path.getsize(paths["plot"]) > 1000
  if os.environ.get("SPP_JAX_PLOT_DIR"):
    import shutil
    shutil.copy(paths["plot"], os.path.join(os.environ["SPP_JAX_PLOT_DIR"], "sweep_run.png"))


def test_views_scored_later_at_the_final_step_join_the_rows(fake_sweep, tmp_path):
  d = str(tmp_path / "sweep")
  sweep.run(fake_sweep, d)
  sweep.run(fake_sweep, d)
  workdir = os.path.join(d, "levels=2-1,seed=0")
  os.makedirs(os.path.join(workdir, "checkpoints", "5"))  # an older checkpoint kept too
  os.makedirs(os.path.join(workdir, "eval"))
  def report(name, step, split="test", data="multiscale_fashion_mnist/small", top1=0.7):
    with open(os.path.join(workdir, "eval", name), "w") as f:
      json.dump({"step": step, "data": data, "split": split,
                 "results": {"feature_multiview/top1": top1, "center/top1": 0.0}}, f)
  report("final.json", 10)
  report("older.json", 5, top1=0.1)
  report("train.json", 10, split="train", top1=0.2)
  report("other.json", 10, data="imagenette", top1=0.3)
  rows = {r["variant"]: r for r in sweep.collect(fake_sweep, d)}
  assert rows["levels=2-1,seed=0"]["feature_multiview/top1"] == 0.7
  assert rows["levels=2-1,seed=0"]["center/top1"] == pytest.approx(0.52)  # training's own
  assert "feature_multiview/top1" not in rows["levels=2-1,seed=1"]
  sweep.write_reports(fake_sweep, d)
  table = open(os.path.join(d, "summary.md")).read()
  assert "multi-view (feature maps) top-1 (%)" in table


def test_bad_declarations():
  with pytest.raises(ValueError, match="x='size'"):
    sweep.define("c.py", {"levels": {"1": {}}}, x="size")
  with pytest.raises(ValueError, match="at least one value"):
    sweep.define("c.py", {"levels": {}}, x="levels")


def test_config_paths_resolve_relative_to_the_sweep_file(tmp_path, monkeypatch):
  """A sweep's base config is found next to the sweep file, then in the working directory,
  then among the shipped configs by name, and made absolute for the variants' commands."""
  from spp_jax import configs

  here = tmp_path / "exp"
  here.mkdir()
  (here / "base.py").write_text("def get_config(arg=None):\n  return None\n")
  (here / "sweep_local.py").write_text(textwrap.dedent('''
      from spp_jax import sweep
      def get_config(arg=None):
        return sweep.define(base="base.py:x", x="seed",
                            axes={"seed": {"0": {"seed": 0}}, "v": {"a": {sweep.ARG: "y"}}})
  '''))
  (here / "sweep_shipped.py").write_text((here / "sweep_local.py").read_text().replace(
      '"base.py:x"', '"demo.py:tiny"'))
  (here / "sweep_missing.py").write_text((here / "sweep_local.py").read_text().replace(
      '"base.py:x"', '"nowhere.py"'))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  local = sweep.load(str(here / "sweep_local.py"))
  assert local.base == f"{here / 'base.py'}:x"
  assert local.variants[0]["config"] == f"{here / 'base.py'}:x,y"
  cmd = sweep.command(local, local.variants[0], "d")
  assert f"--config={here / 'base.py'}:x,y" in cmd
  shipped = sweep.load(str(here / "sweep_shipped.py"))
  assert shipped.base == os.path.join(configs.DIRECTORY, "demo.py") + ":tiny"
  with pytest.raises(ValueError, match="config file 'nowhere.py' not found"):
    sweep.load(str(here / "sweep_missing.py"))


def test_plot_is_a_dot_plot_of_categories_titled_with_data_network_and_n(tmp_path):
  """Categories as dots with ±std bars, offset per view, never joined; readable names. The
  PNG is kept in SPP_JAX_PLOT_DIR when set, to look at."""

  levels = ["1", "2-1", "4-2-1", "no-SPP"]
  fake = sweep.define("configs/demo.py", x="levels", average_over="seed",
                      axes={"levels": {lv: {} for lv in levels},
                            "seed": {str(s): {"seed": s} for s in range(3)}})
  rows = []
  for i, lv in enumerate(levels):
    for seed in range(3):
      acc = 0.6 + 0.02 * i + 0.01 * seed
      row = {"levels": lv, "seed": str(seed), "center/top1": acc, "ten_view/top1": acc + 0.05}
      if lv != "no-SPP":
        row.update({"full/top1": acc + 0.07, "feature_multiview/top1": acc + 0.08})
      rows.append(row)
  keys, metrics, stats = sweep.summarize(fake, rows)
  setting = {"data": ["multiscale_fashion_mnist/small"], "network": ["small"]}
  fig = sweep.figure(fake, keys, metrics, stats, setting)
  ax = fig.axes[0]
  assert ax.get_title() == "multiscale_fashion_mnist/small, network small, n = 3 seeds per point"
  assert [t.get_text() for t in ax.get_xticklabels()] == ["{1}", "{2, 1}", "{4, 2, 1}",
                                                         "no-SPP"]
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend == ["centre crop", "full image", "10-view", "multi-view (feature maps)"]
  assert metrics == ["center/top1", "full/top1", "ten_view/top1", "feature_multiview/top1"]
  dots = {c.get_label(): c.lines for c in ax.containers}  # one errorbar per view
  assert list(dots) == legend
  for label, (data_line, _, (bars,)) in dots.items():
    assert data_line.get_linestyle() == "None", f"{label}: a line joins the categories"
    n = 4 if label in ("centre crop", "10-view") else 3  # no-SPP has no full-image views
    assert len(data_line.get_xdata()) == len(bars.get_segments()) == n
    # The error bar is ±the sample std over the 3 seeds: 1 point.
    (_, y0), (_, y1) = bars.get_segments()[0]
    assert abs((y1 - y0) / 2 - 1.0) < 1e-9
  for line in ax.get_lines():  # markers, caps, and the vertical category separators
    assert line.get_linestyle() == "None" or len(set(line.get_xdata())) == 1
  first = sorted(d[0].get_xdata()[0] for d in dots.values())  # category 0, side by side
  assert len(set(first)) == 4 and -0.5 < first[0] < first[-1] < 0.5
  out = os.environ.get("SPP_JAX_PLOT_DIR", str(tmp_path))
  fig.savefig(os.path.join(out, "sweep_plot.png"), dpi=120)
  assert os.path.getsize(os.path.join(out, "sweep_plot.png")) > 1000
