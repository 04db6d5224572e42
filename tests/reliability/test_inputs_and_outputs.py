"""Bad input gets one line, and --force never deletes what the tool did not write."""
from __future__ import annotations

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
