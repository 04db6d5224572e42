"""examples/train_world.py checks every argument before it trains (training takes minutes)."""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_world.py"


@pytest.fixture(scope="module")
def train_world():
    """examples/train_world.py as a module (its ``main(argv)`` in this process: no interpreter start)."""
    spec = importlib.util.spec_from_file_location("train_world_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("args", "message"), [
    (["--groups", "red"], "groups needs 2 to 4 names, got 1"),
    (["--concepts", "circle,square,circle,star"], "concepts repeats a name"),
    (["--groups", "red,blue,green", "--n-eval", "1200"], "--n-eval=1200 is not a multiple of concepts x groups = 18"),
    (["--groups", "red,mauve"], "unknown groups mauve"),
])
def test_bad_arguments_fail_at_once(tmp_path, args, message, train_world, monkeypatch, capsys):
    def trains(*_a, **_k):
        raise AssertionError("training started before every argument was checked")

    monkeypatch.setattr(train_world, "train_world_model", trains)
    monkeypatch.setattr(train_world.torch, "set_num_threads", lambda n: None)  # never this process's threads
    out = tmp_path / "sub" / "w.safetensors"
    code = train_world.main(["--out", str(out), *args])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert message in captured.err and "step" not in captured.out  # refused before any training step
    assert not out.exists()


@pytest.mark.slow
def test_a_three_group_world_trains_and_evaluates(tmp_path):
    out = tmp_path / "new" / "w3.safetensors"  # the output folder is created
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--groups", "red,blue,green",
                             "--concepts", "circle,square,star,ring", "--epochs", "1", "--n-train", "256"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "zero-shot concept accuracy" in result.stdout
