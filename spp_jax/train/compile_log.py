"""Every XLA compilation of a run as a record: function, input shapes, seconds, and whether
JAX's persistent compilation cache served it.

`jax.jit` compiles once per input shape, silently; the multi-size schedule's point is a few
fixed shapes, so the count and cost of compilations is worth seeing. JAX reports each backend
compilation through `jax.monitoring` (with the function's name), after its tracing and
lowering and, on a hit, a persistent-cache event; this listener turns them into records. The caller names the input
shapes of the call it is about to make (`expect`), since the events do not carry them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax

log = logging.getLogger(__name__)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Tracing and lowering come first, under the same function name; their seconds count too.
_STAGE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration")
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def describe(batch: dict) -> str:
  """'image=(32,224,224,3) label=(32,)' for logs."""
  return " ".join(f"{k}=({','.join(map(str, v.shape))})" for k, v in sorted(batch.items()))


@dataclasses.dataclass
class CompileRecord:
  name: str
  shapes: str
  seconds: float
  cache_hit: bool


class CompileLog:
  """Listens while open; `records` holds the compilations of the functions in `names`.

  on_record: called with each record (the trainer writes it to metrics.jsonl).
  """

  def __init__(self, names: tuple[str, ...],
               on_record: Callable[[CompileRecord], None] | None = None):
    self.names = names
    self.records: list[CompileRecord] = []
    self._on_record = on_record
    self._shapes = ""
    self._hit = False
    self._stages: dict[str, float] = {}
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)

  def expect(self, shapes: str):
    """The input shapes of the next call that may compile."""
    self._shapes = shapes

  def count(self, prefix: str) -> int:
    return sum(r.name.startswith(prefix) for r in self.records)

  @property
  def seconds(self) -> float:
    return sum(r.seconds for r in self.records)

  def _on_event(self, event: str, **kwargs):
    if event == _CACHE_HIT_EVENT:
      self._hit = True

  def _on_duration(self, event: str, duration: float, **kwargs):
    name = str(kwargs.get("fun_name", ""))
    if name.startswith("jit(") and name.endswith(")"):
      name = name[4:-1]
    if event in _STAGE_EVENTS:
      self._stages[name] = self._stages.get(name, 0.0) + duration
      return
    if event != _COMPILE_EVENT:
      return
    hit, self._hit = self._hit, False
    seconds = duration + self._stages.pop(name, 0.0)
    if not name.startswith(self.names):
      return
    record = CompileRecord(name, self._shapes, seconds, hit)
    self.records.append(record)
    log.info("compiled %s for %s in %.2f s%s", name, record.shapes or "()", seconds,
             " (persistent cache)" if hit else "")
    if self._on_record is not None:
      self._on_record(record)

  def close(self):
    jax.monitoring.unregister_event_listener(self._on_event)
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
