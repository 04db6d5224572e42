"""The real server in a subprocess on a loopback port, over a tiny exported pair."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import surgery
from surgery.export.onnx import export_onnx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_DEADLINE_S = 120  # a wait for start-up on a loaded machine, not a timing assertion


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> str:
    """OUT.onnx of builtin:tiny (32x32 images, context 16, 32-d embeddings), both towers."""
    out = str(tmp_path_factory.mktemp("pair") / "tiny.onnx")
    export_onnx(surgery.load("builtin:tiny"), out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def metric(self, name: str, **labels) -> float | None:
        """One sample of /metrics (None when absent)."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith("#"):
                continue
            key, value = line.rsplit(" ", 1)
            found, _, rest = key.partition("{")
            pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",")) if rest else {}
            if found == name and {k: v.strip('"') for k, v in pairs.items()} == {k: str(v) for k, v in labels.items()}:
                return float(value)
        return None

    def wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while not predicate():
            assert self.proc.poll() is None, f"server exited while waiting for {what}: {self.output()}"
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.02)

    def output(self) -> str:
        return self.proc.stdout.read().decode(errors="replace") if self.proc.poll() is not None else ""


@contextlib.contextmanager
def running_server(model: str, *args: str):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "serve", model, "--port", str(port),
                             "--log-level", "warning", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        try:
            return httpx.get(server.url + "/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        server.wait_for(ready, "/readyz")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="session")
def default_server(tiny_pair):
    """One server of tiny_pair with the default options, shared by the tests that only send it requests
    and read the answers (no counts of /metrics, no options, no signals): one start-up (~5 s) for them all."""
    with running_server(tiny_pair) as server:
        yield server


@pytest.fixture
def start_server():
    """``with start_server(model, *cli_args) as server:`` -> :class:`Server` (killed afterwards if still up)."""
    return running_server
