"""The Colab notebook, every cell, on a CPU: install, start-up, data, bf16 training with grain
workers, evaluation and curves.

Its kernel runs in a fresh virtual environment that does not have spp_jax: the install cell
installs the checkout there. The environment borrows this one's third-party packages through
a .pth file (so nothing is downloaded) and is left without spp_jax's own files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "spp_imagenette_colab.ipynb")


def _cells():
  return nbformat.read(NOTEBOOK, as_version=4).cells


def _code(marker: str) -> str:
  return next(c.source for c in _cells() if c.cell_type == "code" and marker in c.source)


def test_an_unset_repository_stops_with_a_clear_message():
  namespace: dict = {}
  exec(_code("REPO = "), namespace)  # the parameters cell, as shipped  # noqa: S102
  assert namespace["REPO"] == ""
  with pytest.raises(ValueError, match="REPO is not set.*git URL.*directory"):
    exec(_code("if not REPO:"), namespace)  # noqa: S102


def test_nothing_touches_the_backend_before_start_up():
  """jax.distributed refuses to start after the first backend use (train/cluster.py)."""
  sources = [c.source for c in _cells() if c.cell_type == "code"]
  first_use = min(i for i, s in enumerate(sources)
                  if any(t in s for t in ("jax.devices(", "jax.default_backend(", "jnp.")))
  start = next(i for i, s in enumerate(sources) if "cluster.initialize(" in s)
  assert start == first_use
  s = sources[start]
  assert s.index("cluster.initialize(") < min(s.index(t) for t in ("jax.devices(",
                                                                   "jax.default_backend("))
  assert not any("import jax" in s for s in sources[:start])


def _wheel(out_dir) -> str:
  """The checkout as a wheel. With its build backend importable offline, built by pip;
  otherwise written directly (PEP 427) with what setuptools packages: the spp_jax packages
  (links followed, py.typed included), pyproject's dependencies and console scripts."""
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                          "--no-build-isolation", "-w", str(out_dir), REPO],
                         capture_output=True, text=True)
  built = [f for f in os.listdir(out_dir) if f.endswith(".whl")] if build.returncode == 0 else []
  return os.path.join(out_dir, built[0]) if built else _write_wheel(out_dir)


def _write_wheel(out_dir) -> str:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  name, version = project["name"], project["version"]
  info = f"{name}-{version}.dist-info"
  files = {}
  for root, dirs, names in os.walk(os.path.join(REPO, "spp_jax"), followlinks=True):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for n in names:
      with open(os.path.join(root, n), "rb") as f:
        files[os.path.relpath(os.path.join(root, n), REPO)] = f.read()
  files[f"{info}/METADATA"] = "".join(
      [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
       f"Requires-Python: {project['requires-python']}\n",
       *(f"Requires-Dist: {r}\n" for r in project["dependencies"])]).encode()
  scripts = project.get("scripts", {})
  if scripts:
    files[f"{info}/entry_points.txt"] = "".join(
        ["[console_scripts]\n", *(f"{k} = {v}\n" for k, v in scripts.items())]).encode()
  files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: tests/test_notebook.py\n"
                            b"Root-Is-Purelib: true\nTag: py3-none-any\n")
  digest = lambda d: base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()
  record = [f"{p},sha256={digest(d)},{len(d)}" for p, d in files.items()]
  files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,", ""]).encode()
  path = os.path.join(out_dir, f"{name}-{version}-py3-none-any.whl")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for p, d in files.items():
      z.writestr(p, d)
  return path


def _fresh_kernel(tmp_path) -> str:
  """A virtual environment without spp_jax, seeing this one's other packages, as a kernel."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  ours = sysconfig.get_paths()["purelib"]
  borrowed = tmp_path / "borrowed"
  borrowed.mkdir()
  for entry in os.listdir(ours):
    if "spp_jax" not in entry and entry not in ("pip", "setuptools", "_distutils_hack"):
      os.symlink(os.path.join(ours, entry), borrowed / entry)
  with open(os.path.join(site, "_borrowed.pth"), "w") as f:
    f.write(f"{borrowed}\n")
  spec = tmp_path / "jupyter" / "kernels" / "fresh"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fresh venv", "language": "python", "env": {"JAX_PLATFORMS": "cpu"}}))
  return str(venv)


@pytest.mark.slow
def test_colab_notebook_runs_every_cell_on_cpu(tmp_path, monkeypatch):
  venv = _fresh_kernel(tmp_path)
  wheel = _wheel(str(tmp_path))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  drive = tmp_path / "drive" / "MyDrive"
  drive.mkdir(parents=True)
  overrides = {"model.dtype": "bfloat16",
               "compilation_cache_dir": os.environ.get("SPP_JAX_CACHE_DIR", "")}
  nb = nbformat.read(NOTEBOOK, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"REPO = {REPO!r}\nWHEEL = {wheel!r}\nACCELERATOR = 'cpu'\nCONFIG_ARG = 'multi,tiny'\n"
      f"EPOCHS = None\nNUM_WORKERS = 2\nOVERRIDES = {overrides!r}\n"
      f"DRIVE = {str(drive)!r}\nLOCAL = {str(tmp_path / 'local')!r}\n"
      f"DATA_DIR = {str(tmp_path / 'tfds')!r}\nPIP_OPTIONS = ['--no-index', '--no-deps']\n"
      "import matplotlib\nmatplotlib.use('Agg')"))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="fresh",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "keeping this runtime's jax 0.10" in outputs
  assert f"from {venv}" in outputs  # the installed copy, not the checkout
  assert "launch: single | JAX" in outputs and "on cpu" in outputs
  assert "centre crop top-1" in outputs and "full image top-1" in outputs
  workdir = drive / "spp_jax_runs" / "zf5_imagenette_multi"
  assert (workdir / "results.json").exists()
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["dtype"] == "bfloat16" and saved["data"]["num_workers"] == 2
  assert saved["data"]["name"] == "multiscale_fashion_mnist/tiny"
  assert os.listdir(tmp_path / "tfds" / "multiscale_fashion_mnist" / "tiny")  # prepared here
