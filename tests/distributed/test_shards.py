"""WebDataset shards and folders as extraction sources: patterns, keys, units, damaged shards."""
from __future__ import annotations

import io
import os
import tarfile

import pytest
from dist_jobs import image_folder, write_shards

from surgery.errors import DataError
from surgery.io.shards import ShardError, Unit, iter_units, open_source, read_unit, sample_key


def test_sample_keys_split_like_webdataset():
    assert sample_key("00001.jpg") == ("00001", "jpg")
    assert sample_key("dir/a.b/00001.seg.png") == ("dir/a.b/00001", "seg.png")
    assert sample_key("noext") == ("noext", "")


def test_shards_written_by_webdataset_read_back_with_captions_and_labels(tmp_path):
    names = image_folder(tmp_path / "imgs", 10)
    labels = {n: ("red" if i % 2 else "blue") for i, n in enumerate(names)}
    paths = write_shards(tmp_path / "imgs", tmp_path / "shards", names, per_shard=4, labels=labels)
    source = open_source(str(tmp_path / "shards" / "{00000..00002}.tar"))
    assert source.kind == "shards" and list(source.shards) == paths
    units = source.units()
    assert [u.index for u in units] == [0, 1, 2]
    samples, content = read_unit(units[1])
    assert [s.key for s in samples] == ["0004", "0005", "0006", "0007"]
    assert samples[1].caption == "caption of 0005" and samples[1].meta == {"group": "red"}
    with open(tmp_path / "imgs" / "0005.png", "rb") as fh:
        assert samples[1].image == fh.read()
    assert len(content) == 64
    # a folder of shards stands for them all; '::' joins patterns
    assert open_source(str(tmp_path / "shards")).shards == source.shards
    joined = open_source(f"{paths[0]}::{tmp_path / 'shards'}/{{00001..00002}}.tar")
    assert joined.shards == source.shards


def test_folder_units_cover_every_file_once(tmp_path):
    names = image_folder(tmp_path / "imgs", 11)
    source = open_source(str(tmp_path / "imgs"))
    units = source.units(unit_images=4)
    assert [len(u.files) for u in units] == [4, 4, 3]
    assert [f for u in units for f in u.files] == names
    for world in (1, 2, 3, 5):
        dealt = sorted(u.index for r in range(world) for u in iter_units(units, r, world))
        assert dealt == [0, 1, 2]  # disjoint and complete


def test_missing_and_damaged_shards_are_named(tmp_path):
    names = image_folder(tmp_path / "imgs", 4)
    (path,) = write_shards(tmp_path / "imgs", tmp_path / "shards", names, per_shard=4)
    with pytest.raises(ShardError, match="missing"):
        read_unit(Unit(0, str(tmp_path / "shards" / "nope.tar"), "tar"))
    blob = open(path, "rb").read()
    damaged = tmp_path / "shards" / "damaged.tar"
    damaged.write_bytes(blob[: len(blob) // 3] + b"\x00garbage" * 50)
    with pytest.raises(ShardError, match="damaged.tar is damaged"):
        read_unit(Unit(0, str(damaged), "tar"))


def test_bad_sources_get_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="neither an image folder nor tar shards"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="none of the 3 shards"):
        open_source(str(tmp_path / "{0..2}.tar"))
    names = image_folder(tmp_path / "imgs", 2)
    write_shards(tmp_path / "imgs", tmp_path / "s", names, per_shard=2)
    with pytest.raises(DataError, match="names a shard twice"):
        open_source(f"{tmp_path}/s/00000.tar::{tmp_path}/s/00000.tar")


def test_members_without_an_image_are_dropped_and_bad_json_is_kept_as_an_error(tmp_path):
    path = tmp_path / "x.tar"
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", png.getvalue()), ("a.json", b"{not json"), ("b.txt", b"caption only")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, _ = read_unit(Unit(0, str(path), "tar"))
    assert [s.key for s in samples] == ["a"]
    assert "not valid JSON" in samples[0].meta["_error"]
    assert os.path.getsize(path) > 0
