"""`sae train --out S` re-run on other inputs never reuses the old cache silently."""
from __future__ import annotations

import shutil

from click.testing import CliRunner
from helpers import labelled_image_folder

from surgery.cli.sae import sae

ARGS = ["--site", "embedding", "--kind", "topk", "--expansion", "2", "--k", "4", "--steps", "4", "--batch-size", "8"]


def test_other_images_are_refused_with_the_difference_named_and_force_rebuilds(tmp_path):
    first, _ = labelled_image_folder(_dir(tmp_path, "a"), 12)
    second, _ = labelled_image_folder(_dir(tmp_path, "b"), 8)
    out = tmp_path / "sae"
    runner = CliRunner()
    assert runner.invoke(sae, ["train", "builtin:tiny", "--images", first, *ARGS, "--out", str(out)]).exit_code == 0
    same = runner.invoke(sae, ["train", "builtin:tiny", "--images", first, *ARGS, "--out", str(out)])
    assert same.exit_code == 0 and "using cached activations" in same.output
    other = runner.invoke(sae, ["train", "builtin:tiny", "--images", second, *ARGS, "--out", str(out)])
    assert other.exit_code == 1, other.output
    assert "was built from other inputs (data_hash:" in other.output and "--force" in other.output
    rebuilt = runner.invoke(sae, ["train", "builtin:tiny", "--images", second, *ARGS, "--out", str(out), "--force"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "cached 8 rows from 8 inputs" in rebuilt.output


def test_a_changed_image_is_other_data(tmp_path):
    images, _ = labelled_image_folder(_dir(tmp_path, "a"), 6)
    out = tmp_path / "sae"
    runner = CliRunner()
    assert runner.invoke(sae, ["train", "builtin:tiny", "--images", images, *ARGS, "--out", str(out)]).exit_code == 0
    shutil.copyfile(f"{images}/01.png", f"{images}/00.png")  # same names, other bytes
    again = runner.invoke(sae, ["train", "builtin:tiny", "--images", images, *ARGS, "--out", str(out)])
    assert again.exit_code == 1 and "data_hash" in again.output


def test_training_options_are_checked_before_the_cache_is_built(tmp_path):
    images, _ = labelled_image_folder(_dir(tmp_path, "a"), 6)
    out = tmp_path / "sae"
    for bad, message in ((["--lr", "5"], "lr must be in (0, 1)"), (["--steps", "0"], "steps must be >= 1")):
        result = CliRunner().invoke(sae, ["train", "builtin:tiny", "--images", images, *ARGS, *bad, "--out", str(out)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (out / "cache").exists()


def _dir(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    return path
