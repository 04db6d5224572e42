"""clipsurgery serve --triton-repo: a Triton Inference Server repository with dynamic batching."""
from __future__ import annotations

import json
import pathlib

import onnx
from click.testing import CliRunner

from surgery.cli.main import main


def test_triton_repository(tiny_pair, tmp_path):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", str(repo), "--max-batch", "16",
                                       "--max-wait-ms", "2"])
    assert result.exit_code == 0, result.output
    config = (repo / "clip_visual" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and 'name: "pixel_values"' in config and "dims: [3, 32, 32]" in config
    assert "max_batch_size: 16" in config and "preferred_batch_size: [4, 8, 16]" in config
    assert "max_queue_delay_microseconds: 2000" in config
    text_config = (repo / "clip_text" / "config.pbtxt").read_text()
    assert "TYPE_INT64" in text_config and "dims: [16]" in text_config
    metadata = json.loads(json.loads(text_config.split("string_value: ", 1)[1].rsplit(" }", 2)[0]))
    assert metadata["clipsurgery.tower"] == "text"
    written = [line.split(" ", 1)[1] for line in result.output.splitlines()]
    assert len(written) == 4 and all(pathlib.Path(p).exists() for p in written)
    onnx.checker.check_model(str(repo / "clip_visual" / "1" / "model.onnx"))


def test_an_existing_repository_is_kept_without_force(tiny_pair, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mine.txt").write_text("keep")
    result = CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", str(repo)])
    assert result.exit_code == 1 and "--force" in result.output and "Traceback" not in result.output
    assert (repo / "mine.txt").read_text() == "keep"
    assert CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", str(repo), "--force"]).exit_code == 0
    assert not (repo / "mine.txt").exists() and (repo / "clip_text" / "config.pbtxt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "old" in p.name] == []


def test_serving_a_missing_file_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "no such ONNX file" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
