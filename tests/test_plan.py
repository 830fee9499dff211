"""spp_jax.plan: the roofline arithmetic, the chip table, batch specs equal to the pipeline's
batches, halving an eval batch until it fits, and (with libtpu, in a network namespace) a real
deviceless TPU compile."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from spp_jax import chips, plan

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg: str = "tiny"):
  spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(_REPO, "configs",
                                                                         "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ----------------------------------------------------------------------------- chips


def test_chip_table_has_the_accelerators_with_positive_figures():
  for name in ("v2", "v3", "v4", "v5e", "v5p", "v6e", "A100-80GB", "H100", "H200"):
    chip = chips.CHIPS[name]
    assert chip.peak_flops > 1e13 and chip.hbm_bandwidth > 1e11 and chip.hbm_bytes > 8 * chips.GIB
  assert chips.CHIPS["v5e"].hbm_bytes == 16 * chips.GIB


@pytest.mark.parametrize("kind, name", [
    ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v2", "v2"),
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB")])
def test_chip_for_device_kind(kind, name):
  assert chips.chip_for(kind).name == name


def test_cpu_has_no_chip_figures():
  assert chips.chip_for("cpu") is None


@dataclasses.dataclass
class _Dev:
  coords: tuple
  device_kind: str = "TPU v2"


def test_two_cores_of_one_chip_share_it():
  two_core = [_Dev((x, 0, 0)) for x in range(2) for _ in range(2)]  # 2 chips x 2 cores
  share = chips.per_device(chips.CHIPS["v2"], two_core)
  assert share.hbm_bytes == 8 * chips.GIB and share.peak_flops == 23e12
  one_core = [_Dev((x, 0, 0)) for x in range(4)]
  assert chips.per_device(chips.CHIPS["v2"], one_core) == chips.CHIPS["v2"]


# ----------------------------------------------------------------------------- topologies


def test_topology_names():
  assert chips.parse_topology("v5e-1") == ("v5e:2x2", 1)
  assert chips.parse_topology("v4-8") == ("v4:2x2x1", 8)
  assert chips.parse_topology("v5e:4x4") == ("v5e:4x4", None)
  for bad in ("v9-1", "v5e", "h100"):
    with pytest.raises(chips.DeviceError):
      chips.parse_topology(bad)


def test_libtpu_path_honours_the_environment(tmp_path, monkeypatch):
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "libtpu.so").write_bytes(b"")
  monkeypatch.setenv(chips.LIBTPU_ENV, str(tmp_path))
  assert chips.libtpu_path() == str(tmp_path / "libtpu" / "libtpu.so")
  monkeypatch.setenv(chips.LIBTPU_ENV, str(tmp_path / "libtpu"))
  assert chips.libtpu_path() == str(tmp_path / "libtpu" / "libtpu.so")
  monkeypatch.setenv(chips.LIBTPU_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(chips.DeviceError, match="holds no libtpu.so"):
    chips.libtpu_path()


def test_without_libtpu_the_command_fails_in_one_line():
  env = {k: v for k, v in os.environ.items()
         if k not in (chips.LIBTPU_ENV, "TPU_LIBRARY_PATH", "PYTHONPATH")}
  check = [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('libtpu'))"]
  if subprocess.run(check, env=env, capture_output=True, text=True).stdout.strip() != "None":
    pytest.skip("libtpu is installed in this environment")
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-m", "spp_jax.plan", "--config",
                        os.path.join(_REPO, "configs", "demo.py:tiny"), "--topology", "v5e-1"],
                       env=env, capture_output=True, text=True, cwd=_REPO, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f"error: libtpu is not installed: pip install -e '.[tpu]', or set ${chips.LIBTPU_ENV} to "
      f"a directory holding it"]


# ----------------------------------------------------------------------------- figures


class _Memory:
  argument_size_in_bytes = 3 * chips.GIB
  output_size_in_bytes = 3 * chips.GIB
  alias_size_in_bytes = 3 * chips.GIB  # the donated state
  temp_size_in_bytes = 10 * chips.GIB
  generated_code_size_in_bytes = 0


class _Compiled:
  def __init__(self, flops, accessed, optimal):
    self.cost = dict(flops=flops, optimal_seconds=optimal, **{"bytes accessed": accessed})

  def cost_analysis(self):
    return self.cost

  def memory_analysis(self):
    return _Memory()


_CHIP = chips.Chip("test", peak_flops=100e12, hbm_bandwidth=1e12, hbm_bytes=16 * chips.GIB)


def _program(batch=128, pixels=128 * 224 * 224):
  return plan.Program("train 224x224", None, (), batch, pixels, "train")


def test_roofline_memory_bound():
  f = plan.analyse(_program(), _Compiled(1e12, 30e9, -1.0), _CHIP, 1, 0.0)
  assert f.bound_by == "memory" and f.bound_seconds == pytest.approx(0.030)
  assert f.images_per_second == pytest.approx(128 / 0.030)
  assert f.xla_seconds is None  # XLA's negative estimate means none
  assert f.total_bytes == 13 * chips.GIB and f.fits
  assert f.bytes_per_pixel == pytest.approx(30e9 / (128 * 224 * 224))


def test_roofline_compute_bound_and_not_fitting():
  small = dataclasses.replace(_CHIP, hbm_bytes=12 * chips.GIB)
  f = plan.analyse(_program(), _Compiled(5e12, 30e9, 0.02), small, 1, 0.0)
  assert f.bound_by == "compute" and f.bound_seconds == pytest.approx(0.05)
  assert f.xla_seconds == pytest.approx(0.02)
  assert f.fits is False


def test_per_device_figures_count_the_global_batch():
  # Four devices each holding a quarter of the batch: the step takes one device's bound.
  f = plan.analyse(_program(), _Compiled(1e12, 30e9, -1.0), _CHIP, 4, 0.0)
  assert f.images_per_second == pytest.approx(128 / 0.030)
  assert f.bytes_per_pixel == pytest.approx(4 * 30e9 / (128 * 224 * 224))


def test_no_chip_no_roofline():
  f = plan.analyse(_program(), _Compiled(1e12, 30e9, -1.0), None, 1, 0.0)
  assert f.bound_seconds is None and f.fits is None and f.images_per_second is None
  assert "train 224x224" in plan.format_figures([f])


_OOM = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (29.42G) exceeds available HBM (15.75G).")


class _FailsAbove:
  """A jitted function whose compile XLA refuses, as XLA:TPU does, above `limit` examples."""

  def __init__(self, batch: int, limit: int):
    self.batch, self.limit = batch, limit

  def trace(self, *args):
    import jax
    if self.batch > self.limit:
      raise jax.errors.JaxRuntimeError(_OOM)
    compiled = _Compiled(1e12, 30e9, -1.0)
    return types.SimpleNamespace(lower=lambda: types.SimpleNamespace(compile=lambda: compiled))


def _eval_program(batch: int) -> plan.Program:
  return plan.Program("eval:ten_view 10x224x224", _FailsAbove(batch, 64), (), batch,
                      batch * 10 * 224 * 224, "eval", _eval_program)


def test_a_program_xla_refuses_for_memory_does_not_fit():
  f = plan.measure(_eval_program(256), _CHIP, 1)
  assert f.fits is False and f.flops is None and f.bound_seconds is None
  assert f.total_bytes == int(29.42 * chips.GIB) and f.capacity_bytes == int(15.75 * chips.GIB)
  assert "exceeds available HBM (15.75G)" in plan.format_figures([f])


def test_eval_batch_halves_past_out_of_memory_compiles():
  assert plan.fitting_batch(_eval_program(256), _CHIP, 1, lambda _: None) == 64
  assert plan.fitting_batch(_eval_program(256), _CHIP, 128, lambda _: None) is None


# ----------------------------------------------------------------------------- programs


@pytest.fixture(scope="module")
def setup():
  import jax
  return plan.Setup.create(_config("tiny"), jax.devices()[:1], num_classes=10)


def test_programs_cover_every_training_size_and_view(setup):
  names = [p.name for p in plan.programs(setup, train_batch=16, eval_batch=16)]
  assert names == ["train 64x64", "train 48x48", "eval:center 1x64x64", "eval:full 1x72x72",
                   "eval:full 1x72x112", "eval:full 1x112x72", "eval:full 1x72x180",
                   "eval:full 1x180x72", "eval:ten_view 10x64x64"]


def test_full_image_training_compiles_each_bucket_at_each_size():
  config = _config("tiny,full_image")
  shapes = plan.train_shapes(config, config.data)
  # Sizes 64 and 48 of crop 64 scale the short side 72 to 72 and 54 (the pipeline's rule).
  assert shapes[:5] == [(72, 72), (72, 112), (112, 72), (72, 180), (180, 72)]
  assert len(shapes) == 10 and all(min(s) == 54 for s in shapes[5:])


def test_eval_batch_halves_until_it_fits(setup):
  program = [p for p in plan.programs(setup, train_batch=16, eval_batch=32)
             if p.name.startswith("eval:ten_view")][0]
  at = {}
  for batch in (32, 16):
    p = program.rebuild(batch)
    compiled, seconds = plan.compile_program(p)
    at[batch] = plan.analyse(p, compiled, None, 1, seconds).total_bytes
  assert at[16] < at[32]
  chip = chips.Chip("test", 1e12, 1e11, (at[16] + at[32]) // 2)
  assert plan.fitting_batch(program, chip, 1, lambda _: None) == 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from spp_jax.data import idx, multiscale_fashion_mnist as mfm
  if not idx.has_fashion_mnist(mfm.DEFAULT_SOURCE_DIR):
    pytest.skip("Fashion-MNIST idx files not installed (make data)")
  return str(tmp_path_factory.mktemp("tfds"))


def _layout(batch) -> dict:
  from spp_jax.train import parallel
  return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in batch.items()
          if k in parallel.BATCH_KEYS}


def _spec_layout(specs) -> dict:
  return {k: (tuple(s.shape), np.dtype(s.dtype)) for k, s in specs.items()}


@pytest.mark.parametrize("batch_dtype", ["uint8", "float32"])
@pytest.mark.parametrize("arg", ["tiny", "tiny,full_image"])
def test_batch_specs_are_the_pipelines_batches(arg, batch_dtype, data_dir):
  """The programs compile for exactly what the trainer feeds: every real batch's keys, shapes
  and dtypes (after parallel.to_global's selection) are one program's abstract batch."""
  import jax
  from spp_jax import data
  from spp_jax.train import schedules, view

  config = _config(arg)
  with config.unlocked():
    config.data.data_dir = data_dir
    config.data.batch_dtype = batch_dtype
    config.eval.views = list(config.eval.views) + [
        view("multiscale", "multiscale", scales=(56, 72), flip=True)]
  s = plan.Setup.create(config, jax.devices()[:1], num_classes=10)
  progs = plan.programs(s, train_batch=16, eval_batch=16)
  specs = {p.name: _spec_layout(p.args[1]) for p in progs}
  train_specs = [v for k, v in specs.items() if k.startswith("train")]
  size = schedules.epoch_size(config.train, 0, config.seed)
  it = data.train_iterator(s.data_cfg, batch_size=16, image_size=size, epoch=0, seed=0,
                           mode=config.train.mode)
  for _, batch in zip(range(3), it):
    assert _layout(batch) in train_specs
  it.close()
  for view in config.eval.views:
    mine = [v for k, v in specs.items() if k.startswith(f"eval:{view.name} ")]
    it = data.eval_iterator(s.data_cfg, view, batch_size=16)
    for _, batch in zip(range(3), it):
      assert _layout(batch) in mine, view.name
    it.close()


# ----------------------------------------------------------------------------- libtpu


def _namespace_or_skip():
  if shutil.which("unshare") is None:
    pytest.skip("unshare is not available: libtpu may only run without a network here")
  if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
    pytest.skip("unshare -n is not permitted (needs root or CAP_SYS_ADMIN)")
  path = chips.libtpu_path()
  if path is None:
    pytest.skip(f"libtpu is not installed (pip install -e '.[tpu]' or set {chips.LIBTPU_ENV})")
  return path


@pytest.mark.slow
def test_deviceless_tpu_compile_of_the_tiny_config():
  """The real XLA:TPU compiler, no chip, no network: one v5e chip, then four."""
  _namespace_or_skip()
  base = ["unshare", "-n", "env", "TPU_SKIP_MDS_QUERY=1", "JAX_PLATFORMS=cpu", sys.executable,
          "-m", "spp_jax.plan", "--config", os.path.join(_REPO, "configs", "demo.py:tiny"),
          "--only", "train 64x64", "--batch", "16", "--json"]
  got = {}
  for topology in ("v5e-1", "v5e:2x2"):
    out = subprocess.run(base + ["--topology", topology], capture_output=True, text=True,
                         cwd=_REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got[topology] = json.loads(out.stdout)
  one, four = got["v5e-1"], got["v5e:2x2"]
  assert "v5e" in one["target"] and "1 of 4" in one["target"]
  (p1,), (p4,) = one["programs"], four["programs"]
  assert p1["name"] == "train 64x64" and p1["fits"] is True
  assert p1["capacity_bytes"] == 16 * chips.GIB
  assert p1["flops"] > 0 and p1["bytes_accessed"] > 0 and p1["bound_seconds"] > 0
  # Per-device figures: each of four devices computes a quarter of the batch, plus the
  # replicated optimiser update.
  assert p1["flops"] / 4 < p4["flops"] < p1["flops"] / 2
