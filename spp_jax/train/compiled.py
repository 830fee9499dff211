"""One explicit compilation per distinct input shape, each logged with its seconds.

`jax.jit` would also compile once per shape, silently. Lowering and compiling by hand makes the
count and the time of every compilation visible (the multi-size schedule's whole point is a few
fixed shapes), and lets the persistent compilation cache show up as short compile times.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger(__name__)


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None))
                         for x in leaves))


def describe(batch: dict[str, Any]) -> str:
  """'image=(32,224,224,3) label=(32,)' for logs."""
  return " ".join(f"{k}=({','.join(map(str, v.shape))})" for k, v in sorted(batch.items()))


@dataclasses.dataclass
class CompileRecord:
  name: str
  shapes: str
  seconds: float


class CompiledCache:
  """Compiled executables of `jitted` keyed by the shapes, dtypes and shardings of its args.

  The state argument keeps its shapes for the whole run, so only the batch is part of the key
  (flattening a large state every step would cost host time for nothing).
  """

  def __init__(self, name: str, jitted, on_compile: Callable[[CompileRecord], None] | None = None):
    self.name = name
    self._jitted = jitted
    self._compiled: dict[tuple, Any] = {}
    self._on_compile = on_compile
    self.records: list[CompileRecord] = []

  def __call__(self, state, batch):
    key = _signature(batch)
    fn = self._compiled.get(key)
    if fn is None:
      start = time.perf_counter()
      fn = self._jitted.lower(state, batch).compile()
      record = CompileRecord(self.name, describe(batch), time.perf_counter() - start)
      self.records.append(record)
      log.info("compiled %s for %s in %.2f s", record.name, record.shapes, record.seconds)
      if self._on_compile is not None:
        self._on_compile(record)
      self._compiled[key] = fn
    return fn(state, batch)

  @property
  def count(self) -> int:
    return len(self.records)

  @property
  def seconds(self) -> float:
    return sum(r.seconds for r in self.records)
