"""train_and_evaluate: the multi-size, data-parallel training loop with resume and evaluation.

Order of work, so that mistakes cost seconds and a failed start leaves the workdir as it was:
config checks (no compilation, no data), the workdir's lock and saved config, the data set's
facts, the network and the saved shapes (train/preflight.py), the train state (fresh, or the
newest checkpoint that verifies), and only then config.json and the records; then epochs.
Each epoch has one input size (docs/paper.md §3: "alternate" 224/180, or "uniform" in a
range) or, in full-image mode, a few padded bucket shapes; each distinct batch shape compiles
once.

The host never waits for the device except to log, to checkpoint, and to keep at most
MAX_INFLIGHT steps queued, so reading the next batch overlaps the current step.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Any

import jax
import numpy as np

from spp_jax import runtime
from spp_jax.errors import InterruptedRun, NonFiniteLossError
from spp_jax.train import cluster, parallel, preflight, schedules, state as state_lib
from spp_jax.train import left_out as left_out_lib, workdir as workdir_lib
from spp_jax.train.compile_log import CompileLog, CompileRecord, describe
from spp_jax.train.evaluate import Evaluator
from spp_jax.train.interfaces import DataSource, ModelRegistry
from spp_jax.train.lock import WorkdirLock
from spp_jax.train.metrics import MetricWriter, Progress
from spp_jax.train.model import default_registry
from spp_jax.train.preemption import StopSignal
from spp_jax.train.steps import make_train_step
from spp_jax.train.validation import validate_config

log = logging.getLogger(__name__)

MAX_INFLIGHT = 2
RESULTS_FILE = workdir_lib.RESULTS_FILE
prepared_data_config = preflight.prepared_data_config
_HINT = "lower optimizer.learning_rate, or check the inputs"


def augment_key(seed: int) -> jax.Array:
  """The key that colour alteration on the device folds each step into (not the params' or
  dropout's stream)."""
  return jax.random.fold_in(jax.random.key(seed), 0xC0105)


class _Clock:
  """Wall time of a log interval minus time spent compiling or checkpointing in it."""

  def __init__(self):
    self.excluded = 0.0  # Grows with every compilation and checkpoint save.
    self.reset()

  def reset(self):
    self._start, self._excluded0, self.steps = time.perf_counter(), self.excluded, 0

  def seconds(self) -> float:
    return time.perf_counter() - self._start - (self.excluded - self._excluded0)


@dataclasses.dataclass
class _Position:
  """Where training is: global step, epoch, the input iterator's state inside the epoch, and
  the training images this process left out before the current iterator."""
  step: int
  epoch: int
  data_state: Any = None
  size: int | None = None
  left_out: dict[str, int] = dataclasses.field(default_factory=left_out_lib.none)

  def meta(self) -> dict[str, Any]:
    return dict(step=self.step, epoch=self.epoch, size=self.size)


def train_and_evaluate(config, workdir, *, models: ModelRegistry | None = None,
                       data: DataSource | None = None) -> dict[str, float]:
  """Trains config's network on config's data in workdir, resuming from its checkpoints.

  Args:
    config: an ml_collections.ConfigDict (schema: spp_jax.train.config_schema).
    workdir: checkpoints/, tensorboard/, metrics.jsonl, config.json and results.json go here
      (train/workdir.py); one run at a time (train/lock.py).
    models, data: the model registry and data module (default spp_jax.models and
      spp_jax.data); tests pass fakes with the same interfaces (train/interfaces.py).
  Returns:
    The final evaluation {"<view>/top1": fraction, "<view>/top5": fraction}, also written to
    workdir/results.json with the images left out; {} when the run stopped early (SIGTERM or
    train.stop_at_step) after saving a checkpoint from which the next call resumes.
  Raises:
    spp_jax.errors.ExpectedError subclasses and ConfigError for expected failures, each with a
    one-line message: ConfigError (bad config, or a workdir holding an incompatible run),
    WorkdirLockedError, DataError, DamagedCheckpointError, DiskFullError, NonFiniteLossError.
    InterruptedRun (a KeyboardInterrupt) after saving, on SIGINT.
  """
  t_start = time.time()
  wd = workdir_lib.open_paths(config, workdir)  # a scheme other than gs:// fails here
  runtime.enable_compilation_cache(config.get("compilation_cache_dir"))
  cluster.initialize(config.distributed)
  if models is None:
    models = default_registry()
  if data is None:
    from spp_jax import data
  spec = validate_config(config, device_count=jax.device_count(),
                         process_count=jax.process_count(), models=models)
  with WorkdirLock(wd.root, enabled=jax.process_index() == 0):
    saved = workdir_lib.check_config(config, wd)
    setup = preflight.prepare(config, wd, models, data, spec, saved)
    trainer = _Trainer(config, wd, models, data, setup, t_start)
    try:
      return trainer.run()
    finally:
      trainer.close()


class _Trainer:
  """State of one train_and_evaluate call; `run` is the loop. Writes nothing until `_commit`."""

  def __init__(self, config, wd: workdir_lib.Workdir, models: ModelRegistry, data: DataSource,
               setup: preflight.RunSetup, t_start: float):
    self.config = config
    self.wd = wd
    self.models = models
    self.data = left_out_lib.CountingData(data)
    self.setup = setup
    self.t_start = t_start
    self.is_main = jax.process_index() == 0
    self.seed = int(config.seed)
    self.mode = config.train.mode
    self.num_epochs = int(config.train.num_epochs)
    self.data_cfg = setup.data_cfg
    self.num_classes = setup.num_classes
    self.global_batch = int(config.train.batch_size)
    self.local_batch = parallel.local_batch_size(self.global_batch)
    self.steps_per_epoch = setup.steps_per_epoch
    self.total_steps = self.steps_per_epoch * self.num_epochs
    self.lr_schedule, self.tx = setup.lr_schedule, setup.tx

    self.mesh = setup.mesh
    self.rep = parallel.replicated(self.mesh)
    self.batch_sharding = parallel.batch_sharded(self.mesh)
    self.writer = MetricWriter(wd.metrics, wd.tensorboard, enabled=self.is_main)
    self.clock = _Clock()
    self.checkpointer = setup.checkpointer
    self.compile_log = CompileLog(("init_state", "train_step", "eval_step"), self._on_compile)
    self.defs = setup.defs
    self.train_step = jax.jit(
        make_train_step(self.defs.train, self.tx, use_image_sizes=(self.mode == "full_image"),
                        data=self.data_cfg, augment_key=augment_key(self.seed)),
        in_shardings=(self.rep, self.batch_sharding), out_shardings=(self.rep, self.rep),
        donate_argnums=0)
    self.train_shapes: set[tuple] = set()
    self.evaluator = Evaluator(self.defs.eval, self.mesh, self.data, self.data_cfg, config.eval,
                               self.compile_log)
    self.state = None
    self.it = None  # the current epoch's training iterator
    self.progress: Progress | None = None
    self.last_saved: int | None = None
    self.last_finite: jax.Array | None = None  # The latest step's "finite" flag.
    self.pending: list[dict[str, jax.Array]] = []  # Metrics since the last log line.
    self.inflight: collections.deque = collections.deque()
    self.stepped = False  # whether the first step of this call ran

  def _on_compile(self, record: CompileRecord):
    self.clock.excluded += record.seconds
    self.writer.event(dict(event="compile", fn=record.name, shapes=record.shapes,
                           seconds=round(record.seconds, 3), cache_hit=record.cache_hit))

  def _train_step(self, state, batch):
    signature = tuple((k, v.shape) for k, v in batch.items())
    if signature not in self.train_shapes:
      self.train_shapes.add(signature)
      self.compile_log.expect(describe(batch))
    return self.train_step(state, parallel.to_global(batch, self.batch_sharding,
                                                     expected_local=self.local_batch))

  def close(self):
    if self.progress is not None:
      self.progress.close()
    if self.it is not None and hasattr(self.it, "close"):
      self.it.close()  # Stops input worker processes/threads when leaving mid-epoch.
    self.compile_log.close()
    self.checkpointer.close()
    self.writer.close()

  # ---------------------------------------------------------------------------- state

  def _initial_state(self):
    restored = None
    if self.setup.abstract_state is not None or self.checkpointer.moved_aside():
      restored = self.checkpointer.restore_latest(self.setup.abstract_state)
    if restored is None:
      self.compile_log.expect("")
      state = state_lib.create_train_state(self.models, self.config.model, self.num_classes,
                                           self.seed, self.tx, self.rep)
      if self.config.get("init_from"):  # A warm start: another run's parameters, by name.
        from spp_jax.train import init_from
        state = init_from.warm_start(state, self.config, self.tx, event=self.writer.event)
      return state, _Position(step=0, epoch=0)
    data = restored.data
    pos = _Position(step=int(restored.meta["step"]), epoch=int(restored.meta["epoch"]),
                    data_state=data["iterator"], left_out=dict(data["left_out"]))
    self.last_saved = restored.step
    log.info("resumed from the checkpoint at step %d (epoch %d) in %s", pos.step, pos.epoch,
             self.checkpointer.directory)
    return restored.state, pos

  def _commit(self, pos: _Position):
    """The run starts: config.json, then the records (without those past the resumed step)."""
    if self.is_main:
      workdir_lib.save_config(self.config, self.wd)
    self.writer.start(pos.step)
    if pos.step:
      self.writer.event(dict(event="resume", step=pos.step, epoch=pos.epoch))

  def _check_finite(self, step: int):
    """Never save or evaluate a state whose last step had a non-finite loss or gradient."""
    if self.last_finite is not None and not bool(jax.device_get(self.last_finite)):
      raise NonFiniteLossError(
          f"the loss or the gradients became non-finite by step {step}; stopping. "
          f"{self.checkpointer.last_good()}", hint=_HINT)

  def _save(self, pos: _Position):
    if self.last_saved == pos.step:
      return
    self._check_finite(pos.step)
    start = time.perf_counter()
    left_out = left_out_lib.add(pos.left_out, left_out_lib.of(self.it))
    self.writer.flush()  # on gs:// the records reach the bucket before the checkpoint counts
    self.checkpointer.save(self.state, pos.meta(), dict(iterator=pos.data_state,
                                                        left_out=left_out))
    self.clock.excluded += time.perf_counter() - start
    self.last_saved = pos.step

  # ---------------------------------------------------------------------------- loop

  def _train_iterator(self, pos: _Position):
    it = self.data.train_iterator(
        self.data_cfg, batch_size=self.local_batch, image_size=pos.size, epoch=pos.epoch,
        seed=int(self.data_cfg.shuffle_seed), process_index=jax.process_index(),
        process_count=jax.process_count(), mode=self.mode)
    if pos.data_state is not None:
      it.set_state(pos.data_state)  # Resuming inside (or at the end of) this epoch.
    return it

  def run(self) -> dict[str, float]:
    self.state, pos = self._initial_state()
    self._commit(pos)
    cfg = self.config
    if cfg.train.stop_at_step is not None and pos.step >= cfg.train.stop_at_step:
      log.warning("the workdir is at step %d, train.stop_at_step=%d: nothing to do", pos.step,
                  cfg.train.stop_at_step)
      return {}
    self.progress = Progress(self.total_steps, pos.step, enabled=self.is_main,
                             bar=None if cfg.train.progress_bar else False)
    every = int(cfg.eval.every_epochs or 0)
    with StopSignal(cfg.train.stop_at_step) as stop:
      while pos.epoch < self.num_epochs:
        if self._train_epoch(pos, stop):
          return self._stopped(pos, stop)
        pos.epoch += 1
        pos.data_state, pos.size = None, None
        if every and pos.epoch % every == 0 and pos.epoch < self.num_epochs:
          self._check_finite(pos.step)
          results, details = self.evaluator.evaluate(self.state, stop.interrupted)
          if results is not None:
            self._write_eval(pos, results, details, self.progress)
          self.clock.reset()
      self._save(pos)
      self.progress.close()
      results, details = self.evaluator.evaluate(self.state, stop.interrupted)
      if results is None:
        if stop.signalled == "SIGINT":
          raise InterruptedRun(f"interrupted (SIGINT) during the final evaluation; the "
                               f"checkpoint at step {pos.step} is saved: run again to evaluate")
        log.warning("stopped during the final evaluation; run again to evaluate")
        return {}
    return self._finish(pos, results, details)

  def _train_epoch(self, pos: _Position, stop: StopSignal) -> bool:
    """One epoch (or the rest of it); True when a stop was requested (after saving)."""
    # Full-image mode scales the images' short side by size / crop_size.
    pos.size = schedules.epoch_size(self.config.train, pos.epoch, self.seed)
    self.it = self._train_iterator(pos)
    for batch in self.it:
      pos.data_state = self.it.get_state()
      self.state, metrics = self._train_step(self.state, batch)
      pos.step += 1
      self._after_step(pos, metrics)
      if pos.step % self.config.train.checkpoint_every_steps == 0:
        self._save(pos)
      if stop.requested(pos.step):
        self._save(pos)
        return True
    pos.left_out = left_out_lib.add(pos.left_out, left_out_lib.of(self.it))
    if hasattr(self.it, "close"):
      self.it.close()
    self.it = None
    return False

  def _after_step(self, pos: _Position, metrics):
    self.clock.steps += 1
    self.pending.append(metrics)
    self.last_finite = metrics["finite"]
    self.inflight.append(metrics["loss"])
    if len(self.inflight) > MAX_INFLIGHT:
      self.inflight.popleft().block_until_ready()
    if not self.stepped:  # Time to the first step: what the compilation cache shortens.
      jax.block_until_ready(metrics)
      self.stepped = True
      self.writer.event(dict(event="first_step", step=pos.step,
                             seconds_since_start=round(time.time() - self.t_start, 3),
                             compile_seconds=round(self.compile_log.seconds, 3)))
      self.clock.reset()
    self.progress.update(pos.step)
    if pos.step % self.config.train.log_every_steps == 0:
      record = self._summarise(self.pending, pos)
      self.writer.write(pos.step, {k: v for k, v in record.items() if k not in ("epoch", "size")},
                        extra=dict(epoch=pos.epoch, size=pos.size))
      self.progress.log(pos.step, record)
      self.pending.clear()
      self.clock.reset()

  def _stopped(self, pos: _Position, stop: StopSignal) -> dict:
    self.checkpointer.wait()  # the checkpoint is finished before it is said to be saved
    self.progress.close()
    log.warning("stopped at step %d (%s); checkpoint saved in %s; run again with the same "
                "workdir to resume", pos.step, stop.reason, self.checkpointer.directory)
    self.writer.event(dict(event="stopped", step=pos.step, reason=stop.reason))
    if stop.signalled == "SIGINT":
      raise InterruptedRun(f"interrupted (SIGINT) at step {pos.step}; checkpoint saved in "
                           f"{self.checkpointer.directory}: run again with the same workdir "
                           f"to resume")
    return {}

  def _finish(self, pos: _Position, results, details) -> dict[str, float]:
    self.checkpointer.wait()  # saved while the evaluation ran; results.json comes after it
    self._write_eval(pos, results, details, None)
    left_out = left_out_lib.summary(pos.left_out, self.data, self.config.eval.views,
                                    self.data_cfg)
    self.writer.event(dict(
        event="done", step=pos.step, seconds_since_start=round(time.time() - self.t_start, 3),
        train_compilations=self.compile_log.count("train_step"),
        eval_compilations=self.compile_log.count("eval_step"),
        compile_seconds=round(self.compile_log.seconds, 3)))
    if self.is_main:
      workdir_lib.write_json(self.wd.results, dict(results, images_left_out=left_out),
                             RESULTS_FILE)
    return results

  def _summarise(self, pending, pos: _Position) -> dict[str, Any]:
    host = jax.device_get(pending)
    loss = np.array([m["loss"] for m in host], np.float64)
    finite = np.array([bool(m["finite"]) for m in host])
    if not finite.all():
      bad = pos.step - len(host) + 1 + int(np.flatnonzero(~finite)[0])
      raise NonFiniteLossError(
          f"non-finite loss or gradients at step {bad} (loss {loss[~finite][0]}); stopping. "
          f"{self.checkpointer.last_good()}", hint=_HINT)
    steps = self.clock.steps
    step_time = self.clock.seconds() / steps if steps else math.nan
    return dict(epoch=pos.epoch, size=pos.size, loss=float(loss.mean()),
                top1=float(np.mean([m["top1"] for m in host])),
                grad_norm=float(np.mean([m["grad_norm"] for m in host])),
                lr=float(self.lr_schedule(pos.step - 1)), step_time_s=step_time,
                images_per_s=self.global_batch / step_time if step_time > 0 else math.nan)

  def _write_eval(self, pos: _Position, results, details, progress):
    scalars = {f"eval/{k}": v for k, v in results.items()}
    for name, d in details.items():
      scalars[f"eval/{name}/loss"] = d["loss"]
    self.writer.write(pos.step, scalars, extra=dict(epoch=pos.epoch))
    self.writer.flush()
    if progress is not None:
      progress.write(f"eval at step {pos.step}: " + ", ".join(
          f"{k} {v:.4f}" for k, v in results.items()))
