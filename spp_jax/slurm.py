r"""SLURM batch scripts: resources, environment, task layout, and a sweep's collect step.

  python -m spp_jax.slurm --config configs/zf5_imagenet.py --workdir workdirs/zf5 \
      --nodes 2 --gpus_per_node 8 --partition gpu --time 48:00:00 --out zf5.sbatch
  sbatch zf5.sbatch
  python -m spp_jax.sweep --sweep FILE --dir DIR --slurm sweep.sbatch --slurm_nodes 1  # arrays

Task layout, matching train/cluster.py:
  per_gpu   gpus_per_node tasks per node; every task of a node sees all its GPUs and the task
            with local rank r uses GPU r (so no --gpus-per-task or --gpu-bind, which would
            hide the others).
  per_node  one task per node that uses all of its GPUs. With one node that is a plain
            single-process run.
Both give JAX the same global devices. The script runs from the directory it was generated
in (relative paths in the commands stay valid), activates the generating virtual
environment, and points SPP_JAX_CACHE_DIR at a shared compilation cache.

Near --time, the batch shell gets SIGUSR1 (--signal), forwards SIGTERM to the training
processes, which save a checkpoint and exit (main.py), and requeues the task unless its
results.json exists; the requeued task resumes from the checkpoint. A sweep's first array task
queues the collect step (`python -m spp_jax.sweep ... --collect_only`) as a job that starts
once every array task has ended (afterany), so the tables cover whatever finished.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence

from absl import app, flags

PROCESSES = ("per_gpu", "per_node")
RESULTS_FILE = "results.json"
_CPUS_PER_GPU = 8
_SIGNAL_SECONDS = 180  # Time to forward SIGTERM, save a checkpoint and requeue.


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one training run asks SLURM for. cpus_per_task None: 8 for each GPU a task drives."""
  nodes: int = 1
  gpus_per_node: int = 8
  processes: str = "per_gpu"
  cpus_per_task: int | None = None
  time: str = "24:00:00"
  partition: str | None = None
  account: str | None = None
  extra: tuple[str, ...] = ()  # more sbatch options, e.g. ("--qos=high", "--mem=0")

  def __post_init__(self):
    if self.processes not in PROCESSES:
      raise ValueError(f"processes={self.processes!r}: must be one of {', '.join(PROCESSES)}")
    if self.nodes < 1 or self.gpus_per_node < 0:
      raise ValueError(f"nodes={self.nodes} must be >= 1 and gpus_per_node="
                       f"{self.gpus_per_node} >= 0")
    if self.processes == "per_gpu" and self.gpus_per_node < 1:
      raise ValueError("processes='per_gpu' needs gpus_per_node >= 1; use 'per_node' for CPUs")

  @property
  def ntasks_per_node(self) -> int:
    return self.gpus_per_node if self.processes == "per_gpu" else 1

  @property
  def cpus(self) -> int:
    if self.cpus_per_task is not None:
      return self.cpus_per_task
    return _CPUS_PER_GPU * max(1, self.gpus_per_node // self.ntasks_per_node)


@dataclasses.dataclass(frozen=True)
class Environment:
  """Where the job runs: the checkout, its virtual environment, the compilation cache, logs."""
  repo_dir: str
  venv: str
  cache_dir: str
  log_dir: str

  @classmethod
  def here(cls, log_dir: str | None = None) -> Environment:
    """The current directory and the running interpreter's virtual environment."""
    repo = os.getcwd()
    venv = sys.prefix if sys.prefix != sys.base_prefix else os.path.join(repo, ".venv")
    cache = os.environ.get("SPP_JAX_CACHE_DIR") or os.path.join(repo, ".cache", "jax")
    return cls(repo, venv, os.path.abspath(cache),
               os.path.abspath(log_dir or os.path.join(repo, "workdirs", "slurm")))


def workdir_of(argv: Sequence[str]) -> str:
  """The --workdir of a `python -m spp_jax.main ...` command line."""
  for i, a in enumerate(argv):
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
    if a == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  raise ValueError(f"no --workdir in {shlex.join(argv)}")


def srun_line(res: Resources) -> str:
  # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): repeat it.
  gpus = f" --gpus-per-node={res.gpus_per_node}" if res.gpus_per_node else ""
  return (f"srun --nodes={res.nodes} --ntasks-per-node={res.ntasks_per_node}"
          f" --cpus-per-task={res.cpus}{gpus} --kill-on-bad-exit=1")


def _header(res: Resources, env: Environment, name: str, n_tasks: int | None,
            max_parallel: int | None) -> list[str]:
  """n_tasks: the array's size; None: not an array."""
  out = "%x-%j.out" if n_tasks is None else "%x-%A_%a.out"
  lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"]
  if n_tasks is not None:
    lines.append(f"#SBATCH --array=0-{n_tasks - 1}" + (f"%{max_parallel}" if max_parallel else ""))
  lines += [f"#SBATCH --nodes={res.nodes}", f"#SBATCH --ntasks-per-node={res.ntasks_per_node}"]
  if res.gpus_per_node:
    lines.append(f"#SBATCH --gpus-per-node={res.gpus_per_node}")
  lines += [f"#SBATCH --cpus-per-task={res.cpus}", f"#SBATCH --time={res.time}"]
  lines += [f"#SBATCH --{k}={v}" for k, v in (("partition", res.partition),
                                               ("account", res.account)) if v]
  lines += [f"#SBATCH --output={os.path.join(env.log_dir, out)}",
            f"#SBATCH --signal=B:USR1@{_SIGNAL_SECONDS}", "#SBATCH --requeue"]
  lines += [f"#SBATCH {opt}" for opt in res.extra]
  return lines


def _collect_lines(res: Resources, env: Environment, name: str, collect: Sequence[str]) -> list:
  # --wrap runs under /bin/sh: the environment's python by path, not `source activate`.
  argv = list(collect)
  if argv[0] == "python":
    argv[0] = os.path.join(env.venv, "bin", "python")
  wrap = f"cd {shlex.quote(env.repo_dir)} && {shlex.join(argv)}"
  opts = ["--dependency=afterany:$SLURM_ARRAY_JOB_ID", f"--job-name={name}_collect",
          "--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--time=00:30:00",
          f"--output={os.path.join(env.log_dir, '%x-%j.out')}"]
  opts += [f"--{k}={v}" for k, v in (("partition", res.partition), ("account", res.account)) if v]
  return ["# The collect step, queued once (not again on a requeue) to start after every task.",
          'if [[ "${SLURM_ARRAY_TASK_ID:-}" == "${SLURM_ARRAY_TASK_MIN:-}" &&'
          ' "${SLURM_RESTART_COUNT:-0}" == 0 ]]; then',
          "  sbatch " + " ".join(f'"{o}"' if "$" in o else shlex.quote(o) for o in opts)
          + f" --wrap={shlex.quote(wrap)} \\",
          '    || echo "could not queue the collect step; run it by hand:" ' + shlex.quote(wrap)
          + " >&2", "fi", ""]


_RUN = r"""
finished() {
  python -c 'import sys; from etils import epath
sys.exit(not (epath.Path(sys.argv[1]) / sys.argv[2]).exists())' "$1" RESULTS
}
requeue=0
srun_pid=
trap 'requeue=1; echo "time limit near: checkpointing" >&2; kill -TERM "$srun_pid" 2>/dev/null' USR1
SRUN "${args[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # A trapped signal ends `wait` early.
  status=0
  wait "$srun_pid" || status=$?
done
if (( requeue )) && ! finished "$workdir"; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def script(commands: Sequence[Sequence[str]], res: Resources, env: Environment, *,
           name: str = "spp_jax", collect: Sequence[str] | None = None,
           max_parallel: int | None = None, array: bool | None = None) -> str:
  """A complete sbatch script: one training command, or an array with one per task.

  commands: `python -m spp_jax.main ... --workdir=W ...` argument lists, run from
    env.repo_dir with the environment's python.
  collect: for an array, a command that runs after every task has ended.
  array: None: an array when there are several commands.
  """
  if not commands:
    raise ValueError("an sbatch script needs at least one command")
  array = len(commands) > 1 if array is None else array
  if len(commands) > 1 and not array:
    raise ValueError(f"{len(commands)} commands need an array job")
  layout = ("one process per GPU (train/cluster.py gives local rank r GPU r)"
            if res.processes == "per_gpu" else "one process per node with all its GPUs")
  lines = _header(res, env, name, len(commands) if array else None, max_parallel)
  lines += ["# Generated by spp_jax/slurm.py; submit with: sbatch FILE.",
            f"# Task layout: {layout}.", "set -eo pipefail", "",
            f"cd {shlex.quote(env.repo_dir)}", f"source {shlex.quote(env.venv)}/bin/activate",
            "set -u", f"export SPP_JAX_CACHE_DIR={shlex.quote(env.cache_dir)}",
            "export PYTHONUNBUFFERED=1", ""]
  if array and collect:
    lines += _collect_lines(res, env, name, collect)
  entries = [f"workdir={shlex.quote(workdir_of(c))}; args=({shlex.join(c)})" for c in commands]
  if not array:
    lines += [entries[0]]
  else:
    lines += ['case "$SLURM_ARRAY_TASK_ID" in']
    lines += [f"  {i}) {e} ;;" for i, e in enumerate(entries)]
    lines += ['  *) echo "no command for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2', "esac"]
  run = _RUN.replace("SRUN", srun_line(res)).replace("RESULTS", RESULTS_FILE)
  return "\n".join(lines) + "\n" + run


def write(path: str, text: str, env: Environment) -> None:
  """Writes the script, and the log directory that SLURM needs to exist before the job."""
  os.makedirs(env.log_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


# ----------------------------------------------------------------------------- command line


def define_flags(prefix: str = "") -> None:
  """The resource flags; spp_jax.sweep defines them with prefix "slurm_"."""
  p = prefix
  flags.DEFINE_integer(p + "nodes", 1, "Nodes per training run.")
  flags.DEFINE_integer(p + "gpus_per_node", 8, "GPUs per node (0: CPU nodes, per_node).")
  flags.DEFINE_enum(p + "processes", "per_gpu", PROCESSES,
                    "One process per GPU, or one per node with all its GPUs.")
  flags.DEFINE_integer(p + "cpus_per_task", None, "CPUs per process (data workers); "
                       f"default {_CPUS_PER_GPU} per GPU it drives.")
  flags.DEFINE_string(p + "time", "24:00:00", "Time limit per job (HH:MM:SS or D-HH:MM:SS).")
  flags.DEFINE_string(p + "partition", None, "SLURM partition.")
  flags.DEFINE_string(p + "account", None, "SLURM account.")
  flags.DEFINE_multi_string(p + "sbatch", [], "Another sbatch option, e.g. --qos=high.")
  flags.DEFINE_string(p + "logs", None, "Directory of the job logs; default ./workdirs/slurm.")


def from_flags(prefix: str = "") -> tuple[Resources, Environment]:
  f = flags.FLAGS
  get = lambda name: f[prefix + name].value  # noqa: E731
  res = Resources(nodes=get("nodes"), gpus_per_node=get("gpus_per_node"),
                  processes=get("processes"), cpus_per_task=get("cpus_per_task"),
                  time=get("time"), partition=get("partition"), account=get("account"),
                  extra=tuple(get("sbatch")))
  return res, Environment.here(get("logs"))


def main(argv):
  f = flags.FLAGS
  command = ["python", "-m", "spp_jax.main", f"--config={f.config}", f"--workdir={f.workdir}",
             *argv[1:]]  # Everything after `--`: more main.py flags, e.g. --config.seed=1.
  res, env = from_flags()
  text = script([command], res, env, name=f.job_name)
  if f.out:
    write(f.out, text, env)
    print(f"wrote {f.out}: {res.nodes} node(s) x {res.ntasks_per_node} task(s); "
          f"submit with: sbatch {f.out}")
  else:
    os.makedirs(env.log_dir, exist_ok=True)
    sys.stdout.write(text)


if __name__ == "__main__":
  flags.DEFINE_string("config", None, "Config file for spp_jax.main, `file.py[:arg]`.",
                      required=True)
  flags.DEFINE_string("workdir", None, "spp_jax.main's --workdir.", required=True)
  flags.DEFINE_string("job_name", "spp_jax", "SLURM job name.")
  flags.DEFINE_string("out", None, "Write the script here (default: standard output).")
  define_flags()
  app.run(main)
