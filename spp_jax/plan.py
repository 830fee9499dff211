r"""What a config's programs cost on a chip, from the compiler alone: nothing runs.

  python -m spp_jax.plan --config configs/zf5_imagenet.py --topology v5e-1 \
      --config.model.dtype=bfloat16 [--batch 128] [--only train] [--json]
  python -m spp_jax.plan --config configs/demo.py:tiny --topology local

Every program the trainer would compile is compiled here on abstract arguments (shapes,
dtypes, shardings; no arrays): the train step at each distinct input shape of the run (each
training size, or each full-image bucket at each size) and the eval step of each view (each
bucket of the bucketed views). Per program it prints XLA's FLOPs and bytes accessed, the
arguments, temporaries and their total against the device's memory, XLA's own time estimate
where it gives one, and the roofline bound max(FLOPs / peak, bytes / bandwidth) as ms per step
and images/s. An eval step that does not fit is compiled again at half the batch until it
does, and the batch that fits is reported.

Topologies (spp_jax/chips.py): "local", this process's devices; a libtpu topology such as
"v5e:2x2" (all its devices, or the first --devices); or "GEN-N", the first N devices of GEN's
one-host topology (v5e-1: one v5e chip). TPU topologies compile for libtpu's compile-only
devices: no chip is needed, only libtpu (`pip install -e '.[tpu]'`, or $SPP_JAX_LIBTPU_PATH).
libtpu asks a cloud metadata server for its TPU unless TPU_SKIP_MDS_QUERY=1, which is set
before it loads; on a machine that must reach nothing, run the tool in a network namespace:
`unshare -n env JAX_PLATFORMS=cpu python -m spp_jax.plan ...`.

Figures are per device: the compiled program is one device's share of the global batch, and
images/s is the global batch over that device's bound. Chip figures: spp_jax/chips.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from spp_jax import chips
from spp_jax.data import examples, pipeline, settings, sources, transforms
from spp_jax.train import loop, parallel, preflight, schedules, state as state_lib
from spp_jax.train.config_schema import ConfigError
from spp_jax.train.model import default_registry
from spp_jax.train.steps import make_eval_step, make_train_step
from spp_jax.train.validation import validate_config

# The learning-rate schedule's constants do not change a program's cost.
_STEPS_PER_EPOCH = 1000


class PlanError(Exception):
  """A config that cannot be planned (bad keys, unknown classes); one line."""


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
  """One jitted step and its abstract arguments; batch and pixels count the global batch."""
  name: str
  fn: Callable
  args: tuple
  batch: int
  pixels: int  # input pixels per step, every view counted
  kind: str  # "train" or "eval"
  rebuild: Callable[[int], Program] | None = None  # the same program at another batch


def _structs(specs: dict, sharding) -> dict:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in specs.items()}


def train_batch_specs(data_cfg, batch: int, shape: tuple[int, int], sharding) -> dict:
  """ShapeDtypeStructs of the training batches the trainer feeds its step: the layouts of
  spp_jax/data/pipeline.py (assemble.py) that parallel.to_global keeps.

  image (B, H, W, 3) float32, or uint8 pixels with flip (B,) bool (data.batch_dtype);
  image_size (B, 2) int32; label (B,) int32; mask (B,) float32.
  """
  pixels = settings.data_settings(data_cfg).batch_dtype == "uint8"
  specs = dict(image=((batch,) + tuple(shape) + (3,), jnp.uint8 if pixels else jnp.float32),
               image_size=((batch, 2), jnp.int32), label=((batch,), jnp.int32),
               mask=((batch,), jnp.float32))
  if pixels:
    specs["flip"] = ((batch,), jnp.bool_)
  return _structs(specs, sharding)


def eval_batch_specs(data_cfg, view, variant, batch: int, sharding) -> dict:
  """ShapeDtypeStructs of one eval view's batches (see `train_batch_specs`).

  float32: image (B, V, H, W, 3), image_size (B, V, 2). uint8: ten_view sends one canvas per
  image, image (B, Hc, Wc, 3) with view_offsets (B, 5, 2) int32 and transposed (B,) bool;
  multiscale one image per scale (the device mirrors them), image (B, S, H, W, 3); the others
  image (B, V, H, W, 3). All: label (B,) int32, mask (B,) float32.
  """
  s = settings.data_settings(data_cfg)
  v = settings.view_settings(view, s)
  (h, w), views, _, _ = variant
  common = dict(label=((batch,), jnp.int32), mask=((batch,), jnp.float32))
  if s.batch_dtype != "uint8":
    return _structs(dict(image=((batch, views, h, w, 3), jnp.float32),
                         image_size=((batch, views, 2), jnp.int32), **common), sharding)
  if v.kind == "ten_view":
    hc, wc = examples.ten_view_canvas_shape(v)
    return _structs(dict(image=((batch, hc, wc, 3), jnp.uint8),
                         image_size=((batch, views, 2), jnp.int32),
                         view_offsets=((batch, 5, 2), jnp.int32),
                         transposed=((batch,), jnp.bool_), **common), sharding)
  sent = len(v.scales) if v.kind == "multiscale" else views
  return _structs(dict(image=((batch, sent, h, w, 3), jnp.uint8),
                       image_size=((batch, sent, 2), jnp.int32), **common), sharding)


@dataclasses.dataclass
class Setup:
  """What the programs of one config share: network, optimiser, mesh, abstract state."""
  config: object
  data_cfg: object
  defs: state_lib.ModelDefs
  tx: object
  mesh: jax.sharding.Mesh
  state: state_lib.TrainState

  @classmethod
  def create(cls, config, devices, *, num_classes: int | None = None) -> Setup:
    """As the trainer sets up (train/loop.py), but shapes only and no data read."""
    models = default_registry()
    try:
      spec = validate_config(config, device_count=len(devices), process_count=1, models=models)
    except ConfigError as e:
      raise PlanError(str(e)) from None
    data_cfg = preflight.prepared_data_config(config, spec.min_input_size)
    if num_classes is None:
      num_classes = dataset_classes(data_cfg)
    schedule = schedules.learning_rate_schedule(config.optimizer, _STEPS_PER_EPOCH,
                                                int(config.train.num_epochs))
    tx = schedules.make_optimizer(config.optimizer, schedule)
    mesh = parallel.make_mesh(devices)
    defs = state_lib.model_defs(models, config.model, num_classes)
    state = state_lib.abstract_train_state(models, config.model, num_classes, int(config.seed),
                                           tx, parallel.replicated(mesh))
    return cls(config, data_cfg, defs, tx, mesh, state)


def dataset_classes(data_cfg) -> int:
  """The data set's number of classes from its TFDS metadata (nothing read or prepared)."""
  s = settings.data_settings(data_cfg)
  try:
    info = sources.get_builder(s).info
    return int(info.features[sources.feature_keys(info)[1]].num_classes)
  except Exception as e:  # noqa: BLE001 - TFDS raises many kinds here
    raise PlanError(f"cannot read the number of classes of {s.name!r} ({e}); pass "
                    f"--num_classes") from None


