"""Asynchronous checkpoints (train/checkpoint.py): `save` returns once the state is on the host,
the files and checksums are written in the background, and a checkpoint counts only when it
is finished. Signals and kills around saves: tests/test_train_distributed.py."""

from __future__ import annotations

import errno
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.errors import DiskFullError
from spp_jax.train import integrity
from spp_jax.train.checkpoint import Checkpointer, to_nested


def _state(seed: int):
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(256, 128)).astype(np.float32)),
                     "b": jnp.asarray(rng.normal(size=(128,)).astype(np.float32))},
          "step": jnp.asarray(seed, jnp.int32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _meta(step):
  return dict(step=step, epoch=0, size=None)


def test_save_returns_first_and_the_checkpoint_counts_once_finished(tmp_path, monkeypatch):
  make_manifest = integrity.make_manifest

  def slow_manifest(*args):  # the checksums take a while: the save is still being written
    time.sleep(1.5)
    return make_manifest(*args)

  monkeypatch.setattr(integrity, "make_manifest", slow_manifest)
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3)
  try:
    start = time.perf_counter()
    checkpointer.save(_state(1), _meta(1), {"it": 1})
    assert time.perf_counter() - start < 1.5  # did not wait for the checksums
    assert checkpointer.steps() == [] and checkpointer.latest_step() is None
    assert checkpointer.save(_state(1), _meta(1), None) == 1  # the same step is not saved twice
    checkpointer.wait()
    assert checkpointer.steps() == [1]
    got = checkpointer.restore(1, _abstract(_state(0)))  # verified against its manifest
    jax.tree.map(np.testing.assert_array_equal, to_nested(got.state), to_nested(_state(1)))
  finally:
    checkpointer.close()


def test_buffers_donated_right_after_save_do_not_reach_the_checkpoint(tmp_path):
  state = _state(2)
  want = jax.tree.map(np.array, state)
  overwrite = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 7, s), donate_argnums=0)
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3)
  try:
    checkpointer.save(state, _meta(2), None)
    after = overwrite(state)  # the next train step donates the state's buffers
    jax.block_until_ready(after)
    checkpointer.wait()
    got = checkpointer.restore(2, _abstract(after))
    jax.tree.map(np.testing.assert_array_equal, to_nested(got.state), want)
  finally:
    checkpointer.close()


def test_a_failed_background_save_raises_in_wait_and_does_not_count(tmp_path, monkeypatch):
  def disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")

  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3)
  try:
    checkpointer.save(_state(1), _meta(1), None)
    checkpointer.wait()
    monkeypatch.setattr(integrity, "make_manifest", disk_full)
    checkpointer.save(_state(2), _meta(2), None)  # returns: the failure is in the background
    with pytest.raises(DiskFullError, match="saving the checkpoint at step 2"):
      checkpointer.wait()
    assert checkpointer.steps() == [1]
    assert checkpointer.last_good().startswith("The last good checkpoint is step 1")
  finally:
    checkpointer.close()
