"""The same command twice gives byte-identical files (safetensors headers were in hash-map order)."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

SCRIPT = """
import sys
from surgery.model.loading import load
from surgery.edit.plan import SurgeryPlan
from surgery.edit.bake import bake
from surgery.export.safetensors import export_safetensors
loaded = load("builtin:tiny")
plan = SurgeryPlan(source={"arch": "custom"}, heads=[], provenance={"b": 1, "a": [2, 3]})
export_safetensors(loaded, sys.argv[1], plan)
"""


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_safetensors_export_is_byte_identical_across_processes(tmp_path):
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for path in paths:  # separate processes: each has its own hash-map seeds
        subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, timeout=300)
    assert len({_sha(p) for p in paths}) == 1


def test_sorted_header_keeps_the_file_readable(tmp_path):
    import torch
    from safetensors import safe_open

    from surgery.io.checkpoint import write_safetensors

    path = tmp_path / "t.safetensors"
    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
    write_safetensors(state, str(path), {"z": "last", "k": {"n": 1}, "é": "unicode"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"z": "last", "k": '{"n": 1}', "é": "unicode"}
        assert torch.equal(f.get_tensor("b"), state["b"]) and torch.equal(f.get_tensor("a"), state["a"])
    header = path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")].decode()
    assert header.index('"__metadata__"') < header.index('"a"') < header.index('"b"')  # sorted


@pytest.mark.slow
def test_debias_twice_gives_byte_identical_plan_and_files(tmp_path, small_removal_reference):
    """The removal path (audit, SAE, search, bake, export) at a test's size (small_removal.py), run
    in two interpreters: the shared reference run and this one."""
    from small_removal import run_fresh

    proc = run_fresh(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for file in ("m.plan.json", "m.visual.onnx", "m.text.onnx", "m.sae/weights.safetensors"):
        assert _sha(tmp_path / file) == _sha(small_removal_reference / file), file
