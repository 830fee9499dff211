"""Lets TFDS 4.9.10 prepare data sets without TensorFlow and without `importlib_resources`.

`DatasetBuilder.code_path` (used by every `download_and_prepare`) evaluates
`importlib_resources.abc.Traversable`, but TFDS declares that package only for Python < 3.9.
On 3.9+ the standard library's `importlib.resources` has the same `abc.Traversable`, so it is
registered under the old name when the backport is not installed. Does nothing otherwise.
"""

from __future__ import annotations

import importlib.resources
import importlib.resources.abc  # noqa: F401  (makes `.abc` an attribute)
import importlib.util
import sys


def install() -> None:
  """Makes `import importlib_resources` work (stdlib alias) if the backport is missing."""
  if "importlib_resources" in sys.modules:
    return
  if importlib.util.find_spec("importlib_resources") is None:
    sys.modules["importlib_resources"] = importlib.resources
