"""What a checkpoint must satisfy: a finite state, and checksums that restore verifies.

A checkpoint's `manifest` item records the shape, dtype and CRC-32 of every array of the
saved state (the bytes in memory, so any change of storage format is invisible to it) and of
its metadata, plus a CRC-32 of the manifest itself. Restore recomputes them from what was
read: damage that the storage layer decodes without complaint (a changed chunk of an array
file) then fails verification instead of training on wrong numbers.

States are the nested dicts of `checkpoint.to_nested`: {"params": {"fc": {"kernel": x}}, ...}.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 1


def flat(nested: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out: dict[str, Any] = {}
  for k, v in nested.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def host_array(x) -> np.ndarray:
  """The whole array on the host: every array of the train state is replicated, so this
  process's first shard is all of it."""
  if isinstance(x, jax.Array):
    x = x.addressable_data(0)
  x = np.asarray(x)
  return x if x.flags.c_contiguous else x.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def host_copy(nested_state: dict) -> dict:
  """nested_state with each array on the host (numpy), the transfers overlapped.

  For a manifest computed after the device buffers were donated to the next step. On the
  CPU backend np.asarray shares the device buffer; JAX then copies instead of donating it.
  """
  leaves = [x.addressable_data(0) if isinstance(x, jax.Array) else x
            for x in jax.tree.leaves(nested_state)]
  for x in leaves:
    if isinstance(x, jax.Array):
      x.copy_to_host_async()
  return jax.tree.unflatten(jax.tree.structure(nested_state), [host_array(x) for x in leaves])


def crc32(array: np.ndarray) -> int:
  return zlib.crc32(array.reshape(-1).view(np.uint8).data) if array.size else 0


def json_crc32(value: Any) -> int:
  return zlib.crc32(json.dumps(value, sort_keys=True).encode("utf-8"))


def _describe(array: np.ndarray) -> dict[str, Any]:
  return dict(shape=list(array.shape), dtype=str(array.dtype), crc32=crc32(array))


def make_manifest(nested_state: dict, meta: dict) -> dict[str, Any]:
  """The manifest of a checkpoint holding nested_state and meta."""
  body = dict(format=FORMAT, arrays={k: _describe(host_array(v))
                                     for k, v in flat(nested_state).items()},
              meta_crc32=json_crc32(meta))
  return dict(body, crc32=json_crc32(body))


def manifest_problem(manifest: Any) -> str | None:
  """Why a manifest cannot be trusted, or None."""
  if not isinstance(manifest, dict) or "crc32" not in manifest:
    return "no checksum manifest"
  body = {k: v for k, v in manifest.items() if k != "crc32"}
  if json_crc32(body) != manifest["crc32"]:
    return "its checksum manifest is damaged"
  if body.get("format") != FORMAT:
    return f"manifest format {body.get('format')!r}, this version reads {FORMAT}"
  return None


def shape_differences(manifest: dict, abstract_nested: dict) -> list[str]:
  """'path: saved (shape dtype) -> now (shape dtype)' for arrays that differ or are missing,
  parameters first."""
  saved = manifest["arrays"]
  now = {k: dict(shape=list(v.shape), dtype=str(v.dtype))
         for k, v in flat(abstract_nested).items()}
  out = []
  for key in sorted(set(saved) | set(now), key=lambda k: (not k.startswith("params/"), k)):
    a, b = saved.get(key), now.get(key)
    fmt = lambda d: "absent" if d is None else f"{tuple(d['shape'])} {d['dtype']}"  # noqa: E731
    if a is None or b is None or a["shape"] != b["shape"] or a["dtype"] != b["dtype"]:
      out.append(f"{key}: {fmt(a)} -> {fmt(b)}")
  return out


def verify(manifest: dict, nested_state: dict, meta: dict) -> str | None:
  """Why restored (state, meta) do not match the manifest, or None."""
  problem = manifest_problem(manifest)
  if problem:
    return problem
  if json_crc32(meta) != manifest["meta_crc32"]:
    return "checksum mismatch in its metadata (meta)"
  arrays = flat(nested_state)
  if set(arrays) != set(manifest["arrays"]):
    return "its arrays are not those its manifest lists"
  for key, value in arrays.items():
    if _describe(host_array(value)) != manifest["arrays"][key]:
      return f"checksum mismatch in {key}"
  return None


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def non_finite(nested_state: dict) -> list[str]:
  """Paths of the floating-point arrays holding a NaN or an inf (one jitted reduction)."""
  arrays = {k: v for k, v in flat(nested_state).items()
            if jnp.issubdtype(v.dtype, jnp.inexact)}
  if not arrays:
    return []
  flags = np.asarray(jax.device_get(_finite_flags(list(arrays.values()))))
  return [k for k, ok in zip(arrays, flags) if not ok]
