"""The clipsurgery CLI: help, version, inspect; bad input gives one line, exit 1, no traceback."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import surgery
from surgery.cli.main import main
from surgery.io.metadata import META_MODEL_CONFIG


@pytest.fixture
def runner():
    return CliRunner()


def test_help_and_version(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "inspect" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and surgery.__version__ in result.output


def test_inspect_builtin_text(runner):
    result = runner.invoke(main, ["inspect", "builtin:tiny"])
    assert result.exit_code == 0, result.output
    assert "vision        2 layers x 4 heads, head width 16" in result.output
    assert "text          2 layers x 2 heads, head width 16" in result.output
    assert "parameters    1,723,777" in result.output


def test_inspect_file_json_has_sha256(runner, tmp_path, tiny):
    model, cfg = tiny
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={META_MODEL_CONFIG: json.dumps(cfg)})
    result = runner.invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    import hashlib

    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["towers"]["vision"]["heads"] == 4 and info["towers"]["text"]["causal"] is True
    assert info["dtype"] == "float32" and info["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda p: None, "no such file"),  # missing file
        (lambda p: p.write_bytes(b"\x00garbage" * 10), "corrupt or truncated"),  # corrupt bytes
        (lambda p: torch.save({"w": torch.zeros(2)}, p), "not an open_clip CLIP state dict"),  # other model
    ],
)
def test_bad_input_one_line_no_traceback(runner, tmp_path, make, expect):
    path = tmp_path / "in.pt"
    make(path)
    before = sorted(tmp_path.iterdir())
    result = runner.invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1
    assert expect in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_wrong_arch_flag(runner, tmp_path, tiny):
    path = tmp_path / "m.pt"
    torch.save(tiny[0].state_dict(), path)
    result = runner.invoke(main, ["inspect", str(path), "--arch", "ViT-B-32"])
    assert result.exit_code == 1 and "do not fit ViT-B-32" in result.output


# ------------------------------------------------------------------------------------------ audit
def test_audit_text_tower_from_prompts(runner, tmp_path):
    out = tmp_path / "audit"
    result = runner.invoke(main, ["audit", "builtin:world", "--tower", "text", "--top-k", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "audit.json", "heatmap_text_ablation.png", "heatmap_text_cav.png", "heatmap_text_gradient.png",
        "heatmap_text_group_acc.png", "plan.json", "report.md"]
    record = json.loads((out / "audit.json").read_text())
    assert record["towers"] == ["text"] and record["sha256"] and "heads" not in record
    text = record["text"]
    assert text["measure"] == "cav_projection" and text["probe"]["groups"] == ["red", "blue"]
    assert len(text["heads"]) == 8
    assert {"cav", "group_acc", "gradient", "ablation", "cheap_rank", "query_shift"} <= set(text["heads"][0])
    assert -1 <= text["spearman_gradient_vs_ablation"] <= 1
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"]["sha256"] == record["sha256"]
    assert [h["tower"] for h in plan["heads"]] == ["text", "text"] and len(plan["heads"][0]["mean"]) == 16
    assert "## Text tower" in (out / "report.md").read_text()
    # the plan bakes: text heads are ordinary head edits
    baked = runner.invoke(main, ["bake", "builtin:world", str(out / "plan.json"), str(tmp_path / "p.safetensors")])
    assert baked.exit_code == 0, baked.output


def test_audit_text_tower_people_prompts(runner, tmp_path):
    out = tmp_path / "audit"
    result = runner.invoke(main, ["audit", "builtin:tiny", "--tower", "text", "--attributes", "race",
                                  "--no-sweep", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = json.loads((out / "audit.json").read_text())["text"]
    assert len(text["probe"]["groups"]) == 7 and text["probe"]["n_queries"] == 62
    assert "ablation" not in text["heads"][0] and "gradient" in text["heads"][0]


def test_audit_labels_add_supervised_cavs(runner, tmp_path):
    from surgery.world.generator import generate, write_split
    from surgery.world.params import WorldParams

    write_split(generate(WorldParams(), "eval", 48), tmp_path / "w")
    out = tmp_path / "audit"
    result = runner.invoke(main, ["audit", "builtin:world", "--tower", "text", "--images", str(tmp_path / "w" / "images"),
                                  "--labels", str(tmp_path / "w" / "labels.csv"), "--k", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "audit.json").read_text())
    text = record["text"]
    assert text["measure"] == "max_skew" and text["probe"]["n_images"] == 48
    assert {"cav_supervised", "group_acc_supervised"} <= set(text["heads"][0])
    assert text["supervised"]["groups"] == ["blue", "red"] and record["probe"]["n_images"] == 48
    assert (out / "heatmap_text_cav_supervised.png").is_file()


def test_audit_vision_with_labels_reports_supervised(runner, tmp_path, monkeypatch):
    from surgery.world.generator import generate, write_split
    from surgery.world.params import WorldParams

    write_split(generate(WorldParams(), "eval", 48), tmp_path / "w")
    out = tmp_path / "audit"
    result = runner.invoke(main, ["audit", "builtin:world", "--images", str(tmp_path / "w" / "images"), "--labels",
                                  str(tmp_path / "w" / "labels.csv"), "--k", "10", "--no-sweep", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "audit.json").read_text())
    assert record["towers"] == ["vision"] and "text" not in record
    assert {"cav", "cav_supervised", "group_acc_supervised"} <= set(record["heads"][0])
    assert (out / "heatmap_vision_group_acc_supervised.png").is_file()
    assert "(a') cav sup." in (out / "report.md").read_text()


def _resnet_checkpoint(tmp_path):
    from surgery.model.arch import build_model
    from surgery.model.tiny import tiny_config

    path = tmp_path / "rn.pt"
    torch.save(build_model(tiny_config(vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 64,
                                                   "head_width": 8})).state_dict(), path)
    return str(path)


def _one_group_labels(tmp_path):
    from surgery.world.generator import generate, write_split
    from surgery.world.params import WorldParams

    write_split(generate(WorldParams(), "eval", 12), tmp_path / "w")
    labels = tmp_path / "w" / "labels.csv"
    lines = labels.read_text().splitlines()
    column = lines[0].split(",").index("group")
    rows = [",".join("red" if i == column else v for i, v in enumerate(line.split(","))) for line in lines[1:]]
    labels.write_text("\n".join([lines[0], *rows]) + "\n")
    return ["--images", str(tmp_path / "w" / "images"), "--labels", str(labels)]


@pytest.mark.parametrize("args, expect", [
    (lambda p: ["builtin:tiny", "--tower", "vision"], "vision audit needs probe images"),
    (lambda p: ["builtin:tiny", "--tower", "both"], "vision audit needs probe images"),
    (lambda p: ["builtin:tiny", "--tower", "text", "--attributes", "skin"], "no prompts for attribute 'skin'"),
    (lambda p: [_resnet_checkpoint(p), "--tower", "text"], "ModifiedResNet"),
    (lambda p: ["builtin:world", "--tower", "text", *_one_group_labels(p)], "single group"),
])
def test_audit_bad_input_one_line(runner, tmp_path, args, expect):
    out = tmp_path / "out"
    result = runner.invoke(main, ["audit", *args(tmp_path), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert expect in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
