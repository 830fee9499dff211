"""The sbatch scripts of spp_jax/slurm.py, run as far as a machine without SLURM allows.

A fake `srun` on PATH starts the tasks locally with the SLURM_* variables a real srun sets
(nodes are 127.0.0.1, 127.0.0.2, ...); fake `sbatch` and `scontrol` record their arguments. So
what runs for real is the generated script under bash, spp_jax.train.cluster's detection and
jax.distributed between the local processes, and the collect step. Not tested: the #SBATCH
header under a real sbatch, GPU binding, and real multi-host networking.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from spp_jax import slurm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_SRUN = """#!{python}
import json, os, signal, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
  key, _, value = args.pop(0)[2:].partition("=")
  opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
  log.write("srun " + json.dumps(opts) + "\\n")
procs = []
for node in range(nodes):
  for local in range(per_node):
    procs.append(subprocess.Popen(args, env=dict(
        os.environ, SLURM_STEP_NODELIST="127.0.0.1" if nodes == 1 else f"127.0.0.[1-{{nodes}}]",
        SLURM_NTASKS=str(nodes * per_node), SLURM_PROCID=str(node * per_node + local),
        SLURM_LOCALID=str(local), SLURM_NODEID=str(node), SLURM_STEP_NUM_NODES=str(nodes),
        SLURM_STEP_TASKS_PER_NODE=f"{{per_node}}(x{{nodes}})",
        SLURM_CPUS_PER_TASK=opts["cpus-per-task"])))
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
sys.exit(max(p.wait() for p in procs))
"""

FAKE_RECORDER = """#!{python}
import json, os, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
  log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""

# A stand-in for spp_jax.main: the real start-up (cluster.initialize), one collective over the
# processes, and results.json from process 0. --config.seed=99 waits for SIGTERM instead.
FAKE_MAIN = """
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
workdir = args["workdir"]
os.makedirs(workdir, exist_ok=True)
if args.get("config.seed") == "99":
  def stop(*_):
    open(os.path.join(workdir, "terminated"), "w").close()
    sys.exit(0)  # As main.py after its SIGTERM checkpoint.
  signal.signal(signal.SIGTERM, stop)
  open(os.path.join(workdir, "ready"), "w").close()
  time.sleep(120)
  sys.exit(5)
from spp_jax.train import cluster
from spp_jax.train.config_schema import default_config
launch = cluster.initialize(default_config().distributed)
import jax, numpy as np
from jax.experimental import multihost_utils
ranks = multihost_utils.process_allgather(np.int32(jax.process_index()))
with open(os.path.join(workdir, f"process{jax.process_index()}.json"), "w") as f:
  json.dump({"kind": launch.kind, "local_device_ids": launch.local_device_ids,
             "process_count": jax.process_count(), "ranks": ranks.tolist()}, f)
if jax.process_index() == 0:
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"center/top1": 0.5 + 0.01 * int(args["config.seed"])}, f)
"""

SWEEP = """
from spp_jax import sweep
def get_config(arg=None):
  return sweep.define(base="configs/demo.py:multi", axes={
      "levels": {"2-1": {"model.spp_levels": (2, 1)}},
      "seed": {"0": {"seed": 0}, "1": {"seed": 1}}},
      x="levels", average_over="seed", main_module="slurm_fake_main")
"""


def _env(tmp) -> slurm.Environment:
  return slurm.Environment(REPO, os.path.join(REPO, ".venv"), str(tmp / "cache"),
                           str(tmp / "logs"))


def test_resources_and_task_layout_follow_cluster_rule(tmp_path):
  commands = [["python", "-m", "spp_jax.main", "--config=configs/demo.py", f"--workdir=w/{i}"]
              for i in range(3)]
  per_gpu = slurm.script(commands, slurm.Resources(
      nodes=4, gpus_per_node=8, time="2-00:00:00", partition="gpu", account="lab",
      extra=("--qos=high",)), _env(tmp_path), collect=["python", "-m", "spp_jax.sweep"])
  for line in ("#SBATCH --array=0-2", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
               "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8",
               "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=lab",
               "#SBATCH --qos=high", f"source {REPO}/.venv/bin/activate",
               f"export SPP_JAX_CACHE_DIR={tmp_path / 'cache'}",
               "srun --nodes=4 --ntasks-per-node=8 --cpus-per-task=8 --gpus-per-node=8 "
               "--kill-on-bad-exit=1 \"${args[@]}\" &"):
    assert line in per_gpu.splitlines(), line
  assert "--dependency=afterany:$SLURM_ARRAY_JOB_ID" in per_gpu
  per_node = slurm.script(commands[:1], slurm.Resources(nodes=2, gpus_per_node=8,
                                                        processes="per_node"), _env(tmp_path))
  assert "#SBATCH --ntasks-per-node=1" in per_node and "#SBATCH --cpus-per-task=64" in per_node
  assert "--array" not in per_node and "--dependency" not in per_node
  for text in (per_gpu, per_node):
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True)
  with pytest.raises(ValueError, match="per_node"):
    slurm.Resources(gpus_per_node=0)


def _fake_tools(tmp) -> dict[str, str]:
  bin_dir = tmp / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("sbatch", FAKE_RECORDER), ("scontrol", FAKE_RECORDER)):
    (bin_dir / name).write_text(text.format(python=sys.executable))
    (bin_dir / name).chmod(0o755)
  (tmp / "slurm_fake_main.py").write_text(FAKE_MAIN)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(tmp),
          "FAKE_SLURM_LOG": str(tmp / "slurm.log"), "JAX_PLATFORMS": "cpu"}


