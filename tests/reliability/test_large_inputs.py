"""Oversized inputs cost nothing: a huge declared image is skipped from its header; a tiny
TorchScript archive cannot make the reader allocate what its storage files do not hold."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from surgery.errors import DataError
from surgery.io.images import ImageFolderDataset


def _png_header_only(path, width, height):
    """A PNG whose header declares width x height (RGB, 8 bit) and holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_from_its_header(tmp_path):
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    _png_header_only(tmp_path / "zz_bomb.png", 12000, 12000)  # ~432 MB of RGB if decoded
    dataset = ImageFolderDataset(tmp_path, max_skipped_fraction=0.1)
    assert len(dataset) == 20
    assert [s.file for s in dataset.skipped] == ["zz_bomb.png"]
    assert "12000 x 12000 pixels is over the 40,000,000-pixel cap" in dataset.skipped[0].reason
    with pytest.raises(DataError, match="8 x 8 pixels is over the 32-pixel cap"):  # the cap is configurable
        ImageFolderDataset(tmp_path, max_pixels=32)


class _Storage:  # pickled as a persistent id: ("storage", torch.FloatStorage, key, device, numel)
    pass


class _ForgedTensor:
    def __init__(self, size, stride):
        self.size, self.stride = size, stride

    def __reduce__(self):
        import collections

        import torch._utils

        return (torch._utils._rebuild_tensor_v2, (_Storage(), 0, self.size, self.stride, False,
                                                  collections.OrderedDict()))


def _forged_archive(path, size, stride):
    import collections
    import io
    import pickle
    import zipfile

    import torch

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 1) if isinstance(obj, _Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(collections.OrderedDict(weight=_ForgedTensor(size, stride)))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data.pkl", buf.getvalue())
        zf.writestr("m/code/__torch__.py", "")
        zf.writestr("m/data/0", b"\x00\x00\x80\x3f")  # one float32: 1.0
        zf.writestr("m/version", "3")


def test_a_tiny_torchscript_archive_cannot_declare_gigabytes(tmp_path):
    import pytest

    from surgery.errors import CheckpointError
    from surgery.io.torchscript import read_torchscript_state_dict

    path = tmp_path / "forged.pt"
    _forged_archive(path, (16384, 16384), (0, 0))  # 1 GiB of float32 from a 4-byte storage
    assert path.stat().st_size < 1000
    with pytest.raises(CheckpointError, match=r"does not fit its storage 0 of 1 elements"):
        read_torchscript_state_dict(str(path))
    _forged_archive(path, (1,), (1,))  # the same archive, honest sizes: read
    assert read_torchscript_state_dict(str(path))["weight"].tolist() == [1.0]
