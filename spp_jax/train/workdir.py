"""The workdir: where each file of a run lives, and config.json, its record of the config.

  .lock          the writer's lock (train/lock.py)
  config.json    written once the run is known to start; compared on every later run
  checkpoints/   orbax checkpoints (train/checkpoint.py); damaged ones in checkpoints/corrupt/
  metrics.jsonl  records and events; tensorboard/  the same scalars (train/metrics.py)
  results.json   the final evaluation and the images left out

Resuming with a config that changes what is trained (network, data, optimiser, sizes, batch,
seed, epochs) would silently mix two experiments in one workdir; it is refused unless
config.allow_config_change is True. Keys that only change logging, evaluation, paths or the
launch are free to differ. Every path of the run is made here, as an etils.epath.Path
(spp_jax/paths.py): a local directory or gs://bucket/run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath

from spp_jax import paths
from spp_jax.errors import DiskFullError, is_disk_full

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"

# Dotted prefixes that may change between runs in one workdir.
COMPATIBLE_PREFIXES = (
    "compilation_cache_dir", "allow_config_change", "distributed.", "data.data_dir",
    "data.source_dir", "data.num_workers", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.stop_at_step",
    "train.progress_bar", "eval.",
)


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths of one run's files."""
  root: epath.Path

  @classmethod
  def of(cls, path) -> "Workdir":
    """Raises paths.UnsupportedPathError (one line) for a scheme other than gs://."""
    return cls(paths.path(path, "workdir"))

  def __truediv__(self, name: str) -> epath.Path:
    return self.root / name

  @property
  def config(self) -> epath.Path:
    return self / CONFIG_FILE

  @property
  def checkpoints(self) -> epath.Path:
    return self / "checkpoints"

  @property
  def metrics(self) -> epath.Path:
    return self / "metrics.jsonl"

  @property
  def tensorboard(self) -> epath.Path:
    return self / "tensorboard"

  @property
  def results(self) -> epath.Path:
    return self / RESULTS_FILE


# The config's other paths, checked with the workdir before anything runs.
PATH_KEYS = ("compilation_cache_dir", "init_from", "data.data_dir", "data.source_dir")


def open_paths(config, workdir) -> Workdir:
  """The run's Workdir, after checking that every path of the config can be used.

  Raises:
    paths.UnsupportedPathError (one line) naming the flag or key with a scheme other than
    gs:// (or gs:// without gcsfs installed).
  """
  wd = Workdir.of(workdir)
  for key in PATH_KEYS:
    node = config
    for part in key.split("."):
      node = node.get(part) if node is not None else None
    if isinstance(node, str) and node:
      paths.check(node, f"config.{key}")
  return wd


def write_json(path, value: Any, what: str) -> None:
  """Writes JSON atomically (paths.write_atomic); ENOSPC -> DiskFullError."""
  try:
    paths.write_atomic(path, json.dumps(value, indent=2, sort_keys=True))
  except OSError as e:
    if is_disk_full(e):
      raise DiskFullError(os.fspath(path), f"writing {what}") from e
    raise


def config_to_dict(config) -> dict[str, Any]:
  """ConfigDict -> plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def changed_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} for every key whose value differs."""
  a, b = _flatten(old), _flatten(new)
  return {k: (a.get(k, "<missing>"), b.get(k, "<missing>")) for k in sorted(set(a) | set(b))
          if a.get(k, "<missing>") != b.get(k, "<missing>")}


def config_differences(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every key that differs and is not in COMPATIBLE_PREFIXES."""
  return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed_keys(old, new).items()
          if not any(k == p or k.startswith(p) for p in COMPATIBLE_PREFIXES)]


def saved_config(workdir: Workdir) -> dict | None:
  try:
    return json.loads(workdir.config.read_text())
  except FileNotFoundError:
    return None


def check_config(config, workdir: Workdir) -> dict | None:
  """Refuses a workdir whose saved config differs in a training key; writes nothing.

  Returns:
    The saved config (None in a new workdir).
  Raises:
    ConfigError listing the differences, unless config.allow_config_change.
  """
  old = saved_config(workdir)
  if old is None:
    return None
  diffs = config_differences(old, config_to_dict(config))
  if diffs and not config.get("allow_config_change", False):
    from spp_jax.train.config_schema import ConfigError
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    error = ConfigError(f"workdir {workdir.root} holds a run with a different config "
                        f"({workdir.config}): {shown}")
    error.hint = ("use a new workdir, or --force (config.allow_config_change=True) to continue "
                  "this run with the new config")
    raise error
  return old


def save_config(config, workdir: Workdir) -> None:
  write_json(workdir.config, config_to_dict(config), CONFIG_FILE)
