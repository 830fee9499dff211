r"""Classifies image files with a trained run: class names and probabilities.

  python -m spp_jax.predict --workdir workdirs/demo shirt.png bag.jpg
  python -m spp_jax.predict --workdir workdirs/demo --view ten_view --top_k 3 --json *.png

Each file is made into the network's input by evaluation's own functions (the same decoding,
short-side resizing, bucket and crops as the view of that kind in config.eval.views:
spp_jax/data/examples.py `eval_views`), so a file scores as it would in the data set. With
--view full (the default) every image keeps its aspect ratio and its own size; several images
go as one zero-padded batch with their sizes, on the masked path whose results equal each
image run alone (docs/paper.md §2). Probabilities are the softmax averaged over the view's
crops (ten_view: 10). Class names come from the data set's label feature.

An undecodable file is skipped with a line naming it; an image below the network's minimum
is resized up, as evaluation does (data.small_image="reject" refuses it, naming the file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import numpy as np
from etils import epath

from spp_jax import errors
from spp_jax.evaluate import Run, RunError, open_run

log = logging.getLogger(__name__)

PREDICT_VIEWS = ("full", "center", "ten_view")


# ----------------------------------------------------------------------------- preprocessing


def view_settings_for(run: Run, kind: str):
  """The ViewSettings of the config's first view of `kind` (else that kind's defaults)."""
  from spp_jax.data.settings import data_settings, view_settings
  from spp_jax.train.config_schema import view as make_view

  if kind not in PREDICT_VIEWS:
    raise RunError(f"--view must be one of {', '.join(PREDICT_VIEWS)}, got {kind!r}")
  settings = data_settings(run.data_cfg)
  chosen = next((v for v in run.config.eval.views if v.kind == kind), make_view(kind, kind))
  return settings, view_settings(chosen, settings)


def preprocess(encoded: bytes, settings, view) -> list[np.ndarray]:
  """The V float32 views (h, w, 3) of one encoded image, made as evaluation makes them.

  The full view's padded shape is the data set's bucket for the image's header size (as
  data/pipeline.py `example_buckets` chooses it), at the view's short side.
  Raises whatever decoding raises, or examples.SmallImage (data.small_image="reject").
  """
  from spp_jax.data import examples, transforms

  # Decoded as the eval batches decode (data/pipeline.py BatchMaker._decode, whose draft size
  # for these views is the view's short side).
  decode = transforms.decode_cv2 if settings.decoder == "opencv" else transforms.decode_pil
  image = decode(encoded, draft_short_side=view.short_side)
  buckets = None
  if view.kind == "full":
    hw = transforms.image_size_of(encoded)
    k = transforms.choose_bucket(transforms.short_side_size(hw, settings.full_short_side),
                                 settings.buckets)
    buckets = [transforms.scale_buckets(settings.buckets, settings.full_short_side,
                                        view.short_side)[k]]
  return examples.eval_views(image, settings, view, buckets)


@dataclasses.dataclass
class Loaded:
  path: str
  size: tuple[int, int]  # the file's (height, width)
  views: list[np.ndarray]


def load_files(paths: list[str], settings, view) -> tuple[list[Loaded], list[dict]]:
  """(the images that could be made, [{"file", "error"}] for those skipped)."""
  from spp_jax.data import examples, transforms

  loaded, skipped = [], []
  for path in paths:
    try:
      encoded = epath.Path(path).read_bytes()  # a local file or gs://bucket/...
    except OSError as e:
      skipped.append(dict(file=path, error=f"cannot read: {e.strerror or e}"))
      continue
    try:
      views = preprocess(encoded, settings, view)
    except examples.SmallImage as e:
      skipped.append(dict(file=path, error=f"refused: {e} (data.small_image='reject')"))
      continue
    except Exception as e:  # noqa: BLE001 - any decoder failure: the file is skipped
      skipped.append(dict(file=path, error=f"cannot decode: {type(e).__name__}"))
      continue
    loaded.append(Loaded(path, transforms.image_size_of(encoded), views))
  return loaded, skipped


def pad_batch(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Images (h_i, w_i, 3) -> zero-padded (N, H, W, 3) at the bottom/right and sizes (N, 2)."""
  h = max(x.shape[0] for x in images)
  w = max(x.shape[1] for x in images)
  batch = np.zeros((len(images), h, w, 3), np.float32)
  sizes = np.zeros((len(images), 2), np.int32)
  for i, x in enumerate(images):
    batch[i, :x.shape[0], :x.shape[1]] = x
    sizes[i] = x.shape[:2]
  return batch, sizes


