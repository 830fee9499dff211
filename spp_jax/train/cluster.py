"""Multi-process start-up: which launcher started this process, and `jax.distributed` for it.

config.distributed.mode:
  auto      a Cloud TPU VM, SLURM (srun) or Open MPI (mpirun) launch is recognised from its
            environment; anything else runs as one process. An importable MPI library alone
            (mpi4py) is not a launch.
  single    one process, whatever the environment says.
  explicit  coordinator_address, num_processes and process_id from the config (or main.py's
            flags). In auto mode, a coordinator address given outside a recognised launcher
            means the same.

Local GPUs. A launcher that starts several processes on a node gets one process per GPU (the
process with local rank r uses GPU r); a launcher that starts one process per node gets all of
that node's GPUs. JAX alone would give every launched process only GPU `local rank`, which for
one process per node silently leaves all but one GPU idle. TPU hosts always use all their chips.

`initialize` must run before anything touches a JAX backend (jax.devices(), an array): JAX
refuses to start the distributed runtime after that.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)

MODES = ("auto", "single", "explicit")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was started. kind: "single", "tpu", "slurm", "openmpi" or "explicit".
  local_device_ids None: every local device."""
  kind: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def multi_process(self) -> bool:
    return self.kind != "single"


def _local_gpus(local_rank: int, local_size: int,
                env: Mapping[str, str]) -> tuple[int, ...] | None:
  """One process per GPU when a node runs several processes; all GPUs for one per node. A
  launcher that already bound one GPU to each task (CUDA_VISIBLE_DEVICES names one) leaves
  nothing to choose."""
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if local_size <= 1 or (visible is not None and "," not in visible):
    return None
  return (local_rank,)


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
  """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ("4(x2),3") or
  SLURM_NTASKS_PER_NODE."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if spec:
    counts = []
    for part in spec.split(","):
      m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
      if m:
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    if node < len(counts):
      return counts[node]
  if env.get("SLURM_NTASKS_PER_NODE"):
    return int(env["SLURM_NTASKS_PER_NODE"])
  return int(env.get("SLURM_NTASKS", "1")) // max(1, int(env.get("SLURM_STEP_NUM_NODES",
                                                                   env.get("SLURM_NNODES", "1"))))


def _slurm_coordinator(env: Mapping[str, str], port: int | None) -> str:
  """The first host of SLURM_STEP_NODELIST ("node[001-004],x" -> node001), at `port` or a
  port derived from the job id (the same rule as JAX's own SLURM support)."""
  nodes = env["SLURM_STEP_NODELIST"]
  m = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodes)
  host = m.group(1) + (m.group(2) or "")
  port = port or int(env["SLURM_JOB_ID"]) % 2 ** 12 + (65535 - 2 ** 12 + 1)
  return f"{host}:{port}"


def _on_cloud_tpu_vm() -> bool:
  try:  # Reads the PCI vendor ids under /sys: no network.
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # pylint: disable=g-import-not-at-top
    return bool(running_in_cloud_tpu_vm)
  except Exception:  # pylint: disable=broad-except  # Private API: never fail a launch on it.
    return False


def detect(dist_cfg, env: Mapping[str, str] | None = None, *, coordinator_address=None,
           num_processes=None, process_id=None, on_tpu_vm=None) -> Launch:
  """The Launch that config.distributed and the environment describe.

  Explicit arguments (main.py's flags) win over dist_cfg's fields and make the mode explicit.
  Raises:
    ValueError for an explicit launch with missing fields, naming them.
  """
  env = os.environ if env is None else env
  mode = dist_cfg.get("mode", "auto")
  addr = coordinator_address or dist_cfg.get("coordinator_address")
  nproc = num_processes if num_processes is not None else dist_cfg.get("num_processes")
  pid = process_id if process_id is not None else dist_cfg.get("process_id")
  if mode not in MODES:
    raise ValueError(f"config.distributed.mode={mode!r}: must be one of {', '.join(MODES)}")
  if mode == "single":
    return Launch("single")
  if mode == "explicit":
    return _explicit(addr or env.get("JAX_COORDINATOR_ADDRESS"), nproc, pid)
  if on_tpu_vm if on_tpu_vm is not None else _on_cloud_tpu_vm():
    return Launch("tpu")  # JAX reads the pod's workers itself; every chip is local.
  if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                            "SLURM_PROCID", "SLURM_LOCALID")) and int(env["SLURM_NTASKS"]) > 1:
    port = int(env["SPP_JAX_COORDINATOR_PORT"]) if env.get("SPP_JAX_COORDINATOR_PORT") else None
    return Launch("slurm", _slurm_coordinator(env, port), int(env["SLURM_NTASKS"]),
                  int(env["SLURM_PROCID"]),
                  _local_gpus(int(env["SLURM_LOCALID"]), _slurm_tasks_on_node(env), env))
  if "OMPI_COMM_WORLD_SIZE" in env and int(env["OMPI_COMM_WORLD_SIZE"]) > 1:
    addr = addr or env.get("SPP_JAX_COORDINATOR_ADDRESS")
    if addr is None:
      raise ValueError("an Open MPI launch needs the coordinator's host:port: set "
                       "config.distributed.coordinator_address (or SPP_JAX_COORDINATOR_ADDRESS) "
                       "to process 0's host and a free port")
    return Launch("openmpi", addr, int(env["OMPI_COMM_WORLD_SIZE"]),
                  int(env["OMPI_COMM_WORLD_RANK"]),
                  _local_gpus(int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")),
                              int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")), env))
  addr = addr or env.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    return _explicit(addr, nproc, pid)
  return Launch("single")


def _explicit(addr, nproc, pid) -> Launch:
  missing = [k for k, v in (("coordinator_address", addr), ("num_processes", nproc),
                            ("process_id", pid)) if v is None]
  if missing:
    raise ValueError(f"an explicit multi-process launch needs {', '.join(missing)} "
                     f"(config.distributed.* or main.py's --coordinator_address, "
                     f"--num_processes, --process_id)")
  return Launch("explicit", addr, int(nproc), int(pid))


def initialize(dist_cfg, **overrides) -> Launch:
  """Starts jax.distributed for the detected launch (before any backend use); returns it."""
  import jax

  launch = detect(dist_cfg, **overrides)
  if not launch.multi_process or jax.distributed.is_initialized():
    return launch
  if launch.kind == "tpu":
    try:  # JAX reads the pod's workers from the TPU VM's metadata.
      jax.distributed.initialize()
    except ValueError as e:  # A single-host TPU VM (Colab) has no pod to join.
      log.info("TPU VM without a pod (%s): one process", e)
      return Launch("single")
  else:
    # Our own detection decided everything: JAX's would restrict each process to one GPU.
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
        process_id=launch.process_id,
        local_device_ids=None if launch.local_device_ids is None else list(
            launch.local_device_ids),
        cluster_detection_method="deactivate")
  log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", launch.kind,
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return launch
