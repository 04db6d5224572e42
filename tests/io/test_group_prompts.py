"""--group-prompts: how a labelled folder's group values are named (the people template names no
colour or texture), read from CSV or JSON with one-line errors, used by the probe, the report's
group accuracy and the balance edit's anchors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import labelled_image_folder

from surgery.cli.main import main
from surgery.errors import DataError
from surgery.io.queries import load_group_prompts, prompts_for_groups


def test_group_prompts_read_from_csv_and_json(tmp_path):
    csv_path = tmp_path / "g.csv"
    csv_path.write_text('group,prompt\nred,a photo of something red\nblue,"a photo of something blue, bright"\n')
    assert load_group_prompts(csv_path) == {"red": "a photo of something red",
                                            "blue": "a photo of something blue, bright"}
    json_path = tmp_path / "g.json"
    json_path.write_text(json.dumps({"red": "a red thing", "blue": "a blue thing"}))
    assert load_group_prompts(json_path) == {"red": "a red thing", "blue": "a blue thing"}
    assert prompts_for_groups(["blue", "red"], load_group_prompts(json_path)) == ["a blue thing", "a red thing"]
    assert prompts_for_groups(["female"], None) == ["a photo of a female person"]


@pytest.mark.parametrize("name, text, message", [
    ("none.csv", None, "does not exist"),
    ("nohead.csv", "red,a red thing\n", "header 'group,prompt'"),
    ("three.csv", "group,prompt\nred,a,b\n", "line 2"),
    ("empty.csv", "group,prompt\nred,\n", "non-empty prompt"),
    ("twice.csv", "group,prompt\nred,x\nred,y\n", "named twice"),
    ("rows.csv", "group,prompt\n", "names no group"),
    ("list.json", "[1, 2]", "JSON object"),
    ("broken.json", "{", "not valid JSON"),
])
def test_bad_group_prompts_are_one_line_errors(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        load_group_prompts(path)
    assert "\n" not in str(err.value)


def test_a_group_without_a_prompt_is_named_in_the_error():
    with pytest.raises(DataError, match="no prompt for group 'blue'"):
        prompts_for_groups(["red", "blue"], {"red": "a red thing"})


def test_probe_and_report_use_the_given_prompts(tmp_path):
    from surgery.audit.probe import folder_probe_set
    from surgery.eval.evaluate import spec_from_folder
    from surgery.metrics import BiasConventions
    from surgery.model.loading import load

    images, labels = labelled_image_folder(tmp_path, n=12)
    prompts = {"red": "a photo of something red", "blue": "a photo of something blue"}
    loaded = load("builtin:tiny")
    probe = folder_probe_set(images, labels, "colour", loaded.preprocess, group_prompts=prompts)
    assert probe.group_prompts == [prompts[v] for v in probe.group_names]
    default = folder_probe_set(images, labels, "colour", loaded.preprocess)
    assert default.group_prompts == [f"a photo of a {v} person" for v in default.group_names]
    small = BiasConventions(k=4)
    spec = spec_from_folder(images, labels, attributes=["colour"], group_prompts=prompts, conventions=small)
    assert spec.group_prompts == {"colour": {"blue": prompts["blue"], "red": prompts["red"]}}
    with pytest.raises(DataError, match="names none of the groups"):
        spec_from_folder(images, labels, attributes=["colour"], group_prompts={"male": "a man"}, conventions=small)


def test_balance_cli_anchors_the_given_group_prompts(tmp_path):
    images, labels = labelled_image_folder(tmp_path, n=24)
    prompts = tmp_path / "groups.csv"
    prompts.write_text("group,prompt\nred,a photo of something red\nblue,a photo of something blue\n")
    queries = tmp_path / "q.txt"
    queries.write_text("a photo of a circle\na photo of a square\n")
    plan = tmp_path / "plan.json"
    runner = CliRunner()
    args = ["balance", "builtin:tiny", "--images", images, "--labels", labels, "--attributes", "colour",
            "--queries", str(queries), "--k", "4", "--out", str(plan), "--max-recall-drop", "100",
            "--max-accuracy-drop", "100", "--max-group-accuracy-drop", "100"]
    result = runner.invoke(main, [*args, "--group-prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    provenance = json.loads(plan.read_text())["balance"][0]["provenance"]
    assert sorted(provenance["group_prompts"]) == ["a photo of something blue", "a photo of something red"]
    result = runner.invoke(main, ["balance", "builtin:world", "--group-prompts", str(prompts), "--out",
                                  str(tmp_path / "w.json")])
    assert result.exit_code == 2 and "--group-prompts names the groups" in result.output
