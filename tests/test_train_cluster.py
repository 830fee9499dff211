"""Multi-process start-up: each launcher's environment, and the local GPUs each process gets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from spp_jax.train import cluster
from spp_jax.train.config_schema import default_config

_TESTS = os.path.dirname(os.path.abspath(__file__))


def _cfg(**fields):
  c = default_config().distributed
  for k, v in fields.items():
    c[k] = v
  return c


SLURM_ONE_NODE_FOUR_TASKS = {
    "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2", "SLURM_LOCALID": "2", "SLURM_NODEID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_STEP_NUM_NODES": "1"}


def test_a_plain_machine_is_one_process_even_with_mpi_importable():
  # mpi4py being importable is not a launch (JAX's own detection would call MPI here).
  assert cluster.detect(_cfg(), env={}, on_tpu_vm=False) == cluster.Launch("single")
  assert cluster.detect(_cfg(), env={"OMPI_COMM_WORLD_SIZE": "1"},
                        on_tpu_vm=False).kind == "single"
  assert cluster.detect(_cfg(), env={**SLURM_ONE_NODE_FOUR_TASKS, "SLURM_NTASKS": "1"},
                        on_tpu_vm=False).kind == "single"


def test_slurm_one_process_per_gpu():
  got = cluster.detect(_cfg(), env=SLURM_ONE_NODE_FOUR_TASKS, on_tpu_vm=False)
  assert got == cluster.Launch("slurm", f"gpu007:{4242 % 4096 + 61440}", 4, 2, (2,))


def test_slurm_one_process_per_node_gets_every_gpu():
  env = {**SLURM_ONE_NODE_FOUR_TASKS, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
         "SLURM_STEP_NUM_NODES": "2"}
  got = cluster.detect(_cfg(), env=env, on_tpu_vm=False)
  assert (got.kind, got.num_processes, got.process_id, got.local_device_ids) == (
      "slurm", 2, 1, None)


def test_a_task_bound_to_one_gpu_uses_it():
  env = {**SLURM_ONE_NODE_FOUR_TASKS, "CUDA_VISIBLE_DEVICES": "2"}
  assert cluster.detect(_cfg(), env=env, on_tpu_vm=False).local_device_ids is None
  env["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"
  assert cluster.detect(_cfg(), env=env, on_tpu_vm=False).local_device_ids == (2,)


def test_open_mpi_needs_an_address_and_maps_local_ranks_to_gpus():
  env = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5",
         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
  with pytest.raises(ValueError, match="coordinator"):
    cluster.detect(_cfg(), env=env, on_tpu_vm=False)
  got = cluster.detect(_cfg(coordinator_address="h0:1234"), env=env, on_tpu_vm=False)
  assert got == cluster.Launch("openmpi", "h0:1234", 8, 5, (1,))
  env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "1"
  assert cluster.detect(_cfg(coordinator_address="h0:1234"), env=env,
                        on_tpu_vm=False).local_device_ids is None


def test_tpu_vm_and_modes():
  assert cluster.detect(_cfg(), env=SLURM_ONE_NODE_FOUR_TASKS, on_tpu_vm=True).kind == "tpu"
  assert cluster.detect(_cfg(mode="single"), env=SLURM_ONE_NODE_FOUR_TASKS).kind == "single"
  with pytest.raises(ValueError, match="needs num_processes, process_id"):
    cluster.detect(_cfg(mode="explicit", coordinator_address="h:1"), env={})
  assert cluster.detect(_cfg(mode="explicit"), env={}, coordinator_address="h:1",
                        num_processes=2, process_id=1) == cluster.Launch("explicit", "h:1", 2, 1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["slurm", "openmpi"])
def test_simulated_launch_trains_like_one_process(launcher, tmp_path):
  """Two local processes with a launcher's environment (127.0.0.1 only) train to the
  parameters of one process with the same devices."""
  port = _free_port()
  procs = []
  for rank in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    if launcher == "slurm":
      env.update(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                 SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                 SLURM_STEP_TASKS_PER_NODE="2", SPP_JAX_COORDINATOR_PORT=str(port))
    else:
      env.update(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK=str(rank),
                 OMPI_COMM_WORLD_LOCAL_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_SIZE="2",
                 SPP_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(_TESTS, "fakes.py"), "--workdir", str(tmp_path / "multi"),
         "--set", "train.num_epochs=1", "--set", "eval.every_epochs=0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  single = subprocess.run(
      [sys.executable, os.path.join(_TESTS, "fakes.py"), "--workdir", str(tmp_path / "one"),
       "--set", "train.num_epochs=1", "--set", "eval.every_epochs=0"],
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4"),
      capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
  import jax

  from spp_jax.train import load_params

  a, b = load_params(str(tmp_path / "multi")), load_params(str(tmp_path / "one"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
