"""Batch plans: which examples go in which batch, fixed before anything is decoded.

A plan is made for the global batch (every process computes the same one from the same seed)
and each process takes its own columns: step t of process p holds global slots
[p * B, (p + 1) * B). So every process runs the same number of steps with batches of the same
shape, which is what assembling a global array from host-local batches needs, and the
processes together see each example of an evaluation split exactly once.

Plans are int64 arrays (steps, global_batch) of example indices, -1 for padding slots, plus
the bucket of every step when images are grouped by padded shape.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
  """indices: (steps, global_batch) int64, -1 = padding; buckets: (steps,) int32 (or zeros)."""
  indices: np.ndarray
  buckets: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(self.indices.shape[0])

  def local(self, process_index: int, process_count: int) -> Plan:
    """The columns of one process."""
    _check_process(process_index, process_count)
    per = self.indices.shape[1] // process_count
    cols = slice(process_index * per, (process_index + 1) * per)
    return Plan(np.ascontiguousarray(self.indices[:, cols]), self.buckets)


def _check_process(process_index: int, process_count: int):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                     f"{process_index}, process_count={process_count}")


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled order of one epoch: a permutation of range(num_examples) from (seed, epoch)."""
  rng = np.random.default_rng((int(seed), int(epoch), 0x5EED))
  return rng.permutation(int(num_examples))


def train_plan(num_examples: int, global_batch: int, *, seed: int, epoch: int,
               buckets: np.ndarray | None = None) -> Plan:
  """One shuffled epoch in full batches (the remainder is dropped).

  Args:
    num_examples: size of the split.
    global_batch: batch size summed over processes.
    seed, epoch: the shuffle is a function of both.
    buckets: optional (num_examples,) int bucket of every example, -1 for examples to leave
      out. Batches then hold one bucket each: walking the shuffled order, each example joins
      its bucket's open batch, and a batch is emitted when it is full, so batches stay in
      shuffled order and each bucket drops its own remainder.
  """
  if global_batch < 1:
    raise ValueError(f"global_batch must be >= 1, got global_batch={global_batch}")
  order = epoch_permutation(num_examples, seed, epoch)
  if buckets is None:
    steps = num_examples // global_batch
    idx = order[:steps * global_batch].reshape(steps, global_batch)
    return Plan(idx.astype(np.int64), np.zeros((steps,), np.int32))
  buckets = np.asarray(buckets)
  if buckets.shape != (num_examples,):
    raise ValueError(f"buckets must have shape ({num_examples},), got {buckets.shape}")
  open_batches: dict[int, list[int]] = {}
  rows, row_buckets = [], []
  for i in order:
    b = int(buckets[i])
    if b < 0:
      continue
    batch = open_batches.setdefault(b, [])
    batch.append(int(i))
    if len(batch) == global_batch:
      rows.append(batch)
      row_buckets.append(b)
      open_batches[b] = []
  idx = np.asarray(rows, np.int64).reshape(len(rows), global_batch)
  return Plan(idx, np.asarray(row_buckets, np.int32))


def eval_plan(num_examples: int, global_batch: int, *, buckets: np.ndarray | None = None
              ) -> Plan:
  """Every example exactly once, in index order, the last batch (of each bucket) padded.

  Args:
    buckets: optional (num_examples,) int bucket per example; batches then hold one bucket
      each (buckets in increasing order, examples in index order within a bucket).
  """
  if global_batch < 1:
    raise ValueError(f"global_batch must be >= 1, got global_batch={global_batch}")
  if buckets is None:
    groups = [(0, np.arange(num_examples))]
  else:
    buckets = np.asarray(buckets)
    if buckets.shape != (num_examples,):
      raise ValueError(f"buckets must have shape ({num_examples},), got {buckets.shape}")
    groups = [(int(b), np.flatnonzero(buckets == b)) for b in np.unique(buckets)]
  rows, row_buckets = [], []
  for b, members in groups:
    steps = -(-len(members) // global_batch)
    padded = np.full(steps * global_batch, -1, np.int64)
    padded[:len(members)] = members
    rows.append(padded.reshape(steps, global_batch))
    row_buckets.append(np.full(steps, b, np.int32))
  if not rows:
    return Plan(np.zeros((0, global_batch), np.int64), np.zeros((0,), np.int32))
  return Plan(np.concatenate(rows), np.concatenate(row_buckets))
