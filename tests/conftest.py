"""Shared pytest set-up: the CPU flags the training entry point uses, and a persistent
compilation cache so repeated runs compile less."""

import os

import pytest

from spp_jax import runtime

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("SPP_JAX_CACHE_DIR", os.path.join(_REPO, ".cache", "jax"))
runtime.configure_cpu_flags()  # As spp_jax.main does; subprocesses inherit XLA_FLAGS.
runtime.enable_compilation_cache()


@pytest.fixture
def rng():
  import numpy as np

  return np.random.default_rng(0)
