"""Process-level JAX set-up that entry points (main.py, tests) opt into; nothing runs at import.

  configure_cpu_flags()       XLA:CPU tuning, only when the backend will be the CPU
  enable_compilation_cache()  JAX's persistent compilation cache
"""

from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger(__name__)

# Keeps XLA:CPU convolutions off the YNNPACK path (Eigen instead): 1.4-1.5x faster ZF-5 train
# steps with jaxlib 0.10.2 (docs/performance.md). Experimental and tied to the jaxlib version.
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_ACCELERATOR_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "libtpu",
                        "jax_cuda12_plugin", "jax_cuda13_plugin")


def _will_run_on_cpu() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for name in _ACCELERATOR_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def configure_cpu_flags() -> bool:
  """Adds the CPU convolution flag to XLA_FLAGS when the backend will be the CPU; logs it.

  Call before JAX starts its backend. Does nothing when an accelerator plugin is installed (or
  JAX_PLATFORMS names another platform first), when XLA_FLAGS already names the flag, or with
  SPP_JAX_NO_XLA_FLAGS=1. Returns whether it changed XLA_FLAGS.
  """
  if os.environ.get("SPP_JAX_NO_XLA_FLAGS") == "1" or not _will_run_on_cpu():
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if CPU_CONV_FLAG.split("=")[0] in flags:
    return False
  os.environ["XLA_FLAGS"] = (flags + " " + CPU_CONV_FLAG).strip()
  log.info("CPU backend: added %s to XLA_FLAGS (SPP_JAX_NO_XLA_FLAGS=1 turns this off)",
           CPU_CONV_FLAG)
  return True


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; returns the directory used (None: off).

  cache_dir defaults to $SPP_JAX_CACHE_DIR, then ~/.cache/spp_jax/jax; "" disables. It may
  be gs://bucket/cache (JAX reads and writes it through etils.epath); another scheme is a
  paths.UnsupportedPathError.
  """
  import jax

  from spp_jax import paths

  if cache_dir is None:
    cache_dir = os.environ.get("SPP_JAX_CACHE_DIR",
                               os.path.join(os.path.expanduser("~"), ".cache", "spp_jax", "jax"))
  if not cache_dir:
    return None
  paths.check(cache_dir, "compilation_cache_dir")
  if not paths.is_remote(cache_dir):
    os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return cache_dir
