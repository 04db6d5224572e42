"""Bad input gets one line, and --force never deletes what the tool did not write."""
from __future__ import annotations

import os

from click.testing import CliRunner

from surgery.cli.main import main


def test_world_generate_force_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = CliRunner().invoke(main, ["world", "generate", "--out", str(out), "--n", "24", "--force"])
    assert result.exit_code == 1 and "did not write" in result.output and "Traceback" not in result.output
    assert (out / "thesis.tex").read_text() == "years of work"


def test_world_generate_force_replaces_its_own_split(tmp_path):
    out = tmp_path / "w"
    runner = CliRunner()
    assert runner.invoke(main, ["world", "generate", "--out", str(out), "--n", "24"]).exit_code == 0
    again = runner.invoke(main, ["world", "generate", "--out", str(out), "--n", "36", "--force"])
    assert again.exit_code == 0, again.output
    assert len(list((out / "images").iterdir())) == 36


def test_an_empty_group_cell_is_refused_not_a_group(tmp_path):
    runner = CliRunner()
    split = tmp_path / "w"
    assert runner.invoke(main, ["world", "generate", "--out", str(split), "--n", "120"]).exit_code == 0
    labels = (split / "labels.csv").read_text().splitlines()
    file, concept, _group = labels[5].split(",")
    labels[5] = f"{file},{concept},"  # the group cell left empty
    (split / "labels.csv").write_text("\n".join(labels) + "\n")
    result = runner.invoke(main, ["eval", "builtin:world", "--images", str(split / "images"), "--labels",
                                  str(split / "labels.csv"), "--k", "10", "--out", str(tmp_path / "report")])
    assert result.exit_code == 1, result.output
    assert "column 'group' is empty on 1 of 120 rows" in result.output and "Traceback" not in result.output


def test_debias_vision_only_export_compares_with_the_patched_text_tower(tmp_path):
    out = tmp_path / "v.onnx"
    result = CliRunner().invoke(main, ["debias", "builtin:world", str(out), "--tower", "vision", "--n-probe", "240",
                                       "--k", "20", "--selection-draws", "1", "--heads-only", "--allow-miss"])
    assert result.exit_code == 0, result.output  # was: all the work, then exit 1 "the text encoder is missing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.onnx", "v.plan.json", "v.report"]
    assert "| group: mean MaxSkew@20 |" in result.output


def _one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert len(result.output.strip().splitlines()) == 1


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    runner = CliRunner()
    (tmp_path / "afile").write_text("x")
    _one_line_error(runner.invoke(main, ["export", "builtin:tiny", "/proc/x.safetensors"]), "cannot write in /proc")
    _one_line_error(runner.invoke(main, ["export", "builtin:tiny", str(tmp_path / "afile" / "x.safetensors")]),
                    "is a file, not a folder")
    (tmp_path / "d.safetensors").mkdir()
    _one_line_error(runner.invoke(main, ["export", "builtin:tiny", str(tmp_path / "d.safetensors"), "--force"]),
                    "is a folder; give a file path")
    _one_line_error(runner.invoke(main, ["debias", "builtin:world", "/proc/out.onnx"]), "cannot write in /proc")


def test_bad_architecture_configs_are_one_line(tmp_path):
    import json

    from surgery.model.tiny import tiny_config

    runner = CliRunner()
    assert runner.invoke(main, ["export", "builtin:tiny", str(tmp_path / "t.safetensors")]).exit_code == 0
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([1, 2]))
    _one_line_error(runner.invoke(main, ["inspect", str(tmp_path / "t.safetensors"), "--arch", str(listed)]),
                    "an architecture config is a JSON object")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_config(vision_cfg={"head_width": 24})))
    _one_line_error(runner.invoke(main, ["inspect", str(tmp_path / "t.safetensors"), "--arch", str(bad)]),
                    "vision width 64 is not a multiple of head_width 24")


def test_reports_do_not_overwrite_a_folder_without_force_and_a_split_folder_is_accepted(tmp_path):
    runner = CliRunner()
    split = tmp_path / "w"
    assert runner.invoke(main, ["world", "generate", "--out", str(split), "--n", "120"]).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    args = ["--images", str(split), "--labels", str(split / "labels.csv"), "--k", "10"]  # the split folder itself
    _one_line_error(runner.invoke(main, ["eval", "builtin:world", *args, "--out", str(mine)]), "already holds files")
    _one_line_error(runner.invoke(main, ["audit", "builtin:world", "--no-sweep", "--n-probe", "120", "--k", "10",
                                         "--out", str(mine)]), "already holds files")
    ok = runner.invoke(main, ["eval", "builtin:world", *args, "--out", str(mine), "--force"])
    assert ok.exit_code == 0, ok.output
    assert (mine / "notes.txt").read_text() == "x" and (mine / "report.json").is_file()


