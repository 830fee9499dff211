"""Shared pytest set-up: a persistent compilation cache so repeated runs compile less."""

import os

import pytest

from spp_jax import runtime

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("SPP_JAX_CACHE_DIR", os.path.join(_REPO, ".cache", "jax"))
runtime.enable_compilation_cache()


@pytest.fixture
def rng():
  import numpy as np

  return np.random.default_rng(0)
