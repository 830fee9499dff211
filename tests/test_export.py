"""The export artifact (spp_jax/export.py): reloaded in a fresh process, with jax alone, it
gives the in-process network's logits at any input size above the minimum, and for padded
mixed-size batches on its fixed canvas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import jax
import numpy as np
import pytest

import workdirs
from spp_jax.data import on_device
from spp_jax.data.settings import data_settings
from spp_jax.evaluate import open_run
from spp_jax.export import PLATFORMS, ExportError, export_forms, load, save

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5

# The README's serving snippet: only jax (and numpy, flatbuffers) in the serving process.
SERVE = textwrap.dedent('''
    import json, sys, zipfile
    import jax, numpy as np

    with zipfile.ZipFile(sys.argv[1]) as z:
      manifest = json.loads(z.read("manifest.json"))
      program = jax.export.deserialize(bytearray(z.read("images.jaxexport")))
      params = [np.frombuffer(z.read(p["file"]), p["dtype"]).reshape(p["shape"])
                for p in manifest["params"]]
    forward = jax.jit(program.call)
    # pixels: uint8 (N, H, W, 3), H and W >= manifest["min_size"]
    # logits = forward(params, pixels); manifest["class_names"][logits.argmax(-1)]
''')

# Runs in a fresh process: every input of inputs.npz through the artifact, both ways.
_DRIVER = SERVE + textwrap.dedent('''
    inputs = np.load(sys.argv[2])
    out = {}
    for k in sorted(inputs.files):
      if k.startswith("x"):
        out["plain_" + k] = np.asarray(forward(params, inputs[k]))
    assert "spp_jax" not in sys.modules and "flax" not in sys.modules
    from spp_jax.export import load
    net = load(sys.argv[1])
    for k in sorted(inputs.files)[:4]:  # the same programs: a few sizes suffice
      if k.startswith("x"):
        out["load_" + k] = net(inputs[k])
    out["canvas"] = net(inputs["canvas"], image_sizes=inputs["sizes"])
    np.savez(sys.argv[3], **out)
''')


# What jax.export raises where the network still takes a Python decision on a symbolic height
# or width: the missing feature, not a bug of the exporter (any other error fails).
_NOT_SYMBOLIC = "InconclusiveDimensionOperation"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(run, artifact path) of the untrained demo network, both forms."""
  directory = tmp_path_factory.mktemp("export")
  run = open_run(workdirs.untrained_run(directory / "run"))
  try:
    programs, leaves, manifest = export_forms(run)
  except ExportError as e:
    if _NOT_SYMBOLIC not in str(e):
      raise
    pytest.xfail(f"the network is not exportable with symbolic height and width yet: {e}")
  path = str(directory / "demo.sppx")
  save(path, programs, leaves, manifest)
  return run, path


@pytest.fixture(scope="module")
def canvas_only(tmp_path_factory):
  """(run, artifact path) with the fixed-canvas form alone (symbolic batch only)."""
  directory = tmp_path_factory.mktemp("canvas")
  run = open_run(workdirs.untrained_run(directory / "run"))
  programs, leaves, manifest = export_forms(run, ["canvas"], canvas=(64, 80))
  path = str(directory / "canvas.sppx")
  save(path, programs, leaves, manifest)
  return run, path


def _sizes(run, count=20, seed=0):
  """`count` random (h, w) from the minimum to twice the base size, mostly non-square."""
  rng = np.random.default_rng(seed)
  lo, hi = run.min_input_size, 2 * run.base_size
  sizes = [(lo, lo), (hi, hi), (lo, hi)]
  while len(sizes) < count:
    sizes.append(tuple(int(v) for v in rng.integers(lo, hi + 1, size=2)))
  return sizes


def _reference(run, pixels, image_sizes=None):
  """The in-process network on evaluation's normalisation, jitted with the train state as an
  argument as the evaluation step is (one compile per shape)."""
  from flax import nnx

  settings = data_settings(run.data_cfg)

  @jax.jit
  def forward(state, x, s):
    model = nnx.merge(run.defs.eval, state.params, state.rngs, state.other, copy=True)
    return model(on_device.normalize(x, settings.mean, settings.std), s)

  return np.asarray(forward(run.state, pixels, image_sizes))