def train_shapes(config, data_cfg) -> list[tuple[int, int]]:
  """Every (H, W) the train step sees, in order of first use (= its compilations)."""
  sizes = schedules.distinct_sizes(config.train, int(config.train.num_epochs), int(config.seed))
  if config.train.mode == "crop":
    return [(s, s) for s in sizes]
  s = settings.data_settings(data_cfg)
  out: list[tuple[int, int]] = []
  for size in sizes:
    short = pipeline.full_short_side(s, size)  # the pipeline's own rule
    out += [tuple(hw) for hw in transforms.scale_buckets(s.buckets, s.full_short_side, short)
            if tuple(hw) not in out]
  return out


def train_program(setup: Setup, shape: tuple[int, int], batch: int) -> Program:
  """The train step jitted as the trainer jits it (train/loop.py), at one input shape."""
  rep, sharded = parallel.replicated(setup.mesh), parallel.batch_sharded(setup.mesh)
  fn = jax.jit(make_train_step(setup.defs.train, setup.tx,
                               use_image_sizes=setup.config.train.mode == "full_image",
                               data=setup.data_cfg,
                               augment_key=loop.augment_key(int(setup.config.seed))),
               in_shardings=(rep, sharded), out_shardings=(rep, rep), donate_argnums=0)
  h, w = shape
  specs = train_batch_specs(setup.data_cfg, batch, shape, sharded)
  return Program(f"train {h}x{w}", fn, (setup.state, specs), batch, batch * h * w, "train",
                 lambda b: train_program(setup, shape, b))


