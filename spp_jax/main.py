r"""Trains and evaluates an SPP network from a config file.

  python -m spp_jax.main --config configs/demo.py --workdir workdirs/demo
  python -m spp_jax.main --config configs/zf5_imagenet.py:multi,levels=4321 \
      --workdir workdirs/zf5_multi --config.train.batch_size=256

`--config FILE.py[:ARG]` calls FILE's get_config(ARG); `--config.a.b=value` overrides one key.
Running again with the same --workdir resumes from its latest checkpoint that verifies; one run
at a time may use a workdir. Multi-host: start one process per host with the same flags;
jax.distributed finds the cluster (SLURM, Open MPI, TPU pods, Kubernetes), or pass
--coordinator_address, --num_processes and --process_id.

Exit status:
  0    finished; or stopped by SIGTERM, a preemption or train.stop_at_step after saving a
       checkpoint (running again resumes)
  1    an expected failure, reported as one `error: ...` line and at most one `hint: ...` line
       (bad config or flag, unprepared data set, full disk, damaged checkpoints, a workdir in
       use by another run, a non-finite loss); --verbose adds the traceback
  130  Ctrl-C (SIGINT): a checkpoint was saved first (running again resumes); a second Ctrl-C
       ends the process at once without saving (the shell then also reports 130)
Anything else (a Python traceback) is a bug.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from spp_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/demo.py or "
    "configs/zf5_imagenet.py:multi. Keys can be overridden with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results; "
                               "an existing one is resumed.")
_FORCE = flags.DEFINE_bool("force", False, "Continue in a workdir whose saved config differs "
                           "(sets config.allow_config_change).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for "
                                   "jax.distributed (multi-host without cluster detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the INFO logs of jax and orbax too, and "
                             "the traceback of an expected failure.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- flag errors


def _innermost(exc: BaseException) -> BaseException:
  seen = {id(exc)}
  while (exc.__cause__ or exc.__context__) is not None and id(
      exc.__cause__ or exc.__context__) not in seen:
    exc = exc.__cause__ or exc.__context__
    seen.add(id(exc))
  return exc


def _first_line(exc: BaseException) -> str:
  lines = str(exc).strip().strip("'\"").splitlines()
  return lines[0] if lines else type(exc).__name__


def _override_of(name: str, argv) -> str | None:
  """The --config.a.b=v argument whose path has the component `name`."""
  for arg in argv:
    path = arg.split("=", 1)[0]
    if path.startswith("--config.") and name in path[len("--config."):].split("."):
      return arg
  return None


def _schema_rule(dotted: str) -> str | None:
  from spp_jax.train.config_schema import SCHEMA, Key
  node = SCHEMA
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node.rule.describe() if isinstance(node, Key) else None


def describe_flag_error(exc: BaseException, argv) -> errors.ExpectedError:
  """A flag-parsing failure (absl or ml_collections) as one line with a hint."""
  text = str(exc)
  # ml_collections on an unknown key: KeyError/AttributeError("'name'\nDid you mean "x"
  # instead of "name"?"), escaped once per re-raise.
  if isinstance(exc, (KeyError, AttributeError)) and re.search(r"\w", text):
    name = (re.search(r'instead of \W*(\w+)', text) or re.search(r"(\w+)", text)).group(1)
    guess = re.search(r'Did you mean \W*(\w+)', text)
    arg = _override_of(name, argv)
    flag = arg.split("=", 1)[0] if arg else f"--config.<...>.{name}"
    hint = None
    if guess and arg:
      head, _, tail = flag.rpartition(name)
      hint = f"did you mean {head}{guess.group(1)}{tail}?"
    return errors.ExpectedError(f"{arg or flag}: config.{flag[len('--config.'):]} is not a "
                                f"config key", hint)
  if isinstance(exc, flags.IllegalFlagValueError) and text.startswith("flag --config="):
    flag = text[len("flag "):].split(": Error whilst parsing", 1)[0]
    return errors.ExpectedError(f"{flag}: {_first_line(_innermost(exc))}")
  if isinstance(exc, flags.IllegalFlagValueError) and text.startswith("flag --config."):
    key = text[len("flag --config."):].split("=", 1)[0]
    rule = _schema_rule(key)
    return errors.ExpectedError(text[len("flag "):].splitlines()[0],
                                f"config.{key} must be {rule}" if rule else None)
  if isinstance(exc, flags.Error):
    return errors.ExpectedError(text.splitlines()[0].removeprefix("flag "),
                                "python -m spp_jax.main --helpshort lists the flags")
  if isinstance(exc, SyntaxError):
    return errors.ExpectedError(f"--config: the config file {exc.filename} line {exc.lineno}: "
                                f"{exc.msg}")
  return errors.ExpectedError(errors.one_line(text.splitlines()[0] if text else repr(exc)))


def _parse_flags(argv):
  try:
    from spp_jax import configs  # --config NAME.py also finds the shipped configs by name

    return flags.FLAGS(configs.resolve_argv(argv))
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError,
          SyntaxError) as e:
    if "--verbose" in argv:
      traceback.print_exception(e)
    errors.report(describe_flag_error(e, argv))
    sys.exit(EXIT_ERROR)


def _load_config():
  """The config; a file that fails to load (it raises on first use) is one error line."""
  config = _CONFIG.value
  try:
    config.keys()
  except (OSError, ValueError, TypeError, KeyError, AttributeError, SyntaxError) as e:
    lines = str(_innermost(e)).strip().splitlines()
    raise errors.ExpectedError(
        f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: cannot load "
        f"the config file: {lines[-1].strip() if lines else type(e).__name__}") from e
  return config


# ----------------------------------------------------------------------------- the run


def _run(config, workdir: str):
  from spp_jax import paths

  paths.check(workdir, "workdir")  # a scheme other than gs:// fails before anything starts
  if config.get("task") == "detection":  # configs/detect_*.py: SPP-net detection (docs/paper.md §6)
    from spp_jax.detection.run import run  # after flags: imports jax

    run(config, workdir, log=lambda m: print(m, flush=True))
    return
  from spp_jax.train import cluster, loop, results_table

  cluster.initialize(config.distributed, coordinator_address=_COORDINATOR.value,
                     num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  results = loop.train_and_evaluate(config, workdir)
  import jax

  if results and jax.process_index() == 0:
    print(f"\nFinal evaluation ({workdir}/results.json):")
    print(results_table(results))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Our progress lines at INFO; the libraries' (orbax logs every save) only with --verbose.
  absl_logging.set_verbosity(absl_logging.INFO if _VERBOSE.value else absl_logging.WARNING)
  logging.getLogger("spp_jax").setLevel(logging.INFO)
  if not _VERBOSE.value:
    errors.quiet_library_errors()
  from spp_jax import runtime

  runtime.configure_cpu_flags()  # Before anything starts the backend.
  try:
    config = _load_config()
    if _FORCE.value:
      with config.unlocked():
        config.allow_config_change = True
    _run(config, _WORKDIR.value)
  except errors.InterruptedRun as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    print("interrupted before training started: nothing was saved", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
  except Exception as e:  # noqa: BLE001 - expected failures are one line; bugs keep a traceback
    if not errors.expected(e):
      raise
    errors.report(e, verbose=_VERBOSE.value)
    sys.exit(EXIT_ERROR)


def run():
  """Console script spp-train."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
