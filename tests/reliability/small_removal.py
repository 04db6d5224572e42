"""The removal path of ``clipsurgery debias`` at a test's size, for the tests that check what a run
does to its files (killed inside its SAE write, byte-identical twice) rather than how well it debiases
(tests/debias/test_debias.py::test_debias_removal_edits_to_onnx is that path's full run).

The same stages run (audit, SAE training in staging, candidates, the search over heads and latents,
bake, export, parity, report) on the same command line; only the SAE shrinks: it trains on
SAE_IMAGES world images instead of DebiasOptions.sae_images, and its candidates are the latents
that fire on at least SAE_TAU of a group's images (seed 001's 0.5 finds none on so small an SAE:
the search would keep no latent and the run would write no SAE). About 11 s a run instead of 25.

    python small_removal.py CLIPSURGERY-ARGS...   (a fresh interpreter: install(), then the CLI)
"""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

SAE_IMAGES = 480  # world train-split images (default 4000)
SAE_TAU = 0.1
ARGS = ["debias", "builtin:world", "m.onnx", "--n-probe", "240", "--k", "20", "--selection-draws", "1",
        "--allow-miss", "--removal", "always"]  # the removal path trains the SAE


def install() -> None:
    """Every debias run in this process trains its SAE on SAE_IMAGES images, candidates at SAE_TAU."""
    from surgery.cli import main as cli
    from surgery.debias import pipeline

    cli.DebiasOptions = functools.partial(pipeline.DebiasOptions, sae_images=SAE_IMAGES)
    pipeline.NeuronStageOptions = functools.partial(pipeline.NeuronStageOptions, tau=SAE_TAU)


def run_fresh(folder) -> subprocess.CompletedProcess:
    """ARGS in a fresh interpreter (this script), in ``folder``."""
    return subprocess.run([sys.executable, str(Path(__file__)), *ARGS], cwd=folder, capture_output=True, text=True,
                          timeout=900)


if __name__ == "__main__":
    install()
    from surgery.cli.main import main

    sys.argv = ["clipsurgery", *sys.argv[1:]]
    main(prog_name="clipsurgery")
