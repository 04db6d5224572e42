"""Kill tests: SIGTERM and SIGKILL at seeded random points of export, bake and sae train, then a
re-run. No file sits at a final path unless it is complete, no staging is left after the re-run, and
the re-run's result equals an unbroken run's."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import labelled_image_folder

pytestmark = pytest.mark.slow
SEED = 1234  # the kill points are drawn from this, so a failure reproduces


def _cli(args, cwd, kill_after=None, sig=signal.SIGTERM):
    proc = subprocess.Popen([sys.executable, "-m", "surgery", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        time.sleep(kill_after)
        if proc.poll() is None:
            proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith((".", "clipsurgery-")) and n != ".cache")


def _kill_and_rerun(tmp_path, args, finals, unbroken_seconds, check_complete, compare):
    rng = random.Random(SEED)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        work = tmp_path / f"run-{sig.name}"
        work.mkdir()
        rc, output = _cli(args, work, kill_after=rng.uniform(0.3, unbroken_seconds), sig=sig)
        for name in finals:
            path = work / name
            if path.exists():  # a file at a final path is complete
                check_complete(path)
        if sig == signal.SIGTERM:
            # 143: our handler unwound the run. -15: the signal came before the handler was installed
            # (during imports) or after the work was done (interpreter shutdown): nothing half-made either way
            assert rc in (0, 128 + signal.SIGTERM, -signal.SIGTERM), output
            assert _leftovers(work) == [], output  # SIGTERM cleans up at once
        rc, output = _cli([*args, "--force"] if any((work / n).exists() for n in finals) else args, work)
        assert rc == 0, output
        assert _leftovers(work) == []  # SIGKILL's staging is removed by the re-run
        compare(work)


def test_export_killed_then_rerun(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    start = time.perf_counter()
    assert _cli(["export", "builtin:tiny", "m.onnx"], reference)[0] == 0
    seconds = time.perf_counter() - start
    finals = ["m.visual.onnx", "m.text.onnx"]

    def complete(path):
        import onnx

        onnx.checker.check_model(onnx.load(str(path)))

    def same(work):
        assert [_sha(work / n) for n in finals] == [_sha(reference / n) for n in finals]

    _kill_and_rerun(tmp_path, ["export", "builtin:tiny", "m.onnx"], finals, seconds, complete, same)


def test_bake_killed_then_rerun(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema": "clipsurgery.plan/1", "heads": [
        {"tower": "vision", "layer": 1, "head": 2, "scale": 0.0, "ablation": "zero"}]}))
    reference = tmp_path / "reference"
    reference.mkdir()
    start = time.perf_counter()
    assert _cli(["bake", "builtin:tiny", str(plan), "b.safetensors"], reference)[0] == 0
    seconds = time.perf_counter() - start

    def complete(path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert f.metadata()["clipsurgery.plan"]

    def same(work):
        assert _sha(work / "b.safetensors") == _sha(reference / "b.safetensors")

    _kill_and_rerun(tmp_path, ["bake", "builtin:tiny", str(plan), "b.safetensors"], ["b.safetensors"], seconds,
                    complete, same)


def test_sae_train_killed_then_resumed(tmp_path):
    images, _ = labelled_image_folder(tmp_path, 12)
    args = ["sae", "train", "builtin:tiny", "--images", images, "--site", "embedding", "--kind", "topk",
            "--expansion", "2", "--k", "4", "--steps", "300", "--batch-size", "8", "--out", "sae"]
    reference = tmp_path / "reference"
    reference.mkdir()
    start = time.perf_counter()
    assert _cli(args, reference)[0] == 0
    seconds = time.perf_counter() - start

    def weights(folder):
        from safetensors.torch import load_file

        return load_file(str(folder / "sae" / "weights.safetensors"))

    def complete(path):
        weights(path.parent.parent)

    def same(work):
        import torch

        ref, got = weights(reference), weights(work)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    rng = random.Random(SEED + 1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        work = tmp_path / f"run-{sig.name}"
        work.mkdir()
        _cli(args, work, kill_after=rng.uniform(1.0, seconds), sig=sig)
        if (work / "sae" / "weights.safetensors").exists():
            complete(work / "sae" / "weights.safetensors")
        rc, output = _cli(args, work)  # resumes from the cache and the last checkpoint
        assert rc == 0, output
        assert [n for n in os.listdir(work / "sae") if n.endswith(".tmp")] == []
        same(work)


def test_debias_killed_then_rerun(tmp_path):
    args = ["debias", "builtin:world", "m.onnx", "--n-probe", "240", "--k", "20", "--selection-draws", "1",
            "--allow-miss", "--removal", "always"]  # the removal path trains the SAE too
    reference = tmp_path / "reference"
    reference.mkdir()
    start = time.perf_counter()
    assert _cli(args, reference)[0] == 0
    seconds = time.perf_counter() - start
    finals = ["m.plan.json", "m.visual.onnx", "m.text.onnx", "m.sae", "m.report"]

    def complete(path):
        if path.name == "m.sae":
            assert (path / "weights.safetensors").is_file() and (path / "cfg.json").is_file()
        elif path.suffix == ".json":
            json.loads(path.read_text())

    def same(work):
        for name in ("m.plan.json", "m.visual.onnx", "m.text.onnx", "m.sae/weights.safetensors"):
            assert _sha(work / name) == _sha(reference / name), name

    _kill_and_rerun(tmp_path, args, finals, seconds, complete, same)
