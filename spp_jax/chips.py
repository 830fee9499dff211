"""Accelerators: each chip's bf16 peak, HBM bandwidth and capacity (the one table), and the
devices to compile for: this process's, or a TPU topology's compile-only devices from libtpu.

Figures are per chip, from the vendors' published specifications (dense bf16 matrix peak):
Cloud TPU system-architecture pages (v3, v4, v5e, v5p, v6e), Jouppi et al. 2020, "A
domain-specific supercomputer for training deep neural networks", for v2, and NVIDIA's data
sheets (SXM parts unless named). A device that is one core of a two-core chip (TPU v2, v3, and
v4 without megacore) gets half the chip.

  chip_for(device)                  the Chip of a jax Device (by device_kind), or None
  per_device(chip, devices)         one device's share of its chip
  select_devices(topology, count)   "local", "v5e:2x2" or "v5e-1" -> devices to compile for
  device_chip(devices, every)       the figures `plan` uses for one of them
  describe(devices, every, name)    one line naming them and those figures

libtpu is found through $SPP_JAX_LIBTPU_PATH (a directory holding the `libtpu` package or
libtpu.so, or the file), $TPU_LIBRARY_PATH, or the importable `libtpu` package (the tpu extra).
It asks a cloud metadata server for its TPU unless TPU_SKIP_MDS_QUERY=1, which is set here
before it loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Sequence

import jax

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """peak_flops: bf16 FLOP/s; hbm_bandwidth: bytes/s; hbm_bytes: capacity in bytes."""
  name: str
  peak_flops: float
  hbm_bandwidth: float
  hbm_bytes: int

  def scaled(self, fraction: float) -> Chip:
    return Chip(self.name, self.peak_flops * fraction, self.hbm_bandwidth * fraction,
                int(self.hbm_bytes * fraction))


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v2", 46e12, 700e9, 16 * GIB),
    Chip("v3", 123e12, 900e9, 32 * GIB),
    Chip("v4", 275e12, 1200e9, 32 * GIB),
    Chip("v5e", 197e12, 819e9, 16 * GIB),
    Chip("v5p", 459e12, 2765e9, 95 * GIB),
    Chip("v6e", 918e12, 1640e9, 32 * GIB),
    Chip("A100-40GB", 312e12, 1555e9, 40 * GIB),
    Chip("A100-80GB", 312e12, 2039e9, 80 * GIB),
    Chip("H100", 989e12, 3350e9, 80 * GIB),
    Chip("H100-PCIe", 756e12, 2000e9, 80 * GIB),
    Chip("H200", 989e12, 4800e9, 141 * 10 ** 9),
)}

# jax's device_kind -> CHIPS key; first match wins, so specific names come first.
_KINDS = (
    ("TPU v2", "v2"), ("TPU v3", "v3"), ("TPU v4", "v4"), ("TPU v5 lite", "v5e"),
    ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"),
    ("TPU v6e", "v6e"), ("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100"),
    ("A100-SXM4-40GB", "A100-40GB"), ("A100-PCIE-40GB", "A100-40GB"), ("A100", "A100-80GB"),
)


def chip_for(device) -> Chip | None:
  """The table entry of a jax Device (or a device_kind string); None for CPUs and unknowns."""
  kind = device if isinstance(device, str) else str(getattr(device, "device_kind", ""))
  for prefix, name in _KINDS:
    if prefix.lower() in kind.lower():
      return CHIPS[name]
  return None


def devices_per_chip(devices) -> int:
  """How many of `devices` share one chip (TPU cores exposed as devices share its coords)."""
  coords = [tuple(getattr(d, "coords", ())) for d in devices]
  if not coords or not all(coords):
    return 1
  return max(1, round(len(coords) / len(set(coords))))


def per_device(chip: Chip, devices) -> Chip:
  """One device's share of `chip` when several of `devices` are cores of one chip."""
  n = devices_per_chip(devices)
  return chip if n == 1 else chip.scaled(1.0 / n)


LIBTPU_ENV = "SPP_JAX_LIBTPU_PATH"
# One-host topology of each TPU generation ("GEN-N" takes the first N devices of it).
HOST_TOPOLOGY = {"v2": "2x2", "v3": "2x2", "v4": "2x2x1", "v5e": "2x2", "v5p": "2x2x1",
                 "v6e": "2x2"}


