"""Kill tests: SIGTERM and SIGKILL inside a file write of export, bake, embed, sae train and debias,
then a re-run.

The kill point is not a guess in time: the command runs under hold_in_write.py, which stops it
inside a chosen write (the bytes written to the temporary or staging file, the rename not done) and
leaves a marker the test waits for. The test then checks the process is still alive, kills it, and
checks: no file sits at a final path unless it is complete (the held one is not there at all), a
SIGTERM leaves no temporary file behind, the re-run leaves none either, a re-run of embed keeps the
parts finished before the kill and one of sae train resumes from its checkpoint (step > 0), and
every re-run ends equal, byte for byte, to an unbroken run.

Each run is a forked child of the test process (helpers.ForkedCli: a process of its own, with its
own signals and exit status, without an interpreter start and ~5 s of imports per run); the hold
is hold_in_write.hold, installed in the child. The debias case runs the removal path at a test's
size (small_removal.py) and compares with the shared reference run made in a fresh interpreter.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import small_removal
from helpers import ForkedCli, forked_cli, labelled_image_folder
from hold_in_write import hold

pytestmark = pytest.mark.slow
SIGNALS = (signal.SIGTERM, signal.SIGKILL)
#: How long a held run may take to reach its write before the test gives up (a hang, not a timing check).
REACH_LIMIT_S = 900


def _killed_inside(args, cwd: Path, writer: str, name: str, sig: signal.Signals, nth: int = 1, setup=None
                   ) -> tuple[int, str, Path]:
    """Run ``args`` until it is inside its ``nth`` write of a file named like ``name``, check it is
    alive there, send ``sig``; returns (exit code, output, the file being written when killed)."""
    marker = cwd.parent / f"{cwd.name}.held"
    log = cwd.parent / f"{cwd.name}.log"

    def stop_in_the_write():
        if setup:
            setup()
        hold(str(marker), writer, name, nth)

    proc = ForkedCli(args, cwd, log, setup=stop_in_the_write)  # output to a file: a full pipe would stall it
    try:
        deadline = time.monotonic() + REACH_LIMIT_S
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before write {nth} of {name}: "
                            f"{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach write {nth} of {name}: {log.read_text()}")
            time.sleep(0.05)
        held = Path(marker.read_text())
        assert proc.poll() is None  # alive, and stopped inside the write
        assert held.is_file()  # the bytes are written, to a temporary or staging path
        proc.send_signal(sig)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:  # a failed check above: a held run would wait for ever
            proc.kill()
            proc.wait()
    expected = 128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL  # the CLI's handler: exit 143
    assert rc == expected, log.read_text()
    return rc, log.read_text(), held


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _leftovers(folder) -> list[str]:
    """Temporary files and staging folders (hidden or clipsurgery-*) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if (p.name.endswith(".tmp") or p.name.startswith((".", "clipsurgery-")))
                  and ".cache" not in p.relative_to(folder).parts)  # a tool cache (matplotlib, hub) is not ours


def _reference(tmp_path, args) -> Path:
    folder = tmp_path / "reference"
    folder.mkdir()
    rc, output = forked_cli(args, folder)
    assert rc == 0, output
    return folder


def _kill_rerun(tmp_path, args, writer, name, finals, same, nth=1, after_kill=None, after_rerun=None, setup=None):
    """``finals``: outputs that cannot exist yet when the held write is killed; ``setup``: run in
    each child (killed or re-run) before the command."""
    for sig in SIGNALS:
        work = tmp_path / f"run-{sig.name}"
        work.mkdir()
        _, output, held = _killed_inside(args, work, writer, name, sig, nth, setup)
        assert not any((work / f).exists() for f in finals), output  # killed before the rename: no output
        if sig == signal.SIGTERM:
            assert _leftovers(work) == [] and not held.exists(), output  # SIGTERM unwinds: nothing left
        if after_kill:
            after_kill(work)
        rc, output = forked_cli(args, work, setup)  # no --force: nothing was left at an output path
        assert rc == 0, output
        assert _leftovers(work) == []  # a SIGKILL's temp files and staging are removed by the re-run
        if after_rerun:
            after_rerun(work, output)
        same(work)


def test_export_killed_inside_its_onnx_write_then_rerun(tmp_path):
    args = ["export", "builtin:tiny", "m.onnx"]
    reference = _reference(tmp_path, args)
    finals = ["m.visual.onnx", "m.text.onnx"]

    def same(work):
        assert [_sha(work / n) for n in finals] == [_sha(reference / n) for n in finals]

    _kill_rerun(tmp_path, args, "onnx", "m.visual.onnx", finals, same)


