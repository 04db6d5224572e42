"""Issue 29, wrong output with exit 0: an export that carries none of the edit, duplicate queries
in both folds, group prompts silently ignored, `balance` exiting 0 with its target missed, exports
that lose the world the README's int8 command needs. Each test failed on the main it was written
against."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import labelled_image_folder

from surgery.cli.main import main
from surgery.edit.plan import BalanceEdit, HeadEdit, SurgeryPlan
from surgery.errors import SurgeryError


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, message, code=1):
    assert result.exit_code == code, result.output
    assert message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_debias_refuses_an_export_that_carries_none_of_the_edit(tmp_path):
    """--tower vision with the text-side balance edit wrote an unchanged image tower and reported a cut."""
    _one_line_error(_run("debias", "builtin:world", tmp_path / "o.onnx", "--tower", "vision", "--balance-only"),
                    "change the text tower, which --tower vision does not export")
    assert list(tmp_path.iterdir()) == []


def test_a_chosen_plan_whose_edits_a_tower_leaves_out_is_refused():
    from surgery.debias.outputs import check_exported_towers, edited_towers

    both = SurgeryPlan(heads=[HeadEdit("vision", 0, 0, 0.0)], balance=[BalanceEdit("text", [[0.0]], [[0.0]])])
    assert edited_towers(both) == {"vision", "text"}
    with pytest.raises(SurgeryError, match="change the text tower.*pass --tower both; nothing was written"):
        check_exported_towers("o.onnx", "vision", edited_towers(both), every=True)
    check_exported_towers("o.onnx", "both", edited_towers(both), every=True)
    check_exported_towers("o.safetensors", "vision", edited_towers(both), every=True)  # the whole model
    check_exported_towers("o.onnx", "vision", {"vision", "text"})  # up front: the vision part may be chosen


def test_duplicate_queries_are_kept_once_in_their_first_order(tmp_path):
    from surgery.debias.probes import checked_queries
    from surgery.io.queries import load_queries

    text = tmp_path / "q.txt"
    text.write_text("a nurse\na pilot\na nurse\na chef\na pilot\n")
    assert load_queries(text) == ["a nurse", "a pilot", "a chef"]
    listed = tmp_path / "q.json"
    listed.write_text(json.dumps(["b", "a", "b"]))
    assert load_queries(listed) == ["b", "a"]
    assert checked_queries(["x", "y", "x"]) == ["x", "y"]  # API callers too, before the folds are drawn


def test_json_group_prompts_naming_a_group_twice_are_refused(tmp_path):
    from surgery.errors import DataError
    from surgery.io.queries import load_group_prompts

    path = tmp_path / "g.json"
    path.write_text('{"red": "a red thing", "blue": "a blue thing", "red": "a crimson thing"}')
    with pytest.raises(DataError, match="names key 'red' twice"):
        load_group_prompts(path)


def test_group_prompts_on_a_world_split_are_refused_not_ignored(tmp_path):
    split = tmp_path / "w"
    assert _run("world", "generate", "--out", split, "--n", "48").exit_code == 0
    prompts = tmp_path / "g.json"
    prompts.write_text(json.dumps({"red": "a red thing", "blue": "a blue thing"}))
    common = ["--images", split, "--labels", split / "labels.csv", "--group-prompts", prompts]
    _one_line_error(_run("balance", "builtin:world", *common, "--k", "4", "--out", tmp_path / "p.json"),
                    "the group prompts given would be ignored")
    _one_line_error(_run("eval", "builtin:world", *common, "--k", "4", "--out", tmp_path / "r"),
                    "the group prompts given would be ignored")
    assert not (tmp_path / "p.json").exists()


def test_balance_exits_3_and_names_the_missed_target(tmp_path):
    images, labels = labelled_image_folder(tmp_path, n=24)
    queries = tmp_path / "q.txt"
    queries.write_text("a photo of a circle\na photo of a square\n")
    plan = tmp_path / "plan.json"
    args = ["balance", "builtin:tiny", "--images", images, "--labels", labels, "--attributes", "colour",
            "--queries", queries, "--k", "4", "--max-recall-drop", "100", "--max-accuracy-drop", "100",
            "--max-group-accuracy-drop", "100", "--max-bias-ratio", "0.01"]
    result = _run(*args, "--out", plan)
    assert result.exit_code == 3, result.output
    assert "targets NOT met: MaxSkew@4 ratio" in result.output and "(target <= 0.05)" in result.output
    assert "exit 3: missed on the probe" in result.output and plan.is_file()  # the plan is still written
    assert _run(*args, "--out", tmp_path / "p2.json", "--allow-miss").exit_code == 0


def test_budget_misses_name_each_budget_and_figure():
    from surgery.debias.budget import Budget

    budget = Budget(max_bias_ratio=0.5, max_accuracy_drop=0.02, max_recall_drop=0.01)
    before = {"max_skew": 1.0, "accuracy": 0.9, "recall": 0.8, "recall_i2t": 0.8, "group_accuracy": 0.9}
    after = {"max_skew": 0.7, "accuracy": 0.85, "recall": 0.8, "recall_i2t": 0.75, "group_accuracy": 0.9}
    assert budget.misses(before, after, 20) == ["MaxSkew@20 ratio 0.70 (target <= 0.5)",
                                                "concept accuracy drop 5.0 points (budget 2)",
                                                "image->text Recall@5 drop 5.0 points (budget 1)"]
    assert budget.misses(before, {**before, "max_skew": 0.4}) == []


def test_exports_keep_the_world_a_world_model_was_trained_on(tmp_path):
    import surgery
    from surgery.io.metadata import META_WORLD
    from surgery.io.onnx import onnx_paths, read_metadata
    from surgery.world.checkpoint import world_params_of

    world = world_params_of(surgery.load("builtin:world"))
    out = tmp_path / "copy.safetensors"  # no world_params.json beside it: only the metadata can say
    assert _run("export", "builtin:world", out).exit_code == 0
    assert world_params_of(surgery.load(str(out))) == world
    result = _run("export", out, tmp_path / "w.onnx", "--tower", "text")
    assert result.exit_code == 0, result.output
    text = onnx_paths(str(tmp_path / "w.onnx"), "text")["text"]
    assert json.loads(read_metadata(text)[META_WORLD]) == world.to_dict()