def test_plan_sae_paths_are_relative_to_the_plan_file(tmp_path, monkeypatch):
    from surgery.edit.plan import NeuronEdit, SurgeryPlan

    (tmp_path / "run" / "out.sae").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    plan = SurgeryPlan(neurons=[NeuronEdit("vision", "run/out.sae", [1, 2], site="embedding")])
    plan.save("run/out.plan.json")  # written from tmp_path: the SAE is beside the plan
    import json

    assert json.loads((tmp_path / "run" / "out.plan.json").read_text())["neurons"][0]["sae"] == "out.sae"
    monkeypatch.chdir(tmp_path / "run")
    assert SurgeryPlan.load("out.plan.json").neurons[0].sae == "out.sae"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = SurgeryPlan.load("../run/out.plan.json")
    assert os.path.samefile(loaded.neurons[0].sae, tmp_path / "run" / "out.sae")


def test_ignored_arch_and_forced_plan_say_so(caplog, tmp_path):
    import logging

    import surgery
    from surgery.edit.plan import SurgeryPlan

    with caplog.at_level(logging.WARNING):
        loaded = surgery.load("builtin:tiny", arch="ViT-B-32")
    assert "--arch ViT-B-32 is ignored" in caplog.text
    plan = SurgeryPlan(source={"sha256": "a" * 64})
    with caplog.at_level(logging.WARNING):
        plan.check_fits(loaded.model, "b" * 64, force=True)
    assert "applying it anyway (--force)" in caplog.text


def test_compare_with_an_empty_truncated_or_foreign_onnx_is_one_line(tmp_path):
    """A 0-byte, a truncated and a foreign (not clipsurgery's) .visual.onnx beside a good .text.onnx
    are one line each, no traceback (they raised KeyError / protobuf DecodeError before)."""
    runner = CliRunner()
    split = tmp_path / "w"
    assert runner.invoke(main, ["world", "generate", "--out", str(split), "--n", "48"]).exit_code == 0
    export = tmp_path / "good.onnx"
    result = runner.invoke(main, ["export", "builtin:world", str(export)])
    assert result.exit_code == 0, result.output
    good = (tmp_path / "good.visual.onnx").read_bytes()
    for name, data in (("empty", b""), ("truncated", good[: len(good) // 2]), ("foreign", b"\x08\x07junk" * 50)):
        (tmp_path / f"{name}.visual.onnx").write_bytes(data)
        (tmp_path / f"{name}.text.onnx").write_bytes((tmp_path / "good.text.onnx").read_bytes())
        result = runner.invoke(main, ["compare", "builtin:world", str(tmp_path / f"{name}.onnx"), "--images",
                                      str(split), "--labels", str(split / "labels.csv"), "--k", "10",
                                      "--out", str(tmp_path / f"r-{name}")])
        _one_line_error(result, "was not exported by clipsurgery" if name == "empty" else "not a readable ONNX file")


def test_three_group_worlds_default_to_a_valid_size_and_a_bad_size_is_refused_up_front(tmp_path):
    runner = CliRunner()
    out = tmp_path / "w3"
    result = runner.invoke(main, ["world", "generate", "--out", str(out), "--groups", "red,green,blue"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").iterdir())) == 1206  # 6 shapes x 3 colours: the multiple nearest 1200
    bad = runner.invoke(main, ["world", "generate", "--out", str(tmp_path / "bad"), "--groups", "red,green,blue",
                               "--n", "1200"])
    _one_line_error(bad, "1200")
    assert "1188" in bad.output and "1206" in bad.output  # the two nearest valid sizes
    assert not (tmp_path / "bad").exists()


def test_debias_report_names_how_to_regenerate_its_images_not_a_temp_path(tmp_path):
    import json

    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["debias", "builtin:world", str(out), "--tower", "vision", "--n-probe", "240",
                                       "--k", "20", "--selection-draws", "1", "--heads-only", "--max-heads", "1",
                                       "--allow-miss"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.report" / "report.json").read_text())
    where = report["spec"]["images_dir"]
    assert "clipsurgery world generate --like MODEL --n 240" in where and "/tmp" not in where
