r"""A trained run as one file for serving: `jax.export` programs for cpu, cuda and tpu.

  python -m spp_jax.export --workdir workdirs/demo --output demo.sppx
  python -m spp_jax.export --workdir workdirs/zf5 --output zf5.sppx --canvas 448x448

  from spp_jax.export import load
  net = load("demo.sppx")
  logits = net(pixels)                      # uint8 (N, H, W, 3), any H, W >= net.min_size
  logits = net(canvas, image_sizes=sizes)   # a padded mixed-size batch, sizes (N, 2)

The file is a zip archive (stored, not compressed) of
  manifest.json      what the programs take: the minimum size, the canvas, class names, the
                     data set's resizing (the views' short sides), the parameters' shapes
  images.jaxexport   logits of uint8 (batch, H, W, 3), batch, H and W symbolic, H, W >= minimum
  canvas.jaxexport   logits of uint8 (batch, Hc, Wc, 3) and image_sizes (batch, 2) int32:
                     images of several sizes zero-padded at the bottom/right to one fixed
                     canvas, each pooled over its own map (docs/paper.md §2); batch symbolic
  params/NNNN.bin    the parameters, raw (little-endian) bytes, in the programs' argument order
Both programs take (params, ...) so the weights are stored once, and normalise the pixels
with the training data's mean and std inside, as the evaluation steps do
(spp_jax/data/on_device.py `normalize`); resizing stays with the caller. Serving needs only jax
(and flatbuffers, which jax's serialisation uses): see `load`, or the README's snippet, which
reads the archive with the standard library.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence

import numpy as np

FORMAT = "spp_jax.export/1"
PLATFORMS = ("cpu", "cuda", "tpu")
FORMS = ("images", "canvas")
MANIFEST = "manifest.json"


class ExportError(ValueError):
  """An artifact that cannot be made, read or called as asked; the message is one line."""


# ----------------------------------------------------------------------------- exporting


def _forward(run):
  """(logits(param_leaves, pixels, image_sizes=None), param leaves) of a run's eval network."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from spp_jax.data import on_device
  from spp_jax.data.settings import data_settings

  graphdef, rngs, other = run.defs.eval, run.state.rngs, run.state.other
  leaves, treedef = jax.tree.flatten(jax.device_get(run.state.params))
  settings = data_settings(run.data_cfg)

  def logits(param_leaves, pixels, image_sizes=None):
    params = jax.tree.unflatten(treedef, list(param_leaves))
    model = nnx.merge(graphdef, params, rngs, other, copy=True)
    x = on_device.normalize(pixels, settings.mean, settings.std)
    return model(x, image_sizes).astype(jnp.float32)

  return logits, [np.asarray(x) for x in leaves]


def default_canvas(run) -> tuple[int, int]:
  """The largest full-image bucket of the run's data (every full view fits), at least twice the
  base size on each side."""
  from spp_jax.data.settings import data_settings, view_settings
  from spp_jax.data.transforms import scale_buckets

  s = data_settings(run.data_cfg)
  hs, ws = [2 * run.base_size], [2 * run.base_size]
  for v in run.config.eval.views:
    if v.kind in ("full", "multiscale"):
      vs = view_settings(v, s)
      for short in (vs.short_side,) if v.kind == "full" else vs.scales:
        for h, w in scale_buckets(s.buckets, s.full_short_side, short):
          hs.append(h)
          ws.append(w)
  return max(hs), max(ws)


def export_forms(run, forms: Sequence[str] = FORMS, *, canvas: tuple[int, int] | None = None,
                 platforms: Sequence[str] = PLATFORMS) -> tuple[dict, list[np.ndarray], dict]:
  """({form: serialized bytes}, parameter leaves, manifest) of a run.

  Raises ExportError naming the form that cannot be exported, and why.
  """
  import jax
  import jax.numpy as jnp

  unknown = sorted(set(forms) - set(FORMS))
  if unknown or not forms:
    raise ExportError(f"forms must be among {', '.join(FORMS)}, got {', '.join(forms)}")
  if run.config.model.get("head") == "fixed":
    raise ExportError("the no-SPP baseline (model.head='fixed') takes only "
                      f"{run.base_size}x{run.base_size} inputs; export an SPP network")
  logits, leaves = _forward(run)
  params = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  m = run.min_input_size
  canvas = tuple(canvas or default_canvas(run))
  if min(canvas) < m:
    raise ExportError(f"canvas {canvas[0]}x{canvas[1]} is below the network's minimum {m}")
  out = {}
  for form in forms:
    if form == "images":
      b, h, w = jax.export.symbolic_shape("b, h, w", constraints=(f"h >= {m}", f"w >= {m}"))
      args = (params, jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8))
      fn = lambda p, x: logits(p, x)  # noqa: E731
    else:
      (b,) = jax.export.symbolic_shape("b")
      args = (params, jax.ShapeDtypeStruct((b, *canvas, 3), jnp.uint8),
              jax.ShapeDtypeStruct((b, 2), jnp.int32))
      fn = logits
    try:
      exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
    except Exception as e:  # noqa: BLE001 - reported with the form and the first line
      why = str(e).splitlines()[0] if str(e) else type(e).__name__
      hint = " (export the fixed-canvas form alone with --forms canvas)" if form == "images" else ""
      raise ExportError(f"the {form!r} form cannot be exported: {type(e).__name__}: "
                        f"{why}{hint}") from e
    out[form] = exported.serialize()
  return out, leaves, _manifest(run, forms, canvas, leaves, platforms)