def test_bake_killed_inside_its_safetensors_write_then_rerun(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema": "clipsurgery.plan/1", "heads": [
        {"tower": "vision", "layer": 1, "head": 2, "scale": 0.0, "ablation": "zero"}]}))
    args = ["bake", "builtin:tiny", str(plan), "b.safetensors"]
    reference = _reference(tmp_path, args)

    def same(work):
        assert _sha(work / "b.safetensors") == _sha(reference / "b.safetensors")

    _kill_rerun(tmp_path, args, "safetensors", "b.safetensors", ["b.safetensors"], same)


def test_embed_killed_inside_a_part_write_resumes_with_the_finished_parts(tmp_path):
    from safetensors.torch import load_file

    images, _ = labelled_image_folder(tmp_path, 12)
    args = ["embed", "builtin:tiny", "--images", images, "--site", "embedding", "--unit-images", "4",
            "--batch-size", "4", "--out", "cache"]
    reference = _reference(tmp_path, args)
    parts = [f"part-0000{i}.safetensors" for i in range(3)]
    finished: dict[str, int] = {}

    def after_kill(work):
        assert not (work / "cache" / "cache.json").exists()
        finished.clear()
        finished.update({p: (work / "cache" / p).stat().st_mtime_ns for p in parts[:2]})  # done before the kill

    def after_rerun(work, output):
        assert "2 kept from an earlier run" in output, output
        assert {p: (work / "cache" / p).stat().st_mtime_ns for p in parts[:2]} == finished  # kept, not redone

    def same(work):
        assert (work / "cache" / "cache.json").read_text() == (reference / "cache" / "cache.json").read_text()
        for p in parts:
            got, ref = load_file(str(work / "cache" / p)), load_file(str(reference / "cache" / p))
            assert got.keys() == ref.keys() and all((got[k] == ref[k]).all() for k in ref), p

    _kill_rerun(tmp_path, args, "safetensors", "part-00002.safetensors", ["cache/part-00002.safetensors"], same,
                after_kill=after_kill, after_rerun=after_rerun)


def test_sae_train_killed_inside_a_checkpoint_write_resumes_from_the_last_checkpoint(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    images, _ = labelled_image_folder(tmp_path, 12)
    args = ["sae", "train", "builtin:tiny", "--images", images, "--site", "embedding", "--kind", "topk",
            "--expansion", "2", "--k", "4", "--steps", "300", "--batch-size", "8", "--checkpoint-every", "100",
            "--out", "sae"]
    reference = _reference(tmp_path, args)

    def after_kill(work):  # killed while writing the step-200 checkpoint: the step-100 one is whole
        with safe_open(str(work / "sae" / "checkpoint.safetensors"), "pt") as fh:
            assert json.loads(fh.metadata()["step"]) == 100

    def after_rerun(work, output):
        assert "using cached activations" in output, output
        assert json.loads((work / "sae" / "cfg.json").read_text())["training"]["resumed_at"] == 100

    def same(work):
        ref, got = load_file(str(reference / "sae" / "weights.safetensors")), load_file(str(work / "sae" /
                                                                                            "weights.safetensors"))
        assert ref.keys() == got.keys() and all((ref[k] == got[k]).all() for k in ref)

    _kill_rerun(tmp_path, args, "safetensors", "checkpoint.safetensors", ["sae/weights.safetensors"], same, nth=2,
                after_kill=after_kill, after_rerun=after_rerun)


def test_debias_killed_inside_its_sae_write_then_rerun(tmp_path, small_removal_reference):
    """The removal path at a test's size (small_removal.py); the unbroken run to compare with is
    the shared one (a fresh interpreter, as test_determinism's)."""
    args = small_removal.ARGS  # the removal path trains the SAE
    outputs = ["m.plan.json", "m.visual.onnx", "m.text.onnx", "m.sae", "m.report"]

    def same(work):
        for name in ("m.plan.json", "m.visual.onnx", "m.text.onnx", "m.sae/weights.safetensors"):
            assert _sha(work / name) == _sha(small_removal_reference / name), name

    # the SAE is written in a staging folder beside m.sae and moved into place only with its plan
    _kill_rerun(tmp_path, args, "safetensors", "weights.safetensors", outputs, same, setup=small_removal.install)
