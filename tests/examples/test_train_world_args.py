"""examples/train_world.py checks every argument before it trains (training takes minutes)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_world.py"


@pytest.mark.parametrize(("args", "message"), [
    (["--groups", "red"], "groups needs 2 to 4 names, got 1"),
    (["--concepts", "circle,square,circle,star"], "concepts repeats a name"),
    (["--groups", "red,blue,green", "--n-eval", "1200"], "--n-eval=1200 is not a multiple of concepts x groups = 18"),
    (["--groups", "red,mauve"], "unknown groups mauve"),
])
def test_bad_arguments_fail_at_once(tmp_path, args, message):
    out = tmp_path / "sub" / "w.safetensors"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "step" not in result.stdout  # refused before any training step
    assert not out.exists()


@pytest.mark.slow
def test_a_three_group_world_trains_and_evaluates(tmp_path):
    out = tmp_path / "new" / "w3.safetensors"  # the output folder is created
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--groups", "red,blue,green",
                             "--concepts", "circle,square,star,ring", "--epochs", "1", "--n-train", "256"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "zero-shot concept accuracy" in result.stdout