# ----------------------------------------------------------------------------- the network


def class_names(data_cfg, num_classes: int) -> list[str]:
  """The label feature's names; "class <i>" where the data set has none or is not here."""
  try:
    from spp_jax.data import sources
    from spp_jax.data.settings import data_settings

    builder = sources.ensure_prepared(data_settings(data_cfg))
    _, label_key = sources.feature_keys(builder.info)
    names = list(builder.info.features[label_key].names)
  except Exception as e:  # noqa: BLE001 - names are a convenience; the indices still hold
    log.warning("class names of %s unavailable (%s); using indices", data_cfg.name, e)
    names = []
  if len(names) != num_classes:
    names = [f"class {i}" for i in range(num_classes)]
  return names


class Classifier:
  """Softmax probabilities of a run's network for padded batches, jitted per batch shape."""

  def __init__(self, run: Run):
    import jax
    from flax import nnx

    graphdef = run.defs.eval

    def probabilities(state, images, sizes):
      model = nnx.merge(graphdef, state.params, state.rngs, state.other, copy=True)
      return jax.nn.softmax(model(images, sizes).astype(jax.numpy.float32), axis=-1)

    self._run = run
    self._fn = jax.jit(probabilities)

  def __call__(self, images: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """images (N, H, W, 3) float32 normalised, sizes (N, 2) -> (N, classes) probabilities."""
    return np.asarray(self._fn(self._run.state, images, sizes))


def predict(run: Run, paths: list[str], *, view: str = "full", top_k: int = 5,
            batch_size: int = 16) -> tuple[list[dict], list[dict]]:
  """Top-k classes of each file: ([{"file", "size", "predictions": [{"class", "name",
  "probability"}]}], skipped [{"file", "error"}])."""
  if top_k < 1:
    raise RunError(f"--top_k must be >= 1, got {top_k}")
  settings, v = view_settings_for(run, view)
  loaded, skipped = load_files(paths, settings, v)
  names = class_names(run.data_cfg, run.num_classes)
  classify = Classifier(run)
  out = []
  for start in range(0, len(loaded), batch_size):
    chunk = loaded[start:start + batch_size]
    flat = [x for item in chunk for x in item.views]  # V views per image, image-major
    probs = classify(*pad_batch(flat)).reshape(len(chunk), len(chunk[0].views), -1).mean(1)
    for item, p in zip(chunk, probs):
      order = np.argsort(-p, kind="stable")[:top_k]
      out.append(dict(file=item.path, size=list(item.size), predictions=[
          dict(**{"class": int(c)}, name=names[c], probability=float(p[c])) for c in order]))
  return out, skipped


# ----------------------------------------------------------------------------- command line


def _define_flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).",
                      required=True)
  flags.DEFINE_integer("step", None, "A saved step; default the latest checkpoint.")
  flags.DEFINE_enum("view", "full", PREDICT_VIEWS, "Test view: the full image at the config's "
                    "short side, the centre crop, or 10 crops with flips.")
  flags.DEFINE_integer("top_k", 5, "Classes shown per image.")
  flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")
  flags.DEFINE_bool("json", False, "Print one JSON document instead of text lines.")


def main(argv):
  from absl import flags

  from spp_jax import runtime
  from spp_jax.evaluate import quiet_logs

  f = flags.FLAGS
  paths = argv[1:]
  if not paths:
    print("error: no image files given", file=sys.stderr)
    return 2
  quiet_logs(logging.WARNING)
  runtime.configure_cpu_flags()
  try:
    run = open_run(f.workdir, f.step)
    results, skipped = predict(run, paths, view=f.view, top_k=f.top_k, batch_size=f.batch_size)
  except (RunError, errors.ExpectedError, ValueError) as e:
    errors.report(e)
    return 1
  for s in skipped:
    print(f"skipped {s['file']}: {s['error']}", file=sys.stderr)
  if f.json:
    print(json.dumps(dict(workdir=run.workdir, step=run.step, view=f.view, results=results,
                          skipped=skipped), indent=2))
  else:
    for r in results:
      tops = ", ".join(f"{p['name']} {p['probability']:.3f}" for p in r["predictions"])
      print(f"{r['file']} ({r['size'][0]}x{r['size'][1]}): {tops}")
  return 0 if results else 1


def run_cli(argv=None):
  """Console script spp-predict."""
  from absl import app

  _define_flags()
  app.run(main, argv=argv)


if __name__ == "__main__":
  run_cli()
