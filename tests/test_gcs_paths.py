"""The one path type (spp_jax/paths.py) on local disk, and the refusal of other schemes.

The same functions on gs:// are tested against fake-gcs-server in test_gcs_storage.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading

import pytest

from spp_jax import paths

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_paths_become_absolute_and_gs_paths_stay_as_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.path("run")) == os.fspath(tmp_path / "run")
  assert os.fspath(paths.path("~/x")) == os.path.join(os.path.expanduser("~"), "x")
  if importlib.util.find_spec("gcsfs") is not None:
    assert os.fspath(paths.path("gs://bucket/run/")) == "gs://bucket/run"
  assert paths.scheme("gs://b/x") == "gs" and paths.scheme("/a/b") is None
  assert paths.is_remote("gs://b/x") and not paths.is_remote("relative/dir")


@pytest.mark.parametrize("url", ["s3://bucket/run", "hdfs://namenode/run", "az://c/run"])
def test_unsupported_scheme_is_one_line_naming_the_key(url):
  with pytest.raises(paths.UnsupportedPathError) as e:
    paths.check(url, "config.data.data_dir")
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"config.data.data_dir {url!r}: the scheme {url.split(':')[0]}://")
  assert e.value.hint


def test_gs_without_gcsfs_says_which_extra_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "gcsfs" else real(name, *a))
  with pytest.raises(paths.UnsupportedPathError, match="gs:// needs gcsfs") as e:
    paths.check("gs://b/run", "workdir")
  assert e.value.hint == "pip install 'spp_jax[gcs]'"


def test_local_write_create_append_move(tmp_path):
  p = tmp_path / "a.json"
  paths.write_atomic(p, "1")
  paths.write_atomic(p, b"2")
  assert p.read_text() == "2" and os.listdir(tmp_path) == ["a.json"]  # no temporary left
  wins = []
  threads = [threading.Thread(target=lambda i=i: paths.create_exclusive(tmp_path / "lock", str(i))
                              and wins.append(i)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(wins) == 1 and (tmp_path / "lock").read_text() == str(wins[0])
  appender = paths.Appender(tmp_path / "m.jsonl")
  appender.write("x\n")
  appender.flush()  # a local file: written through at once
  assert (tmp_path / "m.jsonl").read_text() == "x\n"
  appender.close()
  paths.move(tmp_path / "lock", tmp_path / "deep" / "er" / "lock")
  assert (tmp_path / "deep" / "er" / "lock").read_text() == str(wins[0])
  assert paths.is_file(tmp_path / "a.json") and not paths.is_file("/dev/null")


@pytest.mark.parametrize("flag", ["--workdir=hdfs://nn/run", "--config.data.data_dir=s3://b/d",
                                  "--config.compilation_cache_dir=ftp://h/c"])
def test_training_with_an_unsupported_scheme_fails_at_start_in_one_line(tmp_path, flag):
  args = [sys.executable, "-m", "spp_jax.main", "--config", "configs/demo.py:tiny"]
  if not flag.startswith("--workdir"):
    args.append(f"--workdir={tmp_path / 'run'}")
  got = subprocess.run(args + [flag], cwd=_REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert got.returncode == 1, got.stderr[-3000:]
  lines = got.stderr.strip().splitlines()
  url = flag.split("=", 1)[1]
  assert lines[-2].startswith("error: ") and f"{url!r}: the scheme" in lines[-2], lines[-3:]
  assert lines[-1].startswith("hint: ")
  assert "Traceback" not in got.stderr
  assert not os.path.exists(tmp_path / "run")  # nothing was written


def test_evaluate_refuses_an_unsupported_scheme_in_one_line():
  got = subprocess.run([sys.executable, "-m", "spp_jax.evaluate", "--workdir", "s3://b/run"],
                       cwd=_REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert got.returncode == 1
  assert got.stderr.strip().splitlines()[-1].startswith("error: workdir 's3://b/run': the "
                                                        "scheme s3:// is not supported")
