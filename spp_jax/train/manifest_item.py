"""The `manifest` item of a checkpoint, computed while the checkpoint is written.

The CRC-32s of a train state (train/integrity.py) take about a second per GB of parameters.
ManifestHandler computes them in orbax's background commit, from host copies made before the
save returns, and writes integrity.make_manifest's JSON where orbax's JsonCheckpointHandler
would (directory/metadata), so any JSON reader restores it. orbax finalises the checkpoint only
after every item's commit, so a checkpoint never counts before its manifest is written.

Imported on the first save or restore only (orbax takes 0.15 s to import).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future

from spp_jax.train import integrity


class ManifestHandler(ocp.JsonCheckpointHandler):
  """Writes integrity.make_manifest(arrays, meta) from a background thread (primary host)."""

  async def async_save(self, directory: epath.Path, item=None, args: "ManifestSave" = None):
    del item

    async def write():
      if ocp.multihost.is_primary_host(self._primary_host):
        # zlib.crc32 releases the GIL: this runs beside the next training steps.
        manifest = integrity.make_manifest(args.arrays, args.meta)
        (directory / self._filename).write_text(json.dumps(manifest))

    return [future.CommitFutureAwaitingContractedSignals(write(), name="spp_manifest_save")]

  def save(self, directory: epath.Path, item=None, args: "ManifestSave" = None):
    del item
    (directory / self._filename).write_text(
        json.dumps(integrity.make_manifest(args.arrays, args.meta)))


@ocp.args.register_with_handler(ManifestHandler, for_save=True)
@dataclasses.dataclass
class ManifestSave(ocp.args.CheckpointArgs):
  """arrays: the state as checkpoint.to_nested gives it, on the host (numpy); meta: JSON."""
  arrays: dict
  meta: Any


@ocp.args.register_with_handler(ManifestHandler, for_restore=True)
@dataclasses.dataclass
class ManifestRestore(ocp.args.CheckpointArgs):
  pass
