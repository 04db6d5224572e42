"""`clipsurgery serve` starts or fails in one line (issues 23 and 24): a pair whose metadata was
tampered with, a graph ONNX Runtime rejects, metadata that is not JSON, two files of different
models, or a folder instead of a file is refused before anything listens: exit 1, one line, no
traceback, and never a server answering "warming up" forever or downloading a tokenizer."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

import surgery
import surgery.serve.server as server_module
from surgery.cli.main import main
from surgery.export.onnx import export_onnx


@pytest.fixture(scope="module")
def world_pair(tmp_path_factory) -> str:
    """OUT.onnx of builtin:world (another model: 64-d embeddings, context 12)."""
    out = str(tmp_path_factory.mktemp("world") / "world.onnx")
    export_onnx(surgery.load("builtin:world"), out)
    return out


@pytest.fixture
def no_listen(monkeypatch):
    """Reaching uvicorn means the pair was accepted: fail the test there instead of serving forever."""
    def refuse(app, options):
        raise AssertionError("the server started: the pair was not refused at start-up")

    monkeypatch.setattr(server_module, "run_app", refuse)


def _copy_pair(pair: str, folder) -> str:
    stem = pair[:-len(".onnx")]
    for tower in ("visual", "text"):
        shutil.copyfile(f"{stem}.{tower}.onnx", folder / f"m.{tower}.onnx")
    return str(folder / "m.onnx")


def _set_metadata(path: str, key: str, value: str) -> None:
    model = onnx.load(path)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, path)


def _refused(args: list[str], *needles: str) -> str:
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


def test_tampered_preprocess_size_is_refused_at_start_up(tiny_pair, tmp_path, no_listen):
    pair = _copy_pair(tiny_pair, tmp_path)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.visual.onnx")).metadata_props}
    for tower in ("visual", "text"):  # both files: the pair check must not be what refuses it
        _set_metadata(str(tmp_path / f"m.{tower}.onnx"), "clipsurgery.preprocess",
                      json.dumps({**json.loads(meta["clipsurgery.preprocess"]), "size": 64}))
    _refused([pair], "preprocess size 64", "export the pair again")


def test_a_tokenizer_the_tool_does_not_ship_is_refused_not_downloaded(tiny_pair, tmp_path, no_listen):
    pair = _copy_pair(tiny_pair, tmp_path)
    for tower in ("visual", "text"):  # both files: the pair check must not be what refuses it
        _set_metadata(str(tmp_path / f"m.{tower}.onnx"), "clipsurgery.tokenizer",
                      json.dumps({"name": "hf-hub:someone/evil-tokenizer", "context_length": 16}))
    _refused([pair], "hf-hub:someone/evil-tokenizer", "never downloads")


def test_a_context_length_that_does_not_match_the_graph_is_refused(tiny_pair, tmp_path, no_listen):
    pair = _copy_pair(tiny_pair, tmp_path)
    for tower in ("visual", "text"):
        _set_metadata(str(tmp_path / f"m.{tower}.onnx"), "clipsurgery.tokenizer",
                      json.dumps({"name": "openai-clip-bpe", "context_length": 77}))
    _refused([pair], "context length 77")


def test_metadata_that_is_not_json_is_refused(tiny_pair, tmp_path, no_listen):
    pair = _copy_pair(tiny_pair, tmp_path)
    for tower in ("visual", "text"):
        _set_metadata(str(tmp_path / f"m.{tower}.onnx"), "clipsurgery.preprocess", "{size: 32,")
    _refused([pair], "clipsurgery.preprocess is not JSON")


def test_a_graph_onnx_runtime_rejects_is_refused(tiny_pair, tmp_path, no_listen):
    pair = _copy_pair(tiny_pair, tmp_path)
    model = onnx.load(str(tmp_path / "m.text.onnx"))
    model.graph.node[0].op_type = "NoSuchOperator"  # parses as ONNX; ONNX Runtime has no kernel for it
    onnx.save(model, str(tmp_path / "m.text.onnx"))
    _refused([pair], "m.text.onnx", "ONNX Runtime cannot load this graph")


def test_a_pair_of_two_models_is_refused(tiny_pair, world_pair, tmp_path, no_listen):
    # issue 23: the visual file of one model beside the text file of another served 64-d and 32-d vectors
    shutil.copyfile(tiny_pair[:-5] + ".visual.onnx", tmp_path / "mixed.visual.onnx")
    shutil.copyfile(world_pair[:-5] + ".text.onnx", tmp_path / "mixed.text.onnx")
    _refused([str(tmp_path / "mixed.onnx")], "not one model's pair")
    # the same config, another source checkpoint (only the source hash differs)
    pair = _copy_pair(tiny_pair, tmp_path)
    _set_metadata(str(tmp_path / "m.text.onnx"), "clipsurgery.source_sha256", "ab" * 32)
    _refused([pair], "not one model's pair", "source sha256")


def test_serving_a_folder_says_it_is_a_folder(tmp_path, no_listen):
    _refused([str(tmp_path)], "is a folder")
    _refused([str(tmp_path), "--triton-repo", str(tmp_path / "repo")], "is a folder")
