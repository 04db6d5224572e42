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


def _thin_png(path, width, height):
    """A real, fully decodable greyscale PNG of width x height (a few KB whatever its shape)."""
    Image.new("L", (width, height), 100).save(path)


def test_an_aspect_ratio_bomb_is_refused_from_its_header_in_the_shared_decode_path(tmp_path):
    # issue 24: 1 x 1,000,000 pixels passes any pixel cap (2,991 bytes), but resizing its short side to the
    # model's size makes it 224 x 224,000,000 (6.5 GB) before the crop; refused before a pixel is decoded
    from surgery.io.images import ImageTooLarge, open_image

    _thin_png(tmp_path / "bomb.png", 1, 1_000_000)
    assert (tmp_path / "bomb.png").stat().st_size < 10_000
    for decode in (False, True):
        with pytest.raises(ImageTooLarge, match="1 x 1000000 pixels is more than 50:1"):
            open_image(tmp_path / "bomb.png", decode=decode)
    with pytest.raises(ImageTooLarge, match="more than 8:1"):  # the bound is a parameter
        open_image(tmp_path / "bomb.png", max_aspect=8)
    _thin_png(tmp_path / "panorama.png", 500, 10)  # 50:1 exactly is accepted
    assert open_image(tmp_path / "panorama.png").size == (500, 10)


def test_embed_skips_an_aspect_ratio_bomb_and_counts_it(tmp_path):
    from click.testing import CliRunner

    from surgery.cli.main import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(30):
        Image.fromarray(np.full((32, 32, 3), 8 * i, dtype=np.uint8)).save(images / f"{i:02d}.png")
    # 1 x 20,000: at the tiny model's 32 px, 640,000 px wide after the resize (the 1 x 1,000,000 at
    # 224 px took 6.4 GB in embed; this one stays small enough that a build without the bound survives it)
    _thin_png(images / "zz_thin.png", 1, 20_000)
    result = CliRunner().invoke(main, ["embed", "builtin:tiny", "--images", str(images), "--site", "embedding",
                                       "--out", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable images, e.g. zz_thin.png" in result.output and "50:1" in result.output, result.output