def eval_variants(setup: Setup, view) -> list[tuple[tuple[int, int], int, bool, tuple | None]]:
  """[(padded (H, W), V, uses image sizes, per-view shapes or None)] of a view's batches."""
  s = settings.data_settings(setup.data_cfg)
  v = settings.view_settings(view, s)
  if v.kind in ("center", "ten_view"):
    return [((v.size, v.size), v.num_views, False, None)]
  if v.kind == "full":
    return [(tuple(hw), 1, True, None)
            for hw in transforms.scale_buckets(s.buckets, s.full_short_side, v.short_side)]
  out = []
  for hw in transforms.scale_buckets(s.buckets, s.full_short_side, max(v.scales)):
    shapes = pipeline.multiscale_view_shapes(setup.data_cfg, view, tuple(hw))
    out.append((tuple(hw), v.num_views, True, tuple(tuple(map(int, p)) for p in shapes)))
  return out


def eval_program(setup: Setup, view, variant, batch: int) -> Program:
  """The eval step jitted as the Evaluator jits it (train/evaluate.py), for one batch shape."""
  (h, w), views, sized, shapes = variant
  fn = jax.jit(make_eval_step(setup.defs.eval, use_image_sizes=sized, view=view,
                              data=setup.data_cfg, view_shapes=shapes),
               out_shardings=parallel.replicated(setup.mesh))
  specs = eval_batch_specs(setup.data_cfg, view, variant, batch,
                           parallel.batch_sharded(setup.mesh))
  pixels = sum(a * b for a, b in shapes) if shapes else views * h * w
  return Program(f"eval:{view.name} {views}x{h}x{w}", fn, (setup.state, specs), batch,
                 batch * pixels, "eval", lambda b: eval_program(setup, view, variant, b))


def programs(setup: Setup, *, train_batch: int, eval_batch: int) -> list[Program]:
  """Every program of the config's run, in the order the trainer compiles them."""
  out = [train_program(setup, hw, train_batch)
         for hw in train_shapes(setup.config, setup.data_cfg)]
  for view in setup.config.eval.views:
    out += [eval_program(setup, view, var, eval_batch) for var in eval_variants(setup, view)]
  return out


# ----------------------------------------------------------------------------- figures


@dataclasses.dataclass
class Figures:
  """One compiled program, per device; None where the compiler or the chip table has none
  (a program XLA refused for lack of memory has only its name, batch and memory figures)."""
  name: str
  batch: int
  flops: float | None
  bytes_accessed: float | None
  bytes_per_pixel: float | None  # bytes accessed per input pixel of the global batch
  argument_bytes: int | None
  output_bytes: int | None
  alias_bytes: int | None
  temp_bytes: int | None
  total_bytes: int | None  # arguments + outputs - donated aliases + temporaries + code
  capacity_bytes: int | None
  fits: bool | None
  xla_seconds: float | None
  bound_seconds: float | None
  bound_by: str | None
  images_per_second: float | None
  compile_seconds: float
  fitting_batch: int | None = None  # an eval step that does not fit: the batch that does
  error: str | None = None  # XLA's out-of-memory message


