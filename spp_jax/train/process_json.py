"""An orbax item for per-process JSON: each process's input iterator state in a checkpoint.

Each file holds {"item": ..., "crc32": ...}; restore refuses a file whose checksum fails.

Imported on the first save or restore only: orbax takes 0.15 s to import, off the way to the
first training step.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Saves a JSON-able object per process as process_<i>-of-<n>.json (as grain's handler does)."""

  def save(self, directory: epath.Path, args: "ProcessJsonSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    item = _jsonable(args.item)
    (directory / name).write_text(json.dumps(dict(item=item, crc32=_crc(item))))

  def restore(self, directory: epath.Path, args: "ProcessJsonRestore | None" = None):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = directory / name
    if not path.exists():
      raise ValueError(f"{path} does not exist: the checkpoint was written by a different "
                       f"number of processes than the {jax.process_count()} running now")
    try:
      got = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(got, dict) or set(got) != {"item", "crc32"} or (
        _crc(got["item"]) != got["crc32"]):
      raise ValueError(f"checksum mismatch in {path}")
    return _from_jsonable(got["item"])

  def metadata(self, directory: epath.Path):
    del directory
    return None

  def structure(self, directory: epath.Path):
    del directory
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Any = None


def _crc(item) -> int:
  return zlib.crc32(json.dumps(item, sort_keys=True).encode("utf-8"))


def _jsonable(x):
  """Iterator states are JSON dicts (grain DatasetIterator) or bytes (grain DataLoader)."""
  import base64
  if isinstance(x, bytes):
    return {"__bytes__": base64.b64encode(x).decode("ascii")}
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def _from_jsonable(x):
  import base64
  if isinstance(x, dict):
    if set(x) == {"__bytes__"}:
      return base64.b64decode(x["__bytes__"])
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x
