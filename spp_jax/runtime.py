"""Process-level JAX set-up: XLA:CPU flags and the persistent compilation cache."""

from __future__ import annotations

import importlib.util
import os
import time

# spp_jax/__init__ imports this module first: every spp_jax source this process runs was read
# after this moment (the program cache turns itself off if one changed later).
IMPORTED_AT = time.time()

# Keeps XLA:CPU convolutions off the YNNPACK path (Eigen instead): 1.4-1.5x faster ZF-5
# steps with jaxlib 0.10.2 (PERF-NOTES). Experimental and tied to the jaxlib version.
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


def configure_cpu_flags() -> None:
  """Adds the CPU convolution flag to XLA_FLAGS when the backend will be the CPU.

  Must run before JAX initialises its backend; does nothing if the user set the flag's
  name themselves or set SPP_JAX_NO_XLA_FLAGS=1.
  """
  if os.environ.get("SPP_JAX_NO_XLA_FLAGS") == "1" or not _will_run_on_cpu():
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if CPU_CONV_FLAG.split("=")[0] not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + CPU_CONV_FLAG).strip()


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache; returns the directory used (None: off).

  cache_dir defaults to $SPP_JAX_CACHE_DIR, then ~/.cache/spp_jax/jax; "" disables.
  """
  import jax

  if cache_dir is None:
    cache_dir = os.environ.get("SPP_JAX_CACHE_DIR",
                               os.path.join(os.path.expanduser("~"), ".cache", "spp_jax", "jax"))
  if not cache_dir:
    return None
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return cache_dir
