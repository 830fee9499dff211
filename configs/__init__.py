"""The config files that ship with spp_jax, found by name from any directory.

In the repository they are configs/*.py; installed, the same files are the package
`spp_jax.configs` (spp_jax/configs links to this directory). `--config demo.py:tiny` works
wherever no ./demo.py exists, and so does the README's `--config configs/demo.py:tiny` outside
the repository: a relative path that names no local file is looked up by its file name here.

  resolve("zf5_imagenet.py:multi")   -> "/.../spp_jax/configs/zf5_imagenet.py:multi"
  resolve_argv(["--config=gs://bucket/my.py:tiny"])   # read into a local temporary copy
  load("imagenette.py", "single", relative_to=__file__)   # a config built on another one

This file has no get_config: it is not a config.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The shipped config files, e.g. ["demo.py", "zf5_imagenet.py", ...]."""
  return sorted(n for n in os.listdir(DIRECTORY)
                if n.endswith(".py") and not n.startswith("_"))


def find(file: str, *, relative_to: str | None = None) -> str | None:
  """The path of a config file: `file` itself if it exists (relative to `relative_to`'s
  directory first, when given, then the working directory), else the shipped config of that
  file name; None when there is neither."""
  candidates = [file]
  if relative_to is not None and not os.path.isabs(file):
    candidates.insert(0, os.path.join(os.path.dirname(os.path.abspath(relative_to)), file))
  for path in candidates:
    if os.path.isfile(path):
      return os.path.abspath(path)
  if not os.path.isabs(file):
    shipped = os.path.join(DIRECTORY, os.path.basename(file))
    if os.path.isfile(shipped) and not os.path.basename(file).startswith("_"):
      return shipped
  return None


def resolve(spec: str, *, relative_to: str | None = None) -> str:
  """"file.py[:arg]" with the file found as `find` does; a ValueError (one line) if not."""
  file, sep, arg = spec.partition(":")
  path = find(file, relative_to=relative_to)
  if path is None:
    raise ValueError(f"config file {file!r} not found (nor a shipped config of that name: "
                     f"{', '.join(names())})")
  return path + sep + arg


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
  """argv with the value of --config (and -config, --config=...) resolved; other flags, and
  --config.a.b=value overrides, unchanged. A ValueError (one line) for a missing file."""
  out = list(argv)
  for i, arg in enumerate(out):
    for prefix in (f"--{flag}", f"-{flag}"):
      if arg == prefix and i + 1 < len(out):
        out[i + 1] = _resolved(out[i + 1])
      elif arg.startswith(prefix + "="):
        out[i] = prefix + "=" + _resolved(arg[len(prefix) + 1:])
  return out


def _resolved(spec: str) -> str:
  if "://" in spec:
    return _fetched(spec)
  if os.path.isfile(spec.partition(":")[0]):
    return spec  # A local file, as given.
  return resolve(spec)


def _fetched(spec: str) -> str:
  """"gs://bucket/dir/file.py[:arg]" -> a local copy's path + ":arg" (ValueError: one line)."""
  from spp_jax import paths

  match = re.fullmatch(r"(.+?\.py)(:.*)?", spec)
  if match is None:
    raise ValueError(f"config file {spec!r}: a config is a .py file, optionally with :ARG")
  file, arg = match.group(1), match.group(2) or ""
  try:
    return paths.local_copy(file, "--config") + arg
  except paths.UnsupportedPathError as e:
    raise ValueError(str(e)) from None
  except FileNotFoundError:
    raise ValueError(f"config file {file!r} not found") from None


def load(spec: str, arg: str | None = None, *, relative_to: str | None = None):
  """Calls get_config(arg) of a config file found as `find` finds it: for configs built on
  another config (`spec` may carry ":arg" instead of `arg`)."""
  file, _, spec_arg = resolve(spec, relative_to=relative_to).partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "_spp_config_" + os.path.basename(file)[:-3], file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  arg = arg if arg is not None else (spec_arg or None)
  return module.get_config(arg) if arg is not None else module.get_config()
