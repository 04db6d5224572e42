"""A checkpoint that asks to run code is refused and said to be so (not called corrupt)."""
from __future__ import annotations

import os

import pytest
import torch

import surgery
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