@pytest.mark.slow
def test_fresh_process_matches_the_network_at_20_sizes(exported, tmp_path):
  run, path = exported
  rng = np.random.default_rng(1)
  sizes = _sizes(run)
  assert sum(h != w for h, w in sizes) >= 10
  inputs = {f"x{i:02d}": rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
            for i, (h, w) in enumerate(sizes)}
  ch, cw = json.loads(zipfile.ZipFile(path).read("manifest.json"))["canvas"]
  canvas = np.zeros((len(sizes), ch, cw, 3), np.uint8)
  for i, (h, w) in enumerate(sizes):
    canvas[i, :h, :w] = inputs[f"x{i:02d}"][0]
  inputs.update(canvas=canvas, sizes=np.array(sizes, np.int32))
  np.savez(tmp_path / "inputs.npz", **inputs)
  (tmp_path / "driver.py").write_text(_DRIVER)
  proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), path,
                         str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = np.load(tmp_path / "out.npz")
  for i in range(len(sizes)):
    want = _reference(run, inputs[f"x{i:02d}"])
    assert want.shape == (2, 10)
    np.testing.assert_allclose(out[f"plain_x{i:02d}"], want, rtol=TOL, atol=TOL)
    if f"load_x{i:02d}" in out:
      np.testing.assert_allclose(out[f"load_x{i:02d}"], want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(out["canvas"][i], want[0], rtol=TOL, atol=TOL)


def test_artifact_contents(exported):
  run, path = exported
  with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
    manifest = json.loads(z.read("manifest.json"))
    assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
  assert {"manifest.json", "images.jaxexport", "canvas.jaxexport"} <= names
  assert manifest["platforms"] == list(PLATFORMS)
  assert manifest["min_size"] == run.min_input_size == 11
  assert manifest["class_names"][:2] == ["t-shirt_top", "trouser"]
  assert manifest["views"]["full"] == dict(kind="full", size=64, short_side=72)
  net = load(path)
  for program in net.programs.values():
    assert tuple(program.platforms) == PLATFORMS
  n_params = sum(int(np.prod(p["shape"])) for p in manifest["params"])
  assert n_params == sum(x.size for x in jax.tree.leaves(run.state.params))


def test_inputs_below_the_minimum_or_beyond_the_canvas(exported):
  run, path = exported
  net = load(path)
  m = run.min_input_size
  with pytest.raises(ExportError, match=f"input {m - 1}x40 is below the artifact's minimum "
                                        f"input {m}x{m}"):
    net(np.zeros((1, m - 1, 40, 3), np.uint8))
  with pytest.raises(ExportError, match=r"image_sizes\[1\] = 30x5 is below"):
    net(np.zeros((2, 40, 40, 3), np.uint8), image_sizes=[[40, 40], [30, 5]])
  ch, cw = net.canvas
  with pytest.raises(ExportError, match=f"exceeds the artifact's canvas {ch}x{cw}"):
    net(np.zeros((1, ch + 1, 20, 3), np.uint8), image_sizes=[[ch + 1, 20]])
  with pytest.raises(ExportError, match="pixels must be uint8"):
    net(np.zeros((1, 40, 40, 3), np.float32))
  # The program itself refuses what its symbolic constraints exclude (jax says only "Error
  # refining shapes": hence the check above).
  with pytest.raises(Exception):
    net.programs["images"].call(net._params, np.zeros((1, m - 1, 40, 3), np.uint8))


def test_canvas_only_artifact(canvas_only):
  """Mixed sizes on the canvas equal each image alone; plain calls are padded into it."""
  run, path = canvas_only
  net = load(path)
  assert set(net.programs) == {"canvas"} and net.canvas == (64, 80)
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
  np.testing.assert_allclose(net(x), _reference(run, x), rtol=TOL, atol=TOL)
  sizes = [(11, 11), (64, 23), (37, 80), (64, 80)]
  canvas = np.zeros((len(sizes), 64, 80, 3), np.uint8)
  for i, (h, w) in enumerate(sizes):
    canvas[i, :h, :w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  got = net(canvas, image_sizes=sizes)
  for i, (h, w) in enumerate(sizes):
    np.testing.assert_allclose(got[i], _reference(run, canvas[i:i + 1, :h, :w])[0], rtol=TOL,
                               atol=TOL)
  with pytest.raises(ExportError, match="exceeds the artifact's canvas 64x80"):
    net(np.zeros((1, 65, 20, 3), np.uint8))


@pytest.mark.slow
def test_command_line(exported, tmp_path):
  run, _ = exported
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "spp_jax.export", "--workdir", run.workdir]
  out = tmp_path / "cli.sppx"
  proc = subprocess.run(cmd + ["--output", str(out), "--canvas", "96x128"], cwd=_REPO,
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"wrote {out}: ") and "platforms cpu,cuda,tpu" in proc.stdout
  assert load(str(out)).canvas == (96, 128)
  for args, message in [(["--output", "/proc/nope/x.sppx"], "cannot write /proc/nope/x.sppx"),
                        (["--output", str(out), "--forms", "onnx"], "forms must be among"),
                        (["--output", str(out), "--canvas", "8x8"], "below the network's "
                                                                   "minimum")]:
    proc = subprocess.run(cmd + args, cwd=_REPO, capture_output=True, text=True, env=env,
                          timeout=900)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: ") and message in last, proc.stderr
