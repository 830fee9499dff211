"""Parameter summary of a network: every layer's output shape for an input size and its parameters.

Nothing is materialised: the model is built with nnx.eval_shape and each layer is run with
jax.eval_shape, so the full-size paper networks are summarised in about a second.

  python -m spp_jax.summary --model zf5 --size 224
  python -m spp_jax.summary --model small --size 96x64 --head fixed --base-size 96
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spp_jax import models
from spp_jax.models.net import SPPNet


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """One row: the layer's name, kind, output shape (batch first) and parameters."""
  name: str
  kind: str
  output_shape: tuple[int, ...]
  param_shapes: tuple[tuple[str, tuple[int, ...]], ...]

  @property
  def num_params(self) -> int:
    return sum(math.prod(shape) for _, shape in self.param_shapes)


def abstract_model(name: str, *, num_classes: int = 1000, **options) -> SPPNet:
  """The model with ShapeDtypeStruct parameters: shapes and dtypes only, no memory."""
  return nnx.eval_shape(
      lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0), **options))


def summarize(model: str | SPPNet, input_size=224, *, batch_size: int = 1,
              num_classes: int = 1000, **options) -> list[LayerSummary]:
  """Per-layer output shapes for a batch of `input_size` images and per-layer parameters.

  Args:
    model: a registry name (built abstractly with `num_classes` and `options`) or a model.
    input_size: int or (h, w).
    batch_size: leading dimension of the shapes.
  """
  if isinstance(model, str):
    model = abstract_model(model, num_classes=num_classes, **options)
  elif options:
    raise ValueError(f"options {sorted(options)} only apply when model is a name")
  h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
  x = jax.ShapeDtypeStruct((batch_size, h, w, model.arch.in_channels), jnp.float32)
  model._check_images(x, None)  # clear ValueError for sizes the model does not accept
  rows = []
  for name in model.layer_names:
    layer = getattr(model, name)
    x = _eval_shape(layer, lambda m, v: m(v)[0], x)
    rows.append(_row(name, type(layer).__name__, layer, x))
  x = _eval_shape(model, lambda m, v: m.pool(v), x)
  kind = "SpatialPyramidPooling" if model.head_kind == "spp" else "FixedMaxPool"
  rows.append(LayerSummary("spp" if model.head_kind == "spp" else "pool", kind, x.shape, ()))
  for name in ("fc6", "fc7", "classifier"):
    layer = getattr(model, name)
    x = _eval_shape(layer, lambda m, v: m(v), x)
    rows.append(_row(name, "Linear", layer, x))
  return rows


def _eval_shape(module: nnx.Module, fn, x):
  graphdef, state = nnx.split(module)
  return jax.eval_shape(lambda s, v: fn(nnx.merge(graphdef, s), v), state, x)


def _row(name: str, kind: str, layer: nnx.Module, out) -> LayerSummary:
  params = tuple(
      (".".join(str(p) for p in path), tuple(v.shape))
      for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param)))
  return LayerSummary(name, kind, tuple(out.shape), params)


def format_summary(rows: Sequence[LayerSummary]) -> str:
  """A fixed-width table with a total line."""
  lines = [f"{'layer':<12}{'kind':<24}{'output shape':<24}{'params':>14}  shapes"]
  for r in rows:
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in r.param_shapes)
    lines.append(f"{r.name:<12}{r.kind:<24}{str(r.output_shape):<24}{r.num_params:>14,}  {shapes}")
  total = sum(r.num_params for r in rows)
  lines.append(f"{'total':<60}{total:>14,}")
  return "\n".join(lines)


def _size(text: str):
  parts = text.lower().split("x")
  if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
    raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")
  return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m spp_jax.summary", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, choices=models.names())
  parser.add_argument("--size", type=_size, default=224, help="input side N or HxW")
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--head", choices=("spp", "fixed"), default=None)
  parser.add_argument("--levels", default=None, help="SPP levels, e.g. 6,3,2,1")
  parser.add_argument("--width-multiplier", type=float, default=None)
  parser.add_argument("--fc-width", type=int, default=None)
  parser.add_argument("--base-size", type=int, default=None)
  args = parser.parse_args(argv)
  options = {k: v for k, v in dict(head=args.head, width_multiplier=args.width_multiplier,
                                   fc_width=args.fc_width, base_size=args.base_size).items()
             if v is not None}
  if args.levels:
    options["spp_levels"] = tuple(int(v) for v in args.levels.split(","))
  try:
    rows = summarize(args.model, args.size, batch_size=args.batch_size,
                     num_classes=args.num_classes, **options)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.model}, input {args.size}, options {options or 'default'}")
  print(format_summary(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
