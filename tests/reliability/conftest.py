"""One small removal-path debias run in a fresh interpreter, shared by the tests that compare a
later run's files with it (test_determinism: another fresh interpreter; test_kills: re-runs after
a kill)."""
from __future__ import annotations

import fcntl
import os
import shutil

import pytest
from small_removal import run_fresh


@pytest.fixture(scope="session")
def small_removal_reference(tmp_path_factory):
    """The folder of an unbroken small removal-path run (m.plan.json, m.visual.onnx, m.text.onnx, m.sae/).

    Made once per pytest run: under pytest-xdist the first worker that asks makes it in the folder
    the run's workers share (the parent of each worker's basetemp), under a lock; a worker that
    asks meanwhile waits for it. The tests only read it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: this session's own temp folder
        return _make(tmp_path_factory.mktemp("small-removal-reference"))
    shared = tmp_path_factory.getbasetemp().parent
    folder = shared / "small-removal-reference"
    with open(shared / "small-removal-reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        made = shared / "small-removal-reference.made"
        if not made.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a run that failed in another worker
            folder.mkdir()
            _make(folder)
            made.touch()
    return folder


def _make(folder):
    proc = run_fresh(folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder
