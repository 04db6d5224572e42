"""One small removal-path debias run in a fresh interpreter, shared by the tests that compare a
later run's files with it (test_determinism: another fresh interpreter; test_kills: re-runs after
a kill)."""
from __future__ import annotations

import pytest
from small_removal import run_fresh


@pytest.fixture(scope="session")
def small_removal_reference(tmp_path_factory):
    """The folder of an unbroken small removal-path run (m.plan.json, m.visual.onnx, m.text.onnx, m.sae/)."""
    folder = tmp_path_factory.mktemp("small-removal-reference")
    proc = run_fresh(folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder
