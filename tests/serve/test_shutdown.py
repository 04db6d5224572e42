"""SIGTERM while a request runs past the graceful timeout (issue 24): that request is answered 503
(not 500) and the process exits at once instead of waiting for the stuck call."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
from conftest import REPO, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
EXIT_GUARD_S = 120  # how long the test waits for the exit before calling it a hang (not a speed assertion)


def test_sigterm_answers_a_request_stuck_past_the_deadline_503_and_exits(tmp_path):
    marker = tmp_path / "entered"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # the stub's ONNX Runtime call never returns; graceful timeout 1 s
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "serve_stub.py"), str(port), "1", str(marker)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + EXIT_GUARD_S
        while True:  # wait for readiness (a start-up wait, not a timing assertion)
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode(errors="replace")
            time.sleep(0.05)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(httpx.post, url + "/v1/embeddings/text", json={"texts": ["a"]}, timeout=EXIT_GUARD_S)
            while not marker.exists():  # the request is inside the (stub) ONNX Runtime call
                assert not stuck.done(), stuck.result().text
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answer = stuck.result()
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=EXIT_GUARD_S) == 0  # raises TimeoutExpired if the stuck call held the process
        output = proc.stdout.read().decode(errors="replace")
        assert "Traceback" not in output and "abandoned 1" in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