def _manifest(run, forms, canvas, leaves, platforms) -> dict:
  import jax

  from spp_jax.data.settings import data_settings, view_settings
  from spp_jax.predict import class_names

  s = data_settings(run.data_cfg)
  views = {}
  for v in run.config.eval.views:
    if v.kind != "multiscale":
      vs = view_settings(v, s)
      views[v.name] = dict(kind=vs.kind, size=vs.size, short_side=vs.short_side)
  inputs = {
      "images": dict(args=["params", "pixels uint8 (batch, H, W, 3)"]),
      "canvas": dict(args=["params", f"pixels uint8 (batch, {canvas[0]}, {canvas[1]}, 3)",
                           "image_sizes int32 (batch, 2)"]),
  }
  return dict(
      format=FORMAT, forms={f: dict(file=f"{f}.jaxexport", **inputs[f]) for f in forms},
      platforms=list(platforms), min_size=run.min_input_size, base_size=run.base_size,
      canvas=list(canvas), num_classes=run.num_classes,
      class_names=class_names(run.data_cfg, run.num_classes),
      mean=list(s.mean), std=list(s.std), views=views,
      params=[dict(file=_param_file(i), shape=list(x.shape), dtype=str(x.dtype))
              for i, x in enumerate(leaves)],
      source=dict(workdir=run.workdir, step=run.step, model=run.config.model.to_dict(),
                  data=run.config.data.name),
      jax_version=jax.__version__)


def _param_file(i: int) -> str:
  return f"params/{i:04d}.bin"


def save(path: str, programs: dict, leaves: list[np.ndarray], manifest: dict) -> int:
  """Writes the archive atomically; returns its size in bytes."""
  if sys.byteorder != "little":
    raise ExportError("artifacts are written on little-endian machines only")
  from spp_jax import paths

  remote = paths.is_remote(path)  # gs://: the archive is made locally, then uploaded whole
  tmp = (os.path.join(tempfile.mkdtemp(prefix="spp_export_"), "archive") if remote
         else f"{path}.{os.getpid()}.tmp")
  try:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
      z.writestr(MANIFEST, json.dumps(manifest, indent=2))
      for form, blob in programs.items():
        z.writestr(manifest["forms"][form]["file"], bytes(blob))
      for i, x in enumerate(leaves):
        z.writestr(_param_file(i), np.ascontiguousarray(x).tobytes())
    size = os.path.getsize(tmp)
    if remote:
      with open(tmp, "rb") as f:
        paths.path(path).write_bytes(f.read())
    else:
      os.replace(tmp, path)
  except OSError as e:
    raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return size


# ----------------------------------------------------------------------------- loading


