"""Shared pytest set-up: the CPU flags the training entry point uses, and a persistent
compilation cache so repeated runs compile less."""

import os

# The gs:// tests run in a child pytest inside `unshare -n` (tests/gcs_server.py); there the GCS
# clients are pointed at 127.0.0.1 before google-auth, gcsfs, fsspec or TensorStore load.
if os.environ.get("SPP_JAX_GCS_SANDBOX") == "1":
  import gcs_server

  gcs_server.configure_environment()

import pytest  # noqa: E402

from spp_jax import runtime  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("SPP_JAX_CACHE_DIR", os.path.join(_REPO, ".cache", "jax"))
runtime.configure_cpu_flags()  # As spp_jax.main does; subprocesses inherit XLA_FLAGS.
runtime.enable_compilation_cache()


@pytest.fixture
def rng():
  import numpy as np

  return np.random.default_rng(0)