# ----------------------------------------------------------------------------- devices


class DeviceError(Exception):
  """No libtpu, an unknown topology, or more devices asked for than it has; one line."""


def libtpu_path() -> str | None:
  """libtpu.so from $SPP_JAX_LIBTPU_PATH (the file, or a directory holding it or the `libtpu`
  package), else $TPU_LIBRARY_PATH, else the importable `libtpu` package (the tpu extra)."""
  given = os.environ.get(LIBTPU_ENV)
  if given:
    for path in (given, os.path.join(given, "libtpu.so"),
                 os.path.join(given, "libtpu", "libtpu.so")):
      if os.path.isfile(path):
        return path
    raise DeviceError(f"${LIBTPU_ENV}={given} holds no libtpu.so")
  if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
    return os.environ["TPU_LIBRARY_PATH"]
  spec = importlib.util.find_spec("libtpu")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so")
  return path if os.path.isfile(path) else None


def parse_topology(name: str) -> tuple[str, int | None]:
  """"v5e:2x2" -> ("v5e:2x2", None: every device); "v5e-1" -> ("v5e:2x2", 1)."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  if m:
    gen = m.group(1)
    if gen not in HOST_TOPOLOGY:
      raise DeviceError(f"unknown TPU generation {gen!r} in --topology={name}; known: "
                        f"{', '.join(HOST_TOPOLOGY)}")
    return f"{gen}:{HOST_TOPOLOGY[gen]}", int(m.group(2))
  if ":" not in name:
    raise DeviceError(f"--topology={name}: expected 'local', a libtpu topology like "
                      f"v5e:2x2, or GEN-N like v5e-1")
  return name, None


def tpu_devices(topology: str) -> list:
  """Every compile-only device of a libtpu topology (libtpu loaded without a chip)."""
  path = libtpu_path()
  if path is None:
    raise DeviceError(f"libtpu is not installed: pip install -e '.[tpu]', or set "
                      f"${LIBTPU_ENV} to a directory holding it")
  os.environ["TPU_SKIP_MDS_QUERY"] = "1"  # Read by libtpu as it loads: no metadata server.
  # libtpu's lockfile guards a chip; compile-only devices have none, so plans may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ["TPU_LIBRARY_PATH"] = path
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
    raise DeviceError(f"topology {topology!r}: {str(e).splitlines()[0]}") from None


def select_devices(topology: str, count: int | None = None) -> tuple[list, list, str]:
  """(devices to compile for, every device of their topology, its name) for "local" or a
  TPU topology name; count: the first `count` devices."""
  if topology == "local":
    every, name, n = list(jax.devices()), "local", count
  else:
    name, n = parse_topology(topology)
    every = tpu_devices(name)
    n = count if count is not None else n
  if n is not None and not 0 < n <= len(every):
    raise DeviceError(f"{name} has {len(every)} devices, asked for {n}")
  return (every if n is None else every[:n]), every, name


def device_chip(devices: Sequence, every: Sequence) -> Chip | None:
  """One device's chip figures; the capacity is the runtime's (memory_stats) where known."""
  try:
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 - compile-only and CPU devices have no memory stats
    limit = None
  chip = chip_for(devices[0])
  if chip is None:
    return None if not limit else Chip(str(devices[0].device_kind), 0.0, 0.0, int(limit))
  chip = per_device(chip, every)
  return dataclasses.replace(chip, hbm_bytes=int(limit)) if limit else chip


def describe(devices: Sequence, every: Sequence, topology: str) -> str:
  """One line: the device kind, how many of the topology's devices, the chip figures used."""
  chip = device_chip(devices, every)
  kind = devices[0].device_kind
  head = f"{len(devices)} of {len(every)} {topology} device(s)"
  if chip is None:
    return f"{kind}, {head}: no chip figures (spp_jax/chips.py)"
  if not chip.peak_flops:
    return f"{kind}, {head}; per device: {chip.hbm_bytes / GIB:.2f} GiB"
  return (f"{kind} ({chip.name}), {head}; per device: {chip.peak_flops / 1e12:.0f} TFLOP/s "
          f"bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s, {chip.hbm_bytes / GIB:.2f} GiB")
