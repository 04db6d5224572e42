"""Issue 29: a user's queries, group prompts and plans give one-line errors, never a traceback
(UTF-16 text, deep JSON, a BOM, a folder, huge numbers, a malformed provenance), and the query
count has a cap said up front. Each test failed on the main it was written against."""
from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error, labelled_image_folder, run_cli

from surgery.errors import DataError, PlanError
from surgery.io.queries import MAX_QUERIES, load_group_prompts, load_queries




@pytest.mark.parametrize("loader", [load_queries, load_group_prompts])
@pytest.mark.parametrize("suffix", [".txt", ".json", ".csv"])
def test_utf16_files_are_one_line_errors(tmp_path, loader, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_text('{"red": "a red thing"}' if suffix == ".json" else "group,prompt\nred,a red thing\n",
                    encoding="utf-16")
    with pytest.raises(DataError, match="is not UTF-8 text .*save it as UTF-8"):
        loader(path)


@pytest.mark.parametrize("loader", [load_queries, load_group_prompts])
def test_deeply_nested_json_is_one_line_error(tmp_path, loader):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match="nests JSON deeper than"):
        loader(path)
    path.write_text('["a [", "b {{{"]')  # brackets inside strings are not nesting
    if loader is load_queries:
        assert loader(path) == ["a [", "b {{{"]


def test_a_group_prompts_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "g.csv"
    path.write_bytes("group,prompt\nred,a red thing\nblue,a blue thing\n".encode("utf-8-sig"))
    assert load_group_prompts(path) == {"red": "a red thing", "blue": "a blue thing"}
    queries = tmp_path / "q.txt"
    queries.write_bytes("a nurse\na pilot\n".encode("utf-8-sig"))
    assert load_queries(queries) == ["a nurse", "a pilot"]  # the first query is not "\ufeffa nurse"


def test_a_folder_is_not_called_missing(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_queries(tmp_path)
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_group_prompts(tmp_path)
    from surgery.io.captions import load_captions

    with pytest.raises(DataError, match="is a folder, not a file"):
        load_captions(tmp_path)


def test_debias_eval_and_compare_read_utf16_queries_in_one_line(tmp_path):
    images, labels = labelled_image_folder(tmp_path, 8)
    queries = tmp_path / "q.txt"
    queries.write_text("a nurse\n", encoding="utf-16")
    for args in (["eval", "builtin:tiny"], ["compare", "builtin:tiny", "builtin:tiny"]):
        assert_one_line_error(run_cli(*args, "--images", images, "--labels", labels, "--queries", queries, "--attributes",
                             "colour", "--k", "2", "--out", tmp_path / args[0]), "is not UTF-8 text")
    assert_one_line_error(run_cli("debias", "builtin:world", tmp_path / "o.onnx", "--queries", queries), "is not UTF-8 text")


def test_the_query_count_is_capped_up_front(tmp_path):
    images, labels = labelled_image_folder(tmp_path, 8)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"a photo of thing {i}\n" for i in range(MAX_QUERIES + 1)))
    common = ["--images", images, "--labels", labels, "--attributes", "colour", "--queries", many, "--k", "2"]
    assert_one_line_error(run_cli("balance", "builtin:tiny", *common, "--out", tmp_path / "p.json"),
                    f"holds {MAX_QUERIES + 1} distinct queries; the balance fit takes at most {MAX_QUERIES}")
    assert_one_line_error(run_cli("debias", "builtin:tiny", tmp_path / "o.onnx", *common),
                    f"the balance fit takes at most {MAX_QUERIES}")
    assert not (tmp_path / "p.json").exists()
    repeated = tmp_path / "repeated.txt"  # repeats do not count: they are kept once
    repeated.write_text("a photo of a thing\n" * (MAX_QUERIES + 1))
    assert load_queries(repeated) == ["a photo of a thing"]


@pytest.mark.parametrize("edit, message", [
    ({"heads": [{"tower": "vision", "layer": "9" * 5000, "head": 0}]}, "5000-digit integer"),
    ({"heads": [{"tower": "vision", "layer": "1e400", "head": 0}]}, "layer must be an integer >= 0, got inf"),
    ({"balance": [{"tower": "text", "u": [[0.0]], "v": [[0.0]], "provenance": None}]}, "provenance must be a JSON object"),
    ({"balance": [{"tower": "text", "u": [[0.0]], "v": [[0.0]], "provenance": "fit"}]}, "provenance must be a JSON object"),
    ({"balance": [{"tower": "text", "u": [[0.0]], "v": [[0.0]], "provenance": [1]}]}, "provenance must be a JSON object"),
])
def test_bad_plan_numbers_and_provenance_are_one_line(tmp_path, edit, message):
    from surgery.edit.plan import SurgeryPlan

    text = json.dumps({"schema": "clipsurgery.plan/2", **edit})
    path = tmp_path / "p.json"
    path.write_text(text.replace('"9' + "9" * 4999 + '"', "9" * 5000).replace('"1e400"', "1e400"))
    with pytest.raises(PlanError, match=message):
        SurgeryPlan.load(str(path))
    plan = tmp_path / "p2.json"
    plan.write_text(path.read_text())
    assert_one_line_error(run_cli("bake", "builtin:tiny", plan, tmp_path / "o.safetensors"), message)