class Exported:
  """A loaded artifact: net(pixels) or net(pixels, image_sizes=sizes) -> logits (N, classes).

  pixels: uint8 (N, H, W, 3) RGB at the data set's scale (resize as its views do:
  manifest["views"]). Without image_sizes every image is H x W (the "images" program; an
  artifact with only the canvas form pads them into its canvas); with image_sizes (N, 2) the
  images are padded at the bottom/right to at most the canvas. Each new input shape compiles
  once (jax.jit).
  """

  def __init__(self, manifest: dict, programs: dict, params: list):
    import jax

    self.manifest = manifest
    self.min_size = int(manifest["min_size"])
    self.canvas = tuple(manifest["canvas"])
    self.class_names = list(manifest["class_names"])
    self.programs = programs  # {form: jax.export.Exported}
    self._params = params
    self._calls = {form: jax.jit(exp.call) for form, exp in programs.items()}

  def _check(self, what: str, h: int, w: int):
    if min(h, w) < self.min_size:
      raise ExportError(f"{what} {h}x{w} is below the artifact's minimum input "
                        f"{self.min_size}x{self.min_size}")

  def __call__(self, pixels, image_sizes=None) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
      raise ExportError(f"pixels must be uint8 (N, H, W, 3), got {pixels.dtype} "
                        f"{pixels.shape}")
    n, h, w = pixels.shape[:3]
    if image_sizes is None:
      self._check("input", h, w)
      if "images" in self._calls:
        return np.asarray(self._calls["images"](self._params, pixels))
      image_sizes = np.tile(np.array([h, w], np.int32), (n, 1))
    sizes = np.asarray(image_sizes, np.int32)
    if sizes.shape != (n, 2):
      raise ExportError(f"image_sizes must be ({n}, 2), got {sizes.shape}")
    for i, (hi, wi) in enumerate(sizes.tolist()):
      self._check(f"image_sizes[{i}] =", hi, wi)
      if hi > h or wi > w:
        raise ExportError(f"image_sizes[{i}] = {hi}x{wi} exceeds the pixels' {h}x{w}")
    if "canvas" not in self._calls:
      raise ExportError("this artifact has no canvas form; call it without image_sizes")
    ch, cw = self.canvas
    if h > ch or w > cw:
      raise ExportError(f"input {h}x{w} exceeds the artifact's canvas {ch}x{cw}")
    canvas = np.zeros((n, ch, cw, 3), np.uint8)
    canvas[:, :h, :w] = pixels
    return np.asarray(self._calls["canvas"](self._params, canvas, sizes))


def load(path: str) -> Exported:
  """Reads an artifact written by `save` (spp_jax.export); needs only jax and numpy."""
  import jax
  import jax.numpy as jnp

  try:
    z = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ExportError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
  with z:
    try:
      manifest = json.loads(z.read(MANIFEST))
    except KeyError:
      raise ExportError(f"{path} is not an spp_jax export (no {MANIFEST})") from None
    if manifest.get("format") != FORMAT:
      raise ExportError(f"{path} has format {manifest.get('format')!r}, this reader takes "
                        f"{FORMAT!r}")
    programs = {form: jax.export.deserialize(bytearray(z.read(spec["file"])))
                for form, spec in manifest["forms"].items()}
    params = [np.frombuffer(z.read(p["file"]), dtype=jnp.dtype(p["dtype"]))
              .reshape(p["shape"]) for p in manifest["params"]]
  return Exported(manifest, programs, [jnp.asarray(x) for x in params])


# ----------------------------------------------------------------------------- command line


def _parse_canvas(text: str | None) -> tuple[int, int] | None:
  if not text:
    return None
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ExportError(f"--canvas must be HxW, e.g. 448x448, got {text!r}") from None
  return h, w


def _define_flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).",
                      required=True)
  flags.DEFINE_string("output", None, "The artifact to write, e.g. model.sppx.", required=True)
  flags.DEFINE_integer("step", None, "A saved step; default the latest checkpoint.")
  flags.DEFINE_list("forms", list(FORMS), "images (symbolic H, W), canvas (fixed canvas + "
                    "image_sizes), or both.")
  flags.DEFINE_string("canvas", None, "HxW of the canvas form; default the largest full-image "
                      "bucket, at least twice the base size.")
  flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms the programs are lowered for.")


def main(argv):
  from absl import flags

  from spp_jax import errors, runtime
  from spp_jax.evaluate import RunError, check_writable, open_run, quiet_logs

  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  quiet_logs()
  runtime.configure_cpu_flags()
  try:
    check_writable(f.output)
    canvas = _parse_canvas(f.canvas)
    run = open_run(f.workdir, f.step)
    start = time.perf_counter()
    programs, leaves, manifest = export_forms(run, f.forms, canvas=canvas,
                                              platforms=f.platforms)
    size = save(f.output, programs, leaves, manifest)
  except (RunError, ExportError, errors.ExpectedError, ValueError) as e:
    errors.report(e)
    return 1
  forms = ", ".join(f"{k} ({len(v) / 1e3:.0f} kB)" for k, v in programs.items())
  print(f"wrote {f.output}: {size / 1e6:.1f} MB, forms {forms}, platforms "
        f"{','.join(f.platforms)}, step {run.step}, {time.perf_counter() - start:.1f} s")
  return 0


def run_cli(argv=None):
  """Console script spp-export."""
  from absl import app

  _define_flags()
  app.run(main, argv=argv)


if __name__ == "__main__":
  run_cli()