def _job_id_with_free_port() -> int:
  """A job id whose derived coordinator port (cluster.py: 61440 + id % 4096) is free."""
  for _ in range(100):
    port = random.randrange(61440, 65536)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return port - 61440 + 4096
  raise RuntimeError("no free port in 61440-65535")


def _log(tmp) -> list[str]:
  path = tmp / "slurm.log"
  return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("processes,nodes", [("per_gpu", 1), ("per_node", 2)])
def test_sweep_array_runs_under_fake_srun_then_collects(processes, nodes, tmp_path):
  fake = _fake_tools(tmp_path)
  (tmp_path / "sweep.py").write_text(SWEEP)
  sweep_dir, script = tmp_path / "sweep", tmp_path / "sweep.sbatch"
  subprocess.run([os.path.join(REPO, ".venv", "bin", "python"), "-m", "spp_jax.sweep",
                  f"--sweep={tmp_path / 'sweep.py'}", f"--dir={sweep_dir}", f"--slurm={script}",
                  "--slurm_nodes", str(nodes), "--slurm_gpus_per_node=2",
                  f"--slurm_processes={processes}", "--slurm_cpus_per_task=1",
                  "--slurm_partition=debug", f"--slurm_logs={tmp_path / 'logs'}"],
                 cwd=REPO, check=True, capture_output=True, text=True)
  assert (tmp_path / "logs").is_dir()  # SLURM does not create the --output directory.
  for task in (0, 1):
    env = dict(os.environ, **fake, SLURM_JOB_ID=str(_job_id_with_free_port()),
               SLURM_ARRAY_JOB_ID="700", SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="0")
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
      got = json.loads((sweep_dir / f"levels=2-1,seed={task}" / f"process{rank}.json").read_text())
      assert got["kind"] == "slurm" and got["process_count"] == 2 and got["ranks"] == [0, 1]
      # cluster.py's rule: several tasks on a node get one GPU each; one per node gets all.
      assert got["local_device_ids"] == ([rank] if processes == "per_gpu" else None)
  calls = [json.loads(line) for line in _log(tmp_path) if line.startswith("[")]
  assert len(calls) == 1 and calls[0][0] == "sbatch"  # collect queued once, by task 0
  assert "--dependency=afterany:700" in calls[0] and "--partition=debug" in calls[0]
  wrap = next(a for a in calls[0] if a.startswith("--wrap="))[len("--wrap="):]
  subprocess.run(["sh", "-c", wrap], env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True,
                 capture_output=True)  # what the dependent job runs
  summary = (sweep_dir / "summary.md").read_text()
  assert "| {2, 1} | 2 | 50.50 ± 0.71 |" in summary, summary


@pytest.mark.parametrize("finished", [False, True])
def test_time_limit_checkpoints_then_requeues_unless_finished(finished, tmp_path):
  fake = _fake_tools(tmp_path)
  workdir = tmp_path / "run"
  text = slurm.script([["python", "-m", "slurm_fake_main", f"--workdir={workdir}",
                        "--config.seed=99"]], slurm.Resources(gpus_per_node=2), _env(tmp_path))
  (tmp_path / "job.sbatch").write_text(text)
  env = dict(os.environ, **fake, SLURM_JOB_ID="4321")
  job = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while not (workdir / "ready").exists():
    assert time.time() < deadline and job.poll() is None, job.communicate()[0]
    time.sleep(0.1)
  if finished:
    (workdir / "results.json").write_text("{}")
  job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends near the time limit
  out = job.communicate(timeout=60)[0]
  assert job.returncode == 0, out
  assert (workdir / "terminated").exists()  # the training processes got SIGTERM
  requeues = [line for line in _log(tmp_path) if "scontrol" in line]
  assert requeues == ([] if finished else [json.dumps(["scontrol", "requeue", "4321"])]), out
  srun = json.loads(next(line for line in _log(tmp_path) if line.startswith("srun "))[5:])
  assert (srun["nodes"], srun["ntasks-per-node"], srun["gpus-per-node"]) == ("1", "2", "2")


@pytest.mark.slow
def test_command_line_single_node_job_is_one_process_with_every_gpu(tmp_path):
  fake = _fake_tools(tmp_path)
  script, workdir = tmp_path / "one.sbatch", tmp_path / "run"
  subprocess.run([os.path.join(REPO, ".venv", "bin", "python"), "-m", "spp_jax.slurm",
                  "--config=configs/demo.py", f"--workdir={workdir}", "--processes=per_node",
                  f"--logs={tmp_path / 'logs'}", f"--out={script}", "--", "--config.seed=3"],
                 cwd=REPO, check=True, capture_output=True, text=True)
  text = script.read_text().replace("spp_jax.main", "slurm_fake_main")
  script.write_text(text)
  run = subprocess.run(["bash", str(script)], env=dict(os.environ, **fake, SLURM_JOB_ID="12"),
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  got = json.loads((workdir / "process0.json").read_text())
  assert (got["kind"], got["process_count"], got["local_device_ids"]) == ("single", 1, None)
  assert json.loads((workdir / "results.json").read_text()) == {"center/top1": 0.53}
