"""`clipsurgery sae train` / `sae neurons` through click's CliRunner on builtin:tiny."""
from __future__ import annotations

import json

from click.testing import CliRunner
from helpers import labelled_image_folder

from surgery.cli.sae import sae


def test_train_then_neurons(tmp_path):
    images_dir, labels = labelled_image_folder(tmp_path)
    out = tmp_path / "sae"
    runner = CliRunner()
    args = ["train", "builtin:tiny", "--images", images_dir, "--site", "embedding", "--kind", "topk",
            "--expansion", "2", "--k", "4", "--steps", "6", "--batch-size", "8", "--out", str(out)]
    result = runner.invoke(sae, args)
    assert result.exit_code == 0, result.output
    assert "NMSE" in result.output and (out / "weights.safetensors").exists() and (out / "cfg.json").exists()
    record = json.loads((out / "cfg.json").read_text())
    assert record["config"]["kind"] == "topk" and "metrics" in record
    again = runner.invoke(sae, args)  # the cache is reused, the finished checkpoint resumed
    assert again.exit_code == 0 and "using cached activations" in again.output
    neurons = tmp_path / "neurons.json"
    result = runner.invoke(sae, ["neurons", str(out), "builtin:tiny", "--images", images_dir, "--labels", labels,
                                 "--attribute", "colour", "--tau", "0.3", "--out", str(neurons)])
    assert result.exit_code == 0, result.output
    assert json.loads(neurons.read_text())["groups"] == ["blue", "red"]


def test_bad_input_is_one_line(tmp_path):
    images_dir, labels = labelled_image_folder(tmp_path, 4)
    runner = CliRunner()
    both = runner.invoke(sae, ["train", "builtin:tiny", "--images", images_dir, "--texts", labels, "--out", str(tmp_path / "o")])
    assert both.exit_code == 2 and "exactly one of --images DIR or --texts FILE" in both.output
    big_k = runner.invoke(sae, ["train", "builtin:tiny", "--images", images_dir, "--site", "embedding",
                                "--expansion", "1", "--k", "64", "--out", str(tmp_path / "o")])
    assert big_k.exit_code == 1 and "k=64 is larger than the SAE width 32" in big_k.output
    assert "Traceback" not in big_k.output and len(big_k.output.strip().splitlines()) <= 2
    one_group = tmp_path / "one.csv"
    one_group.write_text("file,colour\n" + "".join(f"{i:02d}.png,red\n" for i in range(4)))
    texts = tmp_path / "t.txt"
    texts.write_text("a photo\na drawing\n")
    ok = runner.invoke(sae, ["train", "builtin:tiny", "--texts", str(texts), "--site", "residual", "--expansion", "1",
                             "--k", "2", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "t")])
    assert ok.exit_code == 0, ok.output
    wrong_tower = runner.invoke(sae, ["neurons", str(tmp_path / "t"), "builtin:tiny", "--images", images_dir,
                                      "--labels", str(one_group), "--attribute", "colour", "--out",
                                      str(tmp_path / "n.json")])
    assert wrong_tower.exit_code == 1 and "text tower" in wrong_tower.output


def test_neurons_from_group_prompts(tmp_path):
    """No labelled images: a text-tower SAE searched with prompts naming the groups."""
    texts = tmp_path / "t.txt"
    texts.write_text("".join(f"a photo of a {w} person\n" for w in ("young", "old", "tall", "short", "happy", "sad")))
    runner = CliRunner()
    ok = runner.invoke(sae, ["train", "builtin:tiny", "--texts", str(texts), "--site", "embedding", "--kind", "relu",
                             "--expansion", "2", "--steps", "4", "--batch-size", "4", "--out", str(tmp_path / "t")])
    assert ok.exit_code == 0, ok.output
    out = tmp_path / "n.json"
    result = runner.invoke(sae, ["neurons", str(tmp_path / "t"), "builtin:tiny", "--groups", "young,old",
                                 "--attribute", "age", "--tau", "0.25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["groups"] == ["young", "old"] and report["attribute"] == "age"
    assert all(report["selected"][g] for g in ("young", "old"))
    both = runner.invoke(sae, ["neurons", str(tmp_path / "t"), "builtin:tiny", "--groups", "a,b", "--images", "x",
                               "--labels", "y", "--attribute", "age", "--out", str(out)])
    assert both.exit_code == 2 and "either --images DIR --labels CSV, --cache DIR [--labels CSV], or --groups" in both.output
