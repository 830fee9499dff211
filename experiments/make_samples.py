"""Sample grid of the embedded data set, read back from its prepared array_record files.

  python experiments/make_samples.py                                   # tiny config, 32 samples
  python experiments/make_samples.py --config full --split test --rows 4 --cols 8

Each cell shows an example at its true size (cells are max_side pixels, so the variation in
size and aspect ratio is visible), the stored item box in white, and the class name.
Writes docs/multiscale_fashion_mnist_samples.png unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="tiny", choices=("tiny", "small", "full"))
  parser.add_argument("--split", default="train")
  parser.add_argument("--data_dir", default=os.path.join(_ROOT, ".cache", "tfds"))
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("--cols", type=int, default=8)
  parser.add_argument("--start", type=int, default=0, help="first example shown")
  parser.add_argument("--out", default=os.path.join(_ROOT, "docs",
                                                    "multiscale_fashion_mnist_samples.png"))
  args = parser.parse_args()

  from spp_jax.data import multiscale_fashion_mnist as mfm
  from spp_jax.data import sources, transforms

  cfg = dict(name=f"multiscale_fashion_mnist/{args.config}", data_dir=args.data_dir)
  source = sources.open_source(cfg, args.split)  # prepared on first use
  opts = mfm.MultiscaleFashionMnist.builder_configs[args.config].synth
  cell, label_h, pad = opts.max_side, 14, 4
  width = args.cols * (cell + pad) + pad
  height = args.rows * (cell + label_h + pad) + pad
  grid = Image.new("RGB", (width, height), (24, 24, 24))
  draw = ImageDraw.Draw(grid)
  for k in range(args.rows * args.cols):
    i = args.start + k
    if i >= len(source):
      break
    record = source.read_one(i)
    image = transforms.decode_image(record["image"])
    h, w = image.shape[:2]
    x0 = pad + (k % args.cols) * (cell + pad)
    y0 = pad + (k // args.cols) * (cell + label_h + pad)
    grid.paste(Image.fromarray(image), (x0, y0))
    ymin, xmin, ymax, xmax = np.asarray(record["bbox"]) * np.array([h, w, h, w])
    draw.rectangle([x0 + xmin, y0 + ymin, x0 + xmax - 1, y0 + ymax - 1], outline=(255, 255, 255))
    name = mfm.CLASS_NAMES[int(record["label"])]
    draw.text((x0, y0 + cell + 1), f"{name} {h}x{w}", fill=(220, 220, 220))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  grid.save(args.out, optimize=True)
  print(f"wrote {args.out} ({width}x{height}) from {cfg['name']} {args.split} examples "
        f"{args.start}..{args.start + args.rows * args.cols - 1}")


if __name__ == "__main__":
  main()
