"""clipsurgery serve --triton-repo: a Triton Inference Server repository with dynamic batching."""
from __future__ import annotations

import json
import pathlib
import shutil

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


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, (result.output, result.exception)
    assert needle in result.output and len(result.output.strip().splitlines()) == 1, result.output


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_existing_repository_is_kept_without_force(tiny_pair, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mine.txt").write_text("keep")
    result = CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", str(repo)])
    assert result.exit_code == 1 and "--force" in result.output and "Traceback" not in result.output
    assert (repo / "mine.txt").read_text() == "keep"


def test_force_replaces_only_what_clipsurgery_wrote(tiny_pair, tmp_path):
    # issue 23: --force replaced the folder wholesale, deleting the user's files in it
    repo = tmp_path / "repo"
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "mine.txt").write_text("keep")
    (repo / "other_model" / "1" / "model.onnx").write_bytes(b"a user's model")
    user = _tree(repo)
    for _ in range(2):  # the first run adds the tool's folders, the second replaces them (and only them)
        result = CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", str(repo), "--force"])
        assert result.exit_code == 0, result.output
        assert {k: v for k, v in _tree(repo).items() if k in user} == user
        assert (repo / "clip_text" / "config.pbtxt").is_file() and (repo / "clip_visual" / "1" / "model.onnx").is_file()
    assert [p.name for p in list(tmp_path.iterdir()) + list(repo.iterdir()) if p.name.startswith(".")] == []
    # a file a user put into one of the tool's folders: --force would remove it, so it is refused
    (repo / "clip_text" / "notes.txt").write_text("mine")
    before = _tree(repo)
    _one_line_error(CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", str(repo), "--force"]),
                    "clip_text holds files clipsurgery did not write (notes.txt)")
    assert _tree(repo) == before
    # a model folder of that name the tool did not write
    (repo / "clip_text" / "notes.txt").unlink()
    (repo / "clip_text" / ".clipsurgery-triton.json").unlink()
    before = _tree(repo)
    _one_line_error(CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", str(repo), "--force"]),
                    "was not written by clipsurgery")
    assert _tree(repo) == before


def test_force_in_the_folder_holding_the_model_keeps_the_input(tiny_pair, tmp_path):
    # issue 23: `--triton-repo .` beside the model deleted the input .onnx files too
    stem = tiny_pair[:-len(".onnx")]
    for tower in ("visual", "text"):
        shutil.copyfile(f"{stem}.{tower}.onnx", tmp_path / f"m.{tower}.onnx")
    (tmp_path / "labels.csv").write_text("file,group\n")
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "m.onnx"), "--triton-repo", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output
    assert {k: v for k, v in _tree(tmp_path).items() if k in before} == before
    # serving a file that lies inside the folder --force would replace: refused, nothing removed
    inner = tmp_path / "clip_visual" / "1" / "model.onnx"
    before = _tree(tmp_path)
    _one_line_error(CliRunner().invoke(main, ["serve", str(inner), "--triton-repo", str(tmp_path), "--force"]),
                    "(an input) lies in")
    assert _tree(tmp_path) == before


def test_a_repository_where_nothing_can_be_written_is_one_line(tiny_pair):
    _one_line_error(CliRunner().invoke(main, ["serve", tiny_pair, "--triton-repo", "/proc/clipsurgery-repo"]),
                    "cannot write in /proc")


def test_serving_a_missing_file_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "no such ONNX file" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
