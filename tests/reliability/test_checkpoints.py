"""Hostile and broken checkpoints: nothing in a file ever runs, and every bad file is one
CheckpointError line (missing, empty, truncated, code-running pickles, malformed TorchScript
archives); a checkpoint that asks to run code is said to be so (not called corrupt)."""
from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import surgery
from surgery.cli.main import main
from surgery.errors import CheckpointError


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_os_system_pickle_is_refused_as_code_not_as_corruption(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "payload": _System(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=r"refused, loading it would run code from the file \(it calls "
                                              r"posix\.system\)") as info:
        surgery.load(str(path))
    assert "corrupt" not in str(info.value)
    assert not marker.exists()


def test_offline_download_is_one_line_with_its_root_cause(monkeypatch, caplog):
    import logging

    import open_clip

    def offline(*_args, **_kwargs):
        hub = logging.getLogger("huggingface_hub.utils._http")
        for i in range(5):
            hub.warning("Retrying in %ds [Retry %d/5].", 2 ** i, i + 1)
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as exc:
            raise RuntimeError("Failed to download file (open_clip_pytorch_model.bin) for timm/x. Last error: " +
                               "An error happened while trying to locate the file on the Hub and we cannot " * 3) from exc

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["openai"])
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as info:
        surgery.load("ViT-B-32:openai")
    assert "([Errno -2] Name or service not known)" in str(info.value)
    assert "Retrying" not in caplog.text  # huggingface_hub's per-retry lines are not repeated at the user


# ------------------------------------------------------------------ missing, empty, truncated, pickles
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        surgery.load(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="is a directory"):
        surgery.load(str(tmp_path) + "/")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint(tmp_path, tiny, suffix):
    model, _ = tiny
    path = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        surgery.load(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        surgery.load(str(path))


class _Exploit:
    """Unpickling this calls Path.touch(marker): it would create a file if code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_would_run_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(str(marker))}, path,
               _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="run code"):
        surgery.load(str(path))
    assert not marker.exists()
    # control: the same file does run code when loaded unsafely, so the test can fail
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_torchscript_archive_with_foreign_global_is_refused(tmp_path, tiny):
    import zipfile

    marker = tmp_path / "pwned"
    good = tmp_path / "ts.pt"
    torch.jit.script(tiny[0]).save(str(good))
    evil = tmp_path / "evil_ts.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item.endswith("/data.pkl"):
                data = pickle.dumps(_Exploit(str(marker)), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="refuses"):
        surgery.load(str(evil))
    assert not marker.exists()



# --------------------------------------------------------------------- malformed TorchScript archives
def _rewrite_zip(src, dst, drop=(), replace=None):
    """Copy the zip ``src`` to ``dst`` without the members ending in ``drop`` and with
    ``replace(name, data) -> data`` applied to the others."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            if any(item.endswith(d) for d in drop):
                continue
            data = zin.read(item)
            zout.writestr(item, replace(item, data) if replace else data)


@pytest.fixture
def torchscript(tmp_path, tiny):
    path = tmp_path / "ts.pt"
    torch.jit.script(tiny[0]).save(str(path))
    return path


@pytest.mark.parametrize("case", ["no data.pkl", "a storage record missing", "a storage record cut short",
                                  "garbage data.pkl", "no central directory"])
def test_malformed_torchscript_archives_are_one_line(tmp_path, torchscript, case, monkeypatch):
    def no_jit(*args, **kwargs):  # belt and braces: no path may run an untrusted archive's TorchScript
        raise AssertionError("torch.jit.load was called on an untrusted archive")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    bad = tmp_path / "bad.pt"
    if case == "no data.pkl":
        _rewrite_zip(torchscript, bad, drop=("/data.pkl",))
    elif case == "a storage record missing":
        _rewrite_zip(torchscript, bad, drop=("/data/0",))
    elif case == "a storage record cut short":
        _rewrite_zip(torchscript, bad, replace=lambda name, data: data[: len(data) // 3] if name.endswith("/data/0")
                     else data)
    elif case == "garbage data.pkl":
        _rewrite_zip(torchscript, bad, replace=lambda name, data: b"\x80\x02garbage" if name.endswith("/data.pkl")
                     else data)
    else:  # the zip's index (at its end) gone: not readable as an archive at all
        data = torchscript.read_bytes()
        bad.write_bytes(data[: data.rfind(b"PK\x05\x06")])
    with pytest.raises(CheckpointError) as info:
        surgery.load(str(bad))
    assert "\n" not in str(info.value)
    if case == "no data.pkl":
        assert "without a data.pkl" in str(info.value)
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
