"""workdir/config.json: written on the first run, compared on every later one.

Resuming with a config that changes what is trained (network, data, optimiser, sizes, batch,
seed, epochs) would silently mix two experiments in one workdir; it is refused unless
config.allow_config_change is True. Keys that only change logging, evaluation, paths or the
launch are free to differ.
"""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG_FILE = "config.json"

# Dotted prefixes that may change between runs in one workdir.
COMPATIBLE_PREFIXES = (
    "compilation_cache_dir", "allow_config_change", "distributed.", "data.data_dir",
    "data.source_dir", "data.num_workers", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.stop_at_step",
    "train.progress_bar", "eval.",
)


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


def config_differences(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every key that differs and is not in COMPATIBLE_PREFIXES."""
  a, b = _flatten(old), _flatten(new)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if any(key == p or key.startswith(p) for p in COMPATIBLE_PREFIXES):
      continue
    if a.get(key, "<missing>") != b.get(key, "<missing>"):
      diffs.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
  return diffs


def check_and_save_config(config, workdir: str, *, write: bool = True) -> None:
  """Refuses a workdir whose saved config differs in a training key; saves the new config.

  Raises:
    ValueError listing the differences, unless config.allow_config_change.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_to_dict(config)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    diffs = config_differences(old, new)
    if diffs and not config.get("allow_config_change", False):
      shown = "\n  ".join(diffs[:20]) + ("\n  ..." if len(diffs) > 20 else "")
      from spp_jax.train.validation import ConfigError
      raise ConfigError(
          f"workdir {workdir!r} holds a run with a different config ({path}):\n  {shown}\n"
          f"Use a new workdir, or set --config.allow_config_change=True (main.py: --force) to "
          f"continue this run with the new config.")
  if write:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
