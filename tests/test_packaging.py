"""Packaging: the wheel's metadata (SPDX license, classifiers, console scripts, py.typed), the
configs shipped in it and found by name, and a wheel installed into a fresh venv outside the
repository that trains, evaluates, predicts and exports."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

from spp_jax import configs

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("spp-train", "spp-evaluate", "spp-predict", "spp-export", "spp-sweep", "spp-plan")


def _pyproject() -> dict:
  with open(os.path.join(_REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_metadata():
  project = _pyproject()["project"]
  assert project["license"] == "Apache-2.0"  # an SPDX expression, not a table (PEP 639)
  assert project["license-files"] == ["LICENSE"]
  assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639
  assert "Typing :: Typed" in project["classifiers"]
  assert any(d.startswith("flatbuffers") for d in project["dependencies"])
  assert sorted(project["scripts"]) == sorted(SCRIPTS)
  with open(os.path.join(_REPO, "LICENSE")) as f:
    head = f.read(400).split()
  assert head[:4] == ["Apache", "License", "Version", "2.0,"]
  assert os.path.isfile(os.path.join(_REPO, "spp_jax", "py.typed"))


def test_console_script_targets_exist():
  import importlib

  for script, target in _pyproject()["project"]["scripts"].items():
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name)), script


def test_shipped_configs_found_by_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  shipped = os.path.join(configs.DIRECTORY, "zf5_imagenet.py")
  assert configs.resolve("zf5_imagenet.py:multi") == shipped + ":multi"
  assert configs.resolve("configs/zf5_imagenet.py") == shipped  # the README's form
  assert {"demo.py", "imagenette.py", "zf5_imagenet.py", "detect_demo.py"} <= set(
      configs.names())
  (tmp_path / "demo.py").write_text("def get_config(arg=None):\n  return arg\n")
  assert configs.resolve("demo.py:x") == str(tmp_path / "demo.py") + ":x"  # a local file wins
  assert configs.resolve_argv(["p", "--config", "demo.py:x", "--config=imagenette.py:tiny",
                               "--config.seed=3"]) == [
      "p", "--config", "demo.py:x", f"--config={configs.DIRECTORY}/imagenette.py:tiny",
      "--config.seed=3"]
  with pytest.raises(ValueError, match="config file 'nope.py' not found"):
    configs.resolve_argv(["p", "--config=nope.py"])
  assert configs.load("demo.py", "y", relative_to=str(tmp_path / "x.py")) == "y"
  assert configs.load("configs/demo.py:tiny").data.name == "multiscale_fashion_mnist/tiny"


def test_main_refuses_a_missing_config_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "spp_jax.main", "--config", "nope.py:x",
                         "--workdir", str(tmp_path / "w")], cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: config file 'nope.py' not found (nor a shipped config of that name: "
      f"{', '.join(configs.names())})"]


def _source_copy(target) -> str:
  """The files a wheel is built from, copied (a build writes build/ and *.egg-info)."""
  os.makedirs(target)
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(_REPO, name), target)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(os.path.join(_REPO, "spp_jax"), os.path.join(target, "spp_jax"),
                  symlinks=True, ignore=ignore)
  shutil.copytree(os.path.join(_REPO, "configs"), os.path.join(target, "configs"), ignore=ignore)
  return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  import setuptools

  if tuple(int(v) for v in setuptools.__version__.split(".")[:2]) < (77, 0):
    pytest.skip(f"building needs setuptools >= 77 (PEP 639), this venv has "
                f"{setuptools.__version__}")
  root = tmp_path_factory.mktemp("wheel")
  source = _source_copy(str(root / "src"))
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                         "--no-build-isolation", "-w", str(root / "dist"), "-v", source],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  warned = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "deprecat" in line.lower() or "warning" in line.lower()]
  assert not [w for w in warned if "licen" in w.lower()], warned
  assert not [w for w in warned if "SetuptoolsDeprecationWarning" in w], warned
  (path,) = (root / "dist").glob("spp_jax-*.whl")
  return str(path)


def test_wheel_contents(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    meta = z.read("spp_jax-0.1.0.dist-info/METADATA").decode()
    entry_points = z.read("spp_jax-0.1.0.dist-info/entry_points.txt").decode()
  for config in ("demo.py", "zf5_imagenet.py", "imagenette.py", "detect_demo.py",
                 "__init__.py"):
    assert f"spp_jax/configs/{config}" in names
  assert "spp_jax/py.typed" in names
  assert "spp_jax-0.1.0.dist-info/licenses/LICENSE" in names
  assert "License-Expression: Apache-2.0" in meta
  assert "Classifier: Typing :: Typed" in meta
  for script in SCRIPTS:
    assert f"{script} = " in entry_points
  assert not any(n.startswith(("tests/", "experiments/")) for n in names)


def _venv_with_wheel(wheel, root) -> str:
  """A fresh venv holding the wheel, with this venv's other packages visible (offline)."""
  venv = os.path.join(root, "venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
  purelib = subprocess.run(
      [os.path.join(venv, "bin", "python"), "-c",
       "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip()
  # A path line: this venv's packages, without its .pth files (the repo's editable finder).
  ours = sysconfig.get_paths()["purelib"]
  with open(os.path.join(purelib, "_spp_jax_test_deps.pth"), "w") as f:
    f.write("\n".join(p for p in [ours, *site.getsitepackages()] if p != purelib) + "\n")
  proc = subprocess.run([sys.executable, "-m", "pip", "--python",
                         os.path.join(venv, "bin", "python"), "install", "--no-deps",
                         "--no-index", wheel], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return venv


@pytest.mark.slow
def test_installed_wheel_outside_the_repository(wheel, tmp_path):
  venv = _venv_with_wheel(wheel, str(tmp_path))
  bin_dir = os.path.join(venv, "bin")
  work = tmp_path / "elsewhere"
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(JAX_PLATFORMS="cpu", PATH=bin_dir + os.pathsep + env.get("PATH", ""))

  def sh(*args, timeout=900):
    proc = subprocess.run(list(args), cwd=str(work), capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout

  where = sh(os.path.join(bin_dir, "python"), "-c", "import spp_jax; print(spp_jax.__file__)")
  assert where.startswith(venv), where  # the wheel's copy, not the repository's
  for script in SCRIPTS:
    assert os.access(os.path.join(bin_dir, script), os.X_OK)
  sh("spp-train", "--config", "demo.py:tiny", "--workdir", "run")
  results = json.load(open(work / "run" / "results.json"))
  assert "center/top1" in results
  out = sh("spp-evaluate", "--workdir", "run", "--views", "center", "--output", "eval.json")
  assert json.load(open(work / "eval.json"))["results"]["center/top1"] == results["center/top1"]
  assert "center" in out
  from spp_jax.data import sources

  source = sources.open_source(configs.load("demo.py:tiny").data, "test")
  (work / "item.png").write_bytes(source.records[0][source.image_key])
  out = sh("spp-predict", "--workdir", "run", "--top_k", "1", "item.png")
  assert out.startswith("item.png (")
  out = sh("spp-export", "--workdir", "run", "--output", "model.sppx")
  assert "platforms cpu,cuda,tpu" in out
  logits = sh(os.path.join(bin_dir, "python"), "-c",
              "import numpy as np; from spp_jax.export import load; "
              "print(load('model.sppx')(np.zeros((1, 50, 70, 3), np.uint8)).shape)")
  assert logits.strip() == "(1, 10)"
