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
