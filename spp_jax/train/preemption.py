"""Stopping early and cleanly: SIGTERM, and a configured step (time-boxed runs, tests).

One process: a Python SIGTERM handler sets a flag the loop reads between steps. Several
processes must stop at the same step, so there the decision comes from jax's preemption sync
point (jax.distributed installs its own SIGTERM notifier and agrees on a step).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class StopSignal:
  """Context manager; `requested(step)` says whether to save and stop after `step`."""

  def __init__(self, stop_at_step: int | None = None):
    self.stop_at_step = stop_at_step
    self.signalled = False
    self.reason: str | None = None
    self._previous = None

  def __enter__(self) -> "StopSignal":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False

  def _handle(self, signum, frame):
    del frame
    log.warning("received signal %d: saving a checkpoint and stopping after this step",
                signum)
    self.signalled = True

  def requested(self, step: int) -> bool:
    if self.signalled:
      self.reason = "SIGTERM"
      return True
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.reason = "preemption"
          return True
      except RuntimeError:  # No preemption service (jax.distributed not initialised).
        pass
    if self.stop_at_step is not None and step >= self.stop_at_step:
      self.reason = f"train.stop_at_step={self.stop_at_step}"
      return True
    return False

  def interrupted(self) -> bool:
    """For long evaluations: a signal arrived (no step agreement needed to abandon an eval)."""
    return self.signalled
