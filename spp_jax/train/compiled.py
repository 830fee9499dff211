"""One explicit compilation per distinct input shape, each logged with its seconds.

`jax.jit` would also compile once per shape, silently. Lowering and compiling by hand makes the
count and the time of every compilation visible (the multi-size schedule's whole point is a few
fixed shapes), and lets the persistent compilation cache show up as short compile times. With a
ProgramCache a shape's executable may instead be loaded from disk without tracing; the record
says which.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax

from spp_jax.train.program_cache import ProgramCache

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
  """One compilation. source: "traced" (traced, lowered, compiled or found in a cache) or
  "loaded" (a ProgramCache executable, nothing traced)."""
  name: str
  shapes: str
  seconds: float
  source: str = "traced"


class CompiledCache:
  """Compiled executables of a jitted function keyed by the shapes, dtypes and shardings of its
  args.

  The state argument keeps its shapes for the whole run, so only the batch is part of the
  in-memory key (flattening a large state every step would cost host time for nothing).

  Args:
    name: the function's name in records, logs and ProgramCache keys.
    make_jitted: returns the jitted function; called once, when a shape must be traced (a warm
      ProgramCache never needs it).
    on_compile: called with every CompileRecord.
    programs: optional on-disk cache of executables.
  """

  def __init__(self, name: str, make_jitted: Callable[[], Any],
               on_compile: Callable[[CompileRecord], None] | None = None,
               programs: ProgramCache | None = None):
    self.name = name
    self._make_jitted = make_jitted
    self._jitted = None
    self._compiled: dict[tuple, Any] = {}
    self._on_compile = on_compile
    self._programs = programs
    self.records: list[CompileRecord] = []

  def _lower(self, state, batch):
    if self._jitted is None:
      self._jitted = self._make_jitted()
    return self._jitted.lower(state, batch)

  def __call__(self, state, batch):
    key = _signature(batch)
    fn = self._compiled.get(key)
    if fn is None:
      start = time.perf_counter()
      if self._programs is None:
        fn, source = self._lower(state, batch).compile(), "traced"
      else:
        fn, source = self._programs.compile(self.name, (state, batch),
                                            lambda: self._lower(state, batch))
      record = CompileRecord(self.name, describe(batch), time.perf_counter() - start, source)
      self.records.append(record)
      log.info("compiled %s for %s in %.2f s (%s)", record.name, record.shapes, record.seconds,
               source)
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
