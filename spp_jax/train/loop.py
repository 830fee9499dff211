"""train_and_evaluate: the multi-size, data-parallel training loop with resume and evaluation.

Order of work, so that mistakes cost seconds: config checks (no compilation, no data), the
workdir's saved config, the data set, the train state (fresh or restored), then epochs. Each
epoch has one input size (SPEC §3: "alternate" 224/180, or "uniform" in a range) or, in
full-image mode, a few padded bucket shapes; each distinct batch shape compiles once.

The host never waits for the device except to log, to checkpoint, and to keep at most
MAX_INFLIGHT steps queued, so reading the next batch overlaps the current step.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from spp_jax import runtime
from spp_jax.train import cluster, parallel, schedules, state as state_lib, workdir as workdir_lib
from spp_jax.train.checkpoint import Checkpointer
from spp_jax.train.compile_log import CompileLog, CompileRecord, describe
from spp_jax.train.config_schema import ConfigError
from spp_jax.train.evaluate import Evaluator
from spp_jax.train.interfaces import DataSource, ModelRegistry
from spp_jax.train.metrics import MetricWriter, Progress
from spp_jax.train.model import default_registry
from spp_jax.train.preemption import StopSignal
from spp_jax.train.steps import make_train_step
from spp_jax.train.validation import validate_config

log = logging.getLogger(__name__)

MAX_INFLIGHT = 2
RESULTS_FILE = "results.json"


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/inf; the last good checkpoint is kept."""


def prepared_data_config(config, min_input_size: int):
  """config.data plus what the trainer decides: min_size, shuffle_seed, mode."""
  data_cfg = copy.deepcopy(config.data)
  with data_cfg.unlocked():
    data_cfg.min_size = min_input_size  # The data module resizes up or rejects smaller images.
    if data_cfg.get("shuffle_seed") is None:
      data_cfg.shuffle_seed = config.seed
    data_cfg.mode = config.train.mode
  return data_cfg


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
  """Where training is: global step, epoch, and the input iterator's state inside the epoch."""
  step: int
  epoch: int
  data_state: Any = None
  size: int | None = None

  def meta(self) -> dict[str, Any]:
    return dict(step=self.step, epoch=self.epoch, size=self.size)


def train_and_evaluate(config, workdir: str, *, models: ModelRegistry | None = None,
                       data: DataSource | None = None) -> dict[str, float]:
  """Trains config's network on config's data in workdir, resuming from its checkpoints.

  Args:
    config: an ml_collections.ConfigDict (schema: spp_jax.train.config_schema).
    workdir: checkpoints/, tensorboard/, metrics.jsonl, config.json and results.json go here.
    models, data: the model registry and data module (default spp_jax.models and
      spp_jax.data); tests pass fakes with the same interfaces (train/interfaces.py).
  Returns:
    The final evaluation {"<view>/top1": fraction, "<view>/top5": fraction}, also written to
    workdir/results.json; {} when the run stopped early (SIGTERM or train.stop_at_step) after
    saving a checkpoint from which the next call resumes.
  Raises:
    ConfigError for a bad config (before anything is compiled), or a workdir holding a run
    with an incompatible config; NonFiniteLossError when the loss stops being finite.
  """
  t_start = time.time()
  runtime.enable_compilation_cache(config.get("compilation_cache_dir"))
  cluster.initialize(config.distributed)
  if models is None:
    models = default_registry()
  if data is None:
    from spp_jax import data
  spec = validate_config(config, device_count=jax.device_count(),
                         process_count=jax.process_count(), models=models)
  workdir = os.path.abspath(workdir)
  workdir_lib.check_and_save_config(config, workdir, write=jax.process_index() == 0)
  trainer = _Trainer(config, workdir, models, data, spec.min_input_size, t_start)
  try:
    return trainer.run()
  finally:
    trainer.close()


