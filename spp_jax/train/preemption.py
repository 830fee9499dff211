"""Stopping early and cleanly: SIGTERM, SIGINT (Ctrl-C), and a configured step.

One process: a Python handler sets a flag the loop reads between steps; the loop saves a
checkpoint and stops. The first SIGINT does the same; a second one aborts at once (the
default action, even inside a long compilation), and the run resumes from its last
checkpoint. Several processes must stop at the same step, so there the decision comes from
jax's preemption sync point (jax.distributed installs its own SIGTERM notifier and agrees on a
step); a SIGINT to one of them is turned into a SIGTERM to itself, which that notifier shares.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax

log = logging.getLogger(__name__)

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopSignal:
  """Context manager; `requested(step)` says whether to save and stop after `step`."""

  def __init__(self, stop_at_step: int | None = None):
    self.stop_at_step = stop_at_step
    self.signalled: str | None = None  # "SIGTERM" or "SIGINT" once one arrived
    self.reason: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      if jax.process_count() == 1:
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()
    return False

  def _handle(self, signum, frame):
    del frame
    name = _NAMES.get(signum, str(signum))
    if signum == signal.SIGINT:
      # A second Ctrl-C: the default action, which ends the process even mid-compilation.
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      # With jax.distributed, SIGTERM goes to jax's preemption notifier (installed from C++),
      # which tells the other processes.
      if jax.process_count() > 1:
        log.warning("received SIGINT: asking every process to save and stop (Ctrl-C again "
                    "aborts without saving)")
        self.signalled = "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)
        return
    log.warning("received %s: saving a checkpoint and stopping after this step%s", name,
                " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else "")
    self.signalled = name

  def requested(self, step: int) -> bool:
    if self.signalled and jax.process_count() == 1:
      self.reason = self.signalled
      return True
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.reason = self.signalled or "preemption"
          return True
      except RuntimeError:  # No preemption service (jax.distributed not initialised).
        if self.signalled:
          self.reason = self.signalled
          return True
    if self.stop_at_step is not None and step >= self.stop_at_step:
      self.reason = f"train.stop_at_step={self.stop_at_step}"
      return True
    return False

  def interrupted(self) -> bool:
    """For long evaluations: a signal arrived. One process alone cannot abandon an
    evaluation that the others run on, so with several this waits for the next step."""
    return self.signalled is not None and jax.process_count() == 1
