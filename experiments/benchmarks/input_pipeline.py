"""Input pipeline throughput on the embedded data set, against the small network's appetite.

  python experiments/benchmarks/input_pipeline.py                      # "small" config (12k)
  python experiments/benchmarks/input_pipeline.py --config full --rounds 3
  python experiments/benchmarks/input_pipeline.py --workers 0 2 4 --batches 40

Measures, in one run and alternating round by round so every variant sees the same machine
load:
  - training batches (crop mode: short side 72, random 64 crops, flip, colour jitter, mean/std)
    in images/s, with grain workers 0 and 2 (0: the batches are made in the main process, by
    `data.prefetch` threads);
  - full-image evaluation batches (short side 72, buckets 72x72, 72x112, 112x72), images/s;
  - a training step of `spp_jax.models.create("small")` (SGD with momentum, float32) on 64x64
    batches of the same size, images/s: what a training run consumes.
The time to start the workers and produce the first batch is reported apart ("first batch"),
the rate counts the batches after it. Medians over rounds; the ratio pipeline / network is
the goal's figure (>= 3 with 2 workers). CPU ms per image (process time of this process) is
less sensitive to other jobs on a shared machine than images/s: with 0 workers it is the whole
cost of making a training image, for the network the CPU cost of consuming one.

  python experiments/benchmarks/input_pipeline.py --jpeg [--images 512 --rounds 3]

ImageNet-like JPEGs instead: a TFDS array_record set made from real
photographs (scikit-image's sample photos, `pip install scikit-image`: a benchmark-only
dependency), cut and resized to about 500x375 and re-encoded at quality 90, and a copy
pre-resized to short side 256 (`prepare --max_short_side 256`). Per core (one thread, CPU time
of this process per image): Pillow decode-only of the stored files (the yardstick), training
batches at 224 and 180 in crop and full-image mode, ten_view evaluation, for both stores and
for data.batch_dtype uint8 (the device finishes the images) and float32 (the host does, as
before); the bytes per image sent to the device; the padding fraction of bucket sets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)


def data_config(args, workers: int):
  import ml_collections
  return ml_collections.ConfigDict(dict(
      name=f"multiscale_fashion_mnist/{args.config}", data_dir=args.data_dir, train_split="train",
      eval_split="test", num_workers=workers, resize_short=72, crop_size=64, flip=True,
      color_jitter=0.1, mean=(122.0, 117.0, 104.0), std=(58.0, 57.0, 57.0),
      full_image=dict(short_side=72, buckets=((72, 72), (72, 112), (112, 72))),
      bad_image="skip", small_image="resize", min_size=32, prefetch=args.prefetch))


def time_iterator(it, batches: int) -> tuple[float, float, float]:
  """(seconds to the first batch, images/s over the next `batches`, CPU ms per image of this
  process over them: all the work with 0 workers, only the hand-over with workers)."""
  t0 = time.perf_counter()
  first = next(it)
  t1 = time.perf_counter()
  c1 = time.process_time()
  n = 0
  for _ in range(batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    n += int(batch["mask"].size)
  t2 = time.perf_counter()
  cpu_ms = (time.process_time() - c1) * 1e3 / max(n, 1)
  it.close()
  del first
  return t1 - t0, n / max(t2 - t1, 1e-9), cpu_ms


def bench_train(args, workers: int, epoch: int):
  from spp_jax import data
  it = data.train_iterator(data_config(args, workers), batch_size=args.batch, image_size=64,
                           epoch=epoch, seed=0)
  return time_iterator(it, args.batches)


def bench_eval_full(args, workers: int):
  from spp_jax import data
  it = data.eval_iterator(data_config(args, workers), dict(name="full", kind="full"),
                          batch_size=args.batch)
  return time_iterator(it, args.batches)


def make_network_step(args):
  """Returns run(steps) -> images/s of the small network's training step, compiled once."""
  from spp_jax import models

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  model = models.create("small", num_classes=10, rngs=nnx.Rngs(params=0, dropout=1))
  optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.batch, 64, 64, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
  compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels).compile()
  holder = {"state": state}
  for _ in range(3):
    holder["state"], loss = compiled(holder["state"], images, labels)
  loss.block_until_ready()

  def run(steps: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      holder["state"], loss = compiled(holder["state"], images, labels)
    loss.block_until_ready()
    n = steps * args.batch
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / n

  return run


# ----------------------------------------------------------------------------- --jpeg

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
SHAPES = ((375, 500), (375, 500), (375, 500), (333, 500), (500, 375), (500, 333), (400, 500))
JPEG_MEAN, JPEG_STD = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
JPEG_BUCKETS = ((256, 256), (256, 320), (320, 256), (256, 384), (384, 256), (256, 448),
                (448, 256))


def photographs():
  """The real colour photographs scikit-image ships (plus matplotlib's, if installed)."""
  from PIL import Image
  try:
    import skimage.data
  except ImportError as e:
    raise SystemExit("--jpeg needs scikit-image's sample photos: pip install scikit-image") from e
  folder = os.path.dirname(skimage.data.__file__)
  paths = [os.path.join(folder, name) for name in PHOTOS]
  try:
    import matplotlib
    paths.append(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
  except ImportError:
    pass
  return [Image.open(p).convert("RGB") for p in paths if os.path.exists(p)]


def photo_jpeg(photos, index: int, seed: int, quality: int) -> bytes:
  """An ImageNet-like JPEG: a random window of a photograph with the aspect ratio of one of
  SHAPES, between the output size and the largest such window (downsampled, as photographs
  are; upsampled only where the photograph is smaller), mirrored half the time, resized."""
  import io

  import numpy as np
  from PIL import Image
  rng = np.random.default_rng((seed, index))
  src = photos[index % len(photos)]
  h, w = SHAPES[int(rng.integers(len(SHAPES)))]
  sw, sh = src.size
  top = min(sw / w, sh / h)  # never upsample where the photograph is large enough
  scale = rng.uniform(min(1.0, top), top)
  cw, ch = w * scale, h * scale
  x, y = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
  out = src.resize((w, h), Image.LANCZOS, box=(x, y, x + cw, y + ch))
  if rng.random() < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  buf = io.BytesIO()
  out.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def build_photo_set(data_dir: str, n_train: int, n_test: int, quality: int = 90) -> str:
  """Prepares the TFDS set "spp_bench_photos" (array_record) in data_dir once."""
  import tensorflow_datasets as tfds

  from spp_jax import data  # noqa: F401  (TFDS without TensorFlow)

  class SppBenchPhotos(tfds.core.GeneratorBasedBuilder):
    """ImageNet-like JPEGs cut from real photographs."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=10)}),
          supervised_keys=("image", "label"), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      photos = photographs()
      return {"train": self._generate_examples(photos, n_train, 0),
              "test": self._generate_examples(photos, n_test, 1)}

    def _generate_examples(self, photos, n, seed):
      for i in range(n):
        yield i, {"image": photo_jpeg(photos, i, seed, quality), "label": i % 10}

  builder = SppBenchPhotos(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  return "spp_bench_photos"


def jpeg_config(data_dir: str, batch_dtype: str, decoder: str = "pillow"):
  return dict(name="spp_bench_photos", data_dir=data_dir, train_split="train",
              eval_split="test", num_workers=0, prefetch=0, resize_short=256, crop_size=224,
              flip=True, color_jitter=0.4, mean=JPEG_MEAN, std=JPEG_STD,
              full_image=dict(short_side=256, buckets=JPEG_BUCKETS), min_size=32,
              batch_dtype=batch_dtype, decoder=decoder)


def per_core(it, batches: int) -> tuple[float, float]:
  """(images per CPU second of this process, bytes per image of a batch) over `batches` after
  an untimed first one; with prefetch 0 every batch is made in this thread."""
  first = next(it)
  nbytes = sum(v.nbytes for v in first.values() if hasattr(v, "nbytes"))
  per_image = nbytes / len(first["mask"])
  c0, n = time.process_time(), 0
  for _ in range(batches):
    n += len(next(it)["mask"])
  rate = n / max(time.process_time() - c0, 1e-9)
  it.close()
  return rate, per_image


def decode_only(records: list, rounds_images: int) -> float:
  """Pillow decode-only of stored JPEG bytes: images per CPU second."""
  import io

  from PIL import Image
  c0 = time.process_time()
  for k in range(rounds_images):
    Image.open(io.BytesIO(records[k % len(records)])).load()
  return rounds_images / (time.process_time() - c0)


def jpeg_variants(args, stores):
  """name -> callable returning (images/s per core, bytes per image)."""
  from spp_jax import data
  b, nb = args.batch, args.batches
  out = {}
  for store, ddir in stores.items():
    source = data.sources.open_source(jpeg_config(ddir, "uint8"), "train")
    records = [source.read_one(i)["image"] for i in range(min(len(source), 256))]
    out[f"{store}: Pillow decode only"] = (
        lambda r=records: (decode_only(r, b * nb), float("nan")))
    for dtype, decoder in (("uint8", "pillow"), ("float32", "pillow"), ("uint8", "opencv")):
      if decoder == "opencv" and not _has_cv2():
        continue
      cfg = jpeg_config(ddir, dtype, decoder)
      tag = f"{dtype}" + (", opencv" if decoder == "opencv" else "")
      for mode in ("crop", "full_image"):
        for size in (224, 180):
          def train(cfg=cfg, mode=mode, size=size, epoch=[0]):
            epoch[0] += 1
            return per_core(data.train_iterator(cfg, batch_size=b, image_size=size,
                                                epoch=epoch[0], seed=0, mode=mode), nb)
          out[f"{store}: train {mode} {size}, {tag}"] = train
      out[f"{store}: ten_view 224, {tag}"] = (
          lambda cfg=cfg: per_core(data.eval_iterator(
              cfg, dict(kind="ten_view", size=224, short_side=256), batch_size=b), nb))
  return out


def _has_cv2() -> bool:
  try:
    import cv2  # noqa: F401  (data.decoder = "opencv": the detection extra)
    return True
  except ImportError:
    return False


def bucket_report(data_dir: str):
  from spp_jax.data import buckets, sources
  cfg = jpeg_config(data_dir, "uint8")
  hist = buckets.size_histogram(sources.image_sizes(cfg, "train"), 256)
  sets = {"one square (256, 256)": ((256, 256),),
          "config (7 shapes)": JPEG_BUCKETS}
  for k in (1, 3, 7):
    sets[f"chosen, {k} shapes"] = buckets.choose_buckets(hist, 256, k, 32)
  print("\nfull-image buckets at short side 256 (train split): padding pixels / batch pixels, "
        "image pixels lost to shrinking")
  pixels = sum(n * h * w for (h, w), n in hist.items())
  for name, b in sets.items():
    pad, lost, total = buckets.waste(hist, b, 32)
    print(f"  {name:24s} {pad / total:7.4f} {lost / pixels:7.4f}  {list(b)}")


def run_jpeg(args):
  import statistics

  from spp_jax.data import prepare
  base = os.path.join(_ROOT, ".cache", f"bench_photos-{args.images}")
  t0 = time.perf_counter()
  build_photo_set(base, args.images, max(args.batch * (args.batches + 1), 64))
  resized = prepare.prepare_resized("spp_bench_photos", base, 256,
                                    resized_dir=base + "-max256")
  from spp_jax import data
  src = data.sources.open_source(jpeg_config(base, "uint8"), "train")
  kb = statistics.mean(len(src.read_one(i)["image"]) for i in range(len(src))) / 1e3
  sizes = data.sources.image_sizes(jpeg_config(base, "uint8"), "train")
  print(f"photo set: {len(src)} train JPEGs, mean {kb:.0f} KB, mean size "
        f"{sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f}; ready in "
        f"{time.perf_counter() - t0:.0f} s")
  print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
  variants = jpeg_variants(args, {"original": base, "max256": resized})
  rates: dict[str, list[float]] = {k: [] for k in variants}
  nbytes: dict[str, float] = {}
  for r in range(args.rounds):
    for name, fn in variants.items():
      rate, per_image = fn()
      rates[name].append(rate)
      nbytes[name] = per_image
  print(f"load average after: {os.getloadavg()[0]:.2f}\n")
  yard = statistics.median(rates["original: Pillow decode only"])
  print(f"batch {args.batch}, {args.batches} timed batches, {args.rounds} rounds (median); "
        f"per core = images per CPU second of this one thread; x = / original decode only")
  print(f"{'measurement':52s} {'img/s/core':>10s} {'x':>6s} {'KB/img to device':>17s}  rounds")
  for name, got in rates.items():
    med = statistics.median(got)
    kbi = nbytes[name] / 1e3
    kbs = "-" if kbi != kbi else f"{kbi:.0f}"
    print(f"{name:52s} {med:10.0f} {med / yard:6.2f} {kbs:>17s}  "
          + " ".join(f"{x:.0f}" for x in got))
  med = {k: statistics.median(v) for k, v in rates.items()}
  print("\ngoals (ratios to original decode only):")
  for label, key, goal in (
      ("train 224 crops, original files", "original: train crop 224, uint8", 0.9),
      ("train 224 crops, pre-resized 256", "max256: train crop 224, uint8", 1.2),
      ("ten_view, original files", "original: ten_view 224, uint8", 0.5)):
    line = f"  {label:36s} {med[key] / yard:5.2f}x (goal >= {goal}x)"
    if key + ", opencv" in med:
      line += f"; data.decoder='opencv': {med[key + ', opencv'] / yard:5.2f}x"
    print(line)
  for kind in ("train crop 224", "ten_view 224"):
    ratio = nbytes[f"original: {kind}, float32"] / nbytes[f"original: {kind}, uint8"]
    print(f"  bytes to the device, {kind:20s} {ratio:5.1f}x fewer with uint8 (goal >= 4x)")
  bucket_report(base)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="small", choices=("tiny", "small", "full"))
  parser.add_argument("--data_dir", default=os.path.join(_ROOT, ".cache", "tfds"))
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--net_steps", type=int, default=20)
  parser.add_argument("--no_net", action="store_true", help="skip the network step")
  parser.add_argument("--jpeg", action="store_true",
                      help="ImageNet-like JPEGs from real photographs (see the module doc)")
  parser.add_argument("--images", type=int, default=512, help="--jpeg: training images")
  args = parser.parse_args()
  if args.jpeg:
    run_jpeg(args)
    return

  from spp_jax import data  # registers the builder
  t0 = time.perf_counter()
  n_train = data.num_examples(data_config(args, 0), "train")
  n_test = data.num_examples(data_config(args, 0), "test")
  data.eval_iterator(data_config(args, 0), dict(kind="full"), batch_size=args.batch)  # sizes
  print(f"data: multiscale_fashion_mnist/{args.config} ({n_train} train, {n_test} test) in "
        f"{args.data_dir}; ready in {time.perf_counter() - t0:.1f} s (built if missing)")
  print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")

  net = None
  if not args.no_net:
    try:
      net = make_network_step(args)
    except Exception as e:  # noqa: BLE001 - the network may not exist yet
      print(f"small network unavailable ({type(e).__name__}: {e}); pipeline numbers only")

  results: dict[str, list[float]] = {}
  firsts: dict[str, list[float]] = {}
  cpu: dict[str, list[float]] = {}

  def record(name, first, rate, cpu_ms):
    results.setdefault(name, []).append(rate)
    cpu.setdefault(name, []).append(cpu_ms)
    if first is not None:
      firsts.setdefault(name, []).append(first)

  for r in range(args.rounds):
    for w in args.workers:
      record(f"train crop 64, workers={w}", *bench_train(args, w, epoch=r))
      record(f"eval full image, workers={w}", *bench_eval_full(args, w))
    if net is not None:
      record("small net train step, 64x64", None, *net(args.net_steps))
  print(f"load average after: {os.getloadavg()[0]:.2f}\n")
  print(f"batch {args.batch}, {args.batches} timed batches, {args.rounds} rounds (median); "
        f"CPU ms/image: this process (with workers: only receiving the batches)")
  print(f"{'measurement':36s} {'images/s':>10s} {'first batch s':>14s} {'CPU ms/img':>11s}"
        f"  images/s per round")
  for name, rates in results.items():
    first = f"{statistics.median(firsts[name]):.2f}" if name in firsts else "-"
    rounds = " ".join(f"{x:.0f}" for x in rates)
    print(f"{name:36s} {statistics.median(rates):10.0f} {first:>14s} "
          f"{statistics.median(cpu[name]):11.3f}  {rounds}")
  if net is not None:
    consume = statistics.median(results["small net train step, 64x64"])
    for w in args.workers:
      produce = statistics.median(results[f"train crop 64, workers={w}"])
      print(f"pipeline / network, workers={w}: {produce / consume:.2f}x")


if __name__ == "__main__":
  main()