class _Trainer:
  """State of one train_and_evaluate call; `run` is the loop."""

  def __init__(self, config, workdir, models: ModelRegistry, data: DataSource,
               min_input_size: int, t_start: float):
    self.config = config
    self.workdir = workdir
    self.models = models
    self.data = data
    self.t_start = t_start
    self.is_main = jax.process_index() == 0
    self.seed = int(config.seed)
    self.mode = config.train.mode
    self.num_epochs = int(config.train.num_epochs)

    self.data_cfg = prepared_data_config(config, min_input_size)
    self.num_classes = int(data.num_classes(self.data_cfg))
    self.global_batch = int(config.train.batch_size)
    self.local_batch = parallel.local_batch_size(self.global_batch)
    self.steps_per_epoch = int(data.steps_per_epoch(self.data_cfg, self.global_batch,
                                                    mode=self.mode))
    if self.steps_per_epoch < 1:
      raise ConfigError(
          f"config.train.batch_size={self.global_batch} is larger than the training split "
          f"({data.num_examples(self.data_cfg, self.data_cfg.train_split)} examples)")
    self.total_steps = self.steps_per_epoch * self.num_epochs
    self.lr_schedule = schedules.learning_rate_schedule(config.optimizer, self.steps_per_epoch,
                                                        self.num_epochs)
    self.tx = schedules.make_optimizer(config.optimizer, self.lr_schedule)

    self.mesh = parallel.make_mesh()
    self.rep = parallel.replicated(self.mesh)
    self.batch_sharding = parallel.batch_sharded(self.mesh)
    self.writer = MetricWriter(workdir, enabled=self.is_main)
    self.clock = _Clock()
    self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.train.keep_checkpoints)
    self.compile_log = CompileLog(("init_state", "train_step", "eval_step"), self._on_compile)
    self.defs = state_lib.model_defs(models, config.model, self.num_classes)
    self.train_step = jax.jit(
        make_train_step(self.defs.train, self.tx, use_image_sizes=(self.mode == "full_image")),
        in_shardings=(self.rep, self.batch_sharding), out_shardings=(self.rep, self.rep),
        donate_argnums=0)
    self.train_shapes: set[tuple] = set()
    self.evaluator = Evaluator(self.defs.eval, self.mesh, data, self.data_cfg, config.eval,
                               self.compile_log)
    self.last_saved: int | None = None
    self.last_finite: jax.Array | None = None  # The latest step's "finite" flag.

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
    self.compile_log.close()
    self.checkpointer.close()
    self.writer.close()

  # ---------------------------------------------------------------------------- state

  def _initial_state(self):
    latest = self.checkpointer.latest_step()
    args = (self.models, self.config.model, self.num_classes, self.seed, self.tx, self.rep)
    if latest is None:
      self.compile_log.expect("")
      return state_lib.create_train_state(*args), _Position(step=0, epoch=0)
    restored = self.checkpointer.restore(latest, state_lib.abstract_train_state(*args))
    pos = _Position(step=int(restored.meta["step"]), epoch=int(restored.meta["epoch"]),
                    data_state=restored.data)
    self.last_saved = latest
    log.info("resumed from the checkpoint at step %d (epoch %d) in %s", pos.step, pos.epoch,
             self.checkpointer.directory)
    self.writer.event(dict(event="resume", step=pos.step, epoch=pos.epoch))
    return restored.state, pos

  def _check_finite(self, step: int):
    """Never save or evaluate a state whose last step had a non-finite loss or gradient."""
    if self.last_finite is not None and not bool(jax.device_get(self.last_finite)):
      raise NonFiniteLossError(
          f"the loss or the gradients became non-finite by step {step}; stopping. The last "
          f"good checkpoint is step {self.last_saved} in {self.checkpointer.directory} (lower "
          f"the learning rate or check the inputs)")

  def _save(self, state, pos: _Position):
    if self.last_saved == pos.step:
      return
    self._check_finite(pos.step)
    start = time.perf_counter()
    self.checkpointer.save(state, pos.meta(), pos.data_state)
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
    state, pos = self._initial_state()
    cfg = self.config
    progress = Progress(self.total_steps, pos.step, enabled=self.is_main,
                        bar=None if cfg.train.progress_bar else False)
    pending: list[dict[str, jax.Array]] = []  # Metrics since the last log line.
    inflight: collections.deque = collections.deque()
    first_step = True
    every = int(cfg.eval.every_epochs or 0)
    it = None
    try:
      with StopSignal(cfg.train.stop_at_step) as stop:
        while pos.epoch < self.num_epochs:
          # Full-image mode scales the images' short side by size / crop_size.
          pos.size = schedules.epoch_size(cfg.train, pos.epoch, self.seed)
          it = self._train_iterator(pos)
          for batch in it:
            pos.data_state = it.get_state()
            state, metrics = self._train_step(state, batch)
            pos.step += 1
            self.clock.steps += 1
            pending.append(metrics)
            self.last_finite = metrics["finite"]
            inflight.append(metrics["loss"])
            if len(inflight) > MAX_INFLIGHT:
              inflight.popleft().block_until_ready()
            if first_step:  # Time to the first step: what the compilation cache shortens.
              jax.block_until_ready(metrics)
              first_step = False
              self.writer.event(dict(event="first_step", step=pos.step,
                                     seconds_since_start=round(time.time() - self.t_start, 3),
                                     compile_seconds=round(self.compile_log.seconds, 3)))
              self.clock.reset()
            progress.update(pos.step)
            if pos.step % cfg.train.log_every_steps == 0:
              record = self._summarise(pending, pos)
              self.writer.write(pos.step, {k: v for k, v in record.items()
                                           if k not in ("epoch", "size")},
                                extra=dict(epoch=pos.epoch, size=pos.size))
              progress.log(pos.step, record)
              pending.clear()
              self.clock.reset()
            if pos.step % cfg.train.checkpoint_every_steps == 0:
              self._save(state, pos)
            if stop.requested(pos.step):
              self._save(state, pos)
              progress.close()
              log.warning("stopped at step %d (%s); checkpoint saved in %s; run again with "
                          "the same workdir to resume", pos.step, stop.reason,
                          self.checkpointer.directory)
              self.writer.event(dict(event="stopped", step=pos.step, reason=stop.reason))
              return {}
          pos.epoch += 1
          pos.data_state, pos.size = None, None
          if every and pos.epoch % every == 0 and pos.epoch < self.num_epochs:
            self._check_finite(pos.step)
            results, details = self.evaluator.evaluate(state, stop.interrupted)
            if results is not None:
              self._write_eval(pos, results, details, progress)
            self.clock.reset()

        self._save(state, pos)
        progress.close()
        results, details = self.evaluator.evaluate(state, stop.interrupted)
        if results is None:
          log.warning("stopped during the final evaluation; run again to evaluate")
          return {}
    finally:
      progress.close()
      if it is not None and hasattr(it, "close"):
        it.close()  # Stops input worker processes/threads when leaving mid-epoch.
    self._write_eval(pos, results, details, None)
    self.writer.event(dict(
        event="done", step=pos.step, seconds_since_start=round(time.time() - self.t_start, 3),
        train_compilations=self.compile_log.count("train_step"),
        eval_compilations=self.compile_log.count("eval_step"),
        compile_seconds=round(self.compile_log.seconds, 3)))
    if self.is_main:
      path = os.path.join(self.workdir, RESULTS_FILE)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
      os.replace(path + ".tmp", path)
    return results

  def _summarise(self, pending, pos: _Position) -> dict[str, Any]:
    host = jax.device_get(pending)
    loss = np.array([m["loss"] for m in host], np.float64)
    finite = np.array([bool(m["finite"]) for m in host])
    if not finite.all():
      bad = pos.step - len(host) + 1 + int(np.flatnonzero(~finite)[0])
      raise NonFiniteLossError(
          f"non-finite loss or gradients at step {bad} (loss {loss[~finite][0]}); stopping. "
          f"The last good checkpoint is step {self.last_saved} in "
          f"{self.checkpointer.directory} (lower the learning rate or check the inputs)")
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