def cost_analysis(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyse(program: Program, compiled, chip: chips.Chip | None, n_devices: int,
            seconds: float) -> Figures:
  """The cost and memory analyses of `compiled`, against `chip` (one device's share)."""
  cost, mem = cost_analysis(compiled), compiled.memory_analysis()
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  xla = cost.get("optimal_seconds")  # negative: XLA has no estimate
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  total = arg + out - alias + temp + int(getattr(mem, "generated_code_size_in_bytes", 0))
  capacity = chip.hbm_bytes if chip is not None else None
  bound = by = rate = None
  if chip is not None and chip.peak_flops > 0 and chip.hbm_bandwidth > 0:
    compute, memory = flops / chip.peak_flops, accessed / chip.hbm_bandwidth
    bound, by = max(compute, memory), "memory" if memory >= compute else "compute"
    rate = program.batch / bound if bound > 0 else None
  return Figures(program.name, program.batch, flops, accessed,
                 accessed * n_devices / max(1, program.pixels), arg, out, alias, temp, total,
                 capacity, None if capacity is None else total <= capacity,
                 float(xla) if xla is not None and xla > 0 else None, bound, by, rate, seconds)


def compile_program(program: Program):
  """(compiled executable, seconds): trace, lower and compile on the abstract arguments."""
  start = time.perf_counter()
  compiled = program.fn.trace(*program.args).lower().compile()
  return compiled, time.perf_counter() - start


_SIZE = r"\(([\d.]+)([KMGT]?)\)"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def out_of_memory(program: Program, message: str, seconds: float) -> Figures:
  """The Figures of a program XLA refused to compile for lack of memory (XLA:TPU checks the
  device's HBM while compiling): "... required for X (29.42G) exceeds available HBM (15.75G)"."""
  m = re.search(_SIZE + r" exceeds available \w+ " + _SIZE, message)
  need, have = ((int(float(m.group(1)) * _UNITS[m.group(2)]),
                 int(float(m.group(3)) * _UNITS[m.group(4)])) if m else (None, None))
  none = dict.fromkeys(("flops", "bytes_accessed", "bytes_per_pixel", "argument_bytes",
                        "output_bytes", "alias_bytes", "temp_bytes", "xla_seconds",
                        "bound_seconds", "bound_by", "images_per_second"))
  return Figures(program.name, program.batch, total_bytes=need, capacity_bytes=have,
                 fits=False, compile_seconds=seconds, error=message.strip().splitlines()[0],
                 **none)


def measure(program: Program, chip: chips.Chip | None, n_devices: int) -> Figures:
  """Compiles `program` and analyses it; a program too large for the device does not fit."""
  start = time.perf_counter()
  try:
    compiled, seconds = compile_program(program)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return out_of_memory(program, str(e), time.perf_counter() - start)
  return analyse(program, compiled, chip, n_devices, seconds)


def fitting_batch(program: Program, chip: chips.Chip | None, n_devices: int,
                  log: Callable[[str], None]) -> int | None:
  """The first batch that fits, halving program.batch while it divides over the devices."""
  batch = program.batch
  while batch // 2 >= n_devices and (batch // 2) % n_devices == 0:
    batch //= 2
    figures = measure(program.rebuild(batch), chip, n_devices)
    log(f"  {figures.name} at batch {batch}: {_gib(figures.total_bytes)} GiB")
    if figures.fits:
      return batch
  return None


def make_plan(config, devices: Sequence, every: Sequence | None = None, *,
              only: Sequence[str] = (), num_classes: int | None = None,
              log: Callable[[str], None] = lambda _: None) -> list[Figures]:
  """Compiles the programs of `config` (those whose name starts with one of `only`, if given)
  for `devices`, at config.train/eval.batch_size (global), and returns their Figures."""
  setup = Setup.create(config, list(devices), num_classes=num_classes)
  chip = chips.device_chip(devices, every or devices)
  out = []
  for program in programs(setup, train_batch=int(config.train.batch_size),
                          eval_batch=int(config.eval.batch_size)):
    if only and not any(program.name.startswith(o) for o in only):
      continue
    log(f"compiling {program.name} (batch {program.batch}) ...")
    figures = measure(program, chip, len(devices))
    if program.kind == "eval" and figures.fits is False:
      figures.fitting_batch = fitting_batch(program, chip, len(devices), log)
    out.append(figures)
  return out


# ----------------------------------------------------------------------------- output


def _gib(n) -> str:
  return "-" if n is None else f"{n / chips.GIB:.2f}"


_COLUMNS = ("program", "batch", "GFLOP", "GB accessed", "B/pixel", "args GiB", "temp GiB",
            "total GiB", "fits", "free GiB", "XLA ms", "bound ms", "img/s", "compile s")


def _num(value, scale: float, digits: int) -> str:
  return "-" if value is None else f"{value / scale:.{digits}f}"


def _row(f: Figures) -> tuple[str, ...]:
  free = (None if f.capacity_bytes is None or f.total_bytes is None
          else f.capacity_bytes - f.total_bytes)
  return (f.name, str(f.batch), _num(f.flops, 1e9, 1), _num(f.bytes_accessed, 1e9, 2),
          _num(f.bytes_per_pixel, 1, 0), _gib(f.argument_bytes), _gib(f.temp_bytes),
          _gib(f.total_bytes), "-" if f.fits is None else ("yes" if f.fits else "NO"),
          _gib(free), _num(f.xla_seconds, 1e-3, 1),
          "-" if f.bound_seconds is None else f"{f.bound_seconds * 1e3:.1f} ({f.bound_by[:3]})",
          _num(f.images_per_second, 1, 0), f"{f.compile_seconds:.1f}")


def format_figures(figures: Sequence[Figures]) -> str:
  """A text table, a program a row, then a line for each eval step that does not fit."""
  rows = [_COLUMNS] + [_row(f) for f in figures]
  widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  for f in figures:
    if f.fitting_batch is not None:
      lines.append(f"{f.name}: does not fit at batch {f.batch}; batch {f.fitting_batch} fits "
                   f"(--config.eval.batch_size={f.fitting_batch})")
    elif f.fits is False:
      lines.append(f"{f.name}: does not fit at batch {f.batch}"
                   + (f" ({f.error})" if f.error else ""))
  return "\n".join(lines)


def run(config, topology: str = "local", *, devices: int | None = None,
        batch: int | None = None, only: Sequence[str] = (), num_classes: int | None = None,
        as_json: bool = False) -> int:
  """The command: prints the table (progress on stderr) or JSON; returns the exit status."""
  if batch is not None:
    with config.unlocked():
      config.train.batch_size = config.eval.batch_size = batch
  log = (lambda m: None) if as_json else (lambda m: print(m, file=sys.stderr, flush=True))
  try:
    chosen, every, name = chips.select_devices(topology, devices)
    target = chips.describe(chosen, every, name)
    log(f"plan for {target}")
    figures = make_plan(config, chosen, every, only=tuple(only), num_classes=num_classes,
                        log=log)
  except (PlanError, chips.DeviceError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if as_json:
    print(json.dumps(dict(target=target, programs=[dataclasses.asdict(f) for f in figures]),
                     indent=1))
  else:
    print(target)
    print(format_figures(figures))
  return 0


def run_cli():
  """absl flags, defined only when run as a program (spp_jax.main defines --config too)."""
  from absl import app, flags
  from ml_collections import config_flags

  from spp_jax import runtime

  config = config_flags.DEFINE_config_file(
      "config", None, "Config file[:ARG]; keys can be overridden with --config.a.b=value.",
      lock_config=True)
  topology = flags.DEFINE_string("topology", "local", "'local', a libtpu topology such as "
                                 "v5e:2x2, or GEN-N such as v5e-1.")
  devices = flags.DEFINE_integer("devices", None, "Compile for the first N devices of it.")
  batch = flags.DEFINE_integer("batch", None, "Global batch of the train and eval steps "
                               "(default: the config's).")
  only = flags.DEFINE_list("only", [], "Only programs whose name starts with one of these, "
                           "e.g. train,eval:ten_view.")
  num_classes = flags.DEFINE_integer("num_classes", None, "Classes (default: from the data "
                                     "set's TFDS metadata).")
  as_json = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    runtime.configure_cpu_flags()  # As spp_jax.main: local CPU programs as training builds them.
    raise SystemExit(run(config.value, topology.value, devices=devices.value,
                         batch=batch.value, only=only.value, num_classes=num_classes.value,
                         as_json=as_json.value))

  app.run(main)


if __name__ == "__main__":
  run_cli()
