"""Issue 24, hardening of the data paths: bounded reads of shards, and one line (no traceback) for
damaged caches and SAE folders, odd plans, read-only and full disks, and file names that are not
UTF-8. Each test failed on the main it was written against (a traceback, or no bound at all)."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import labelled_image_folder

from surgery.cli.main import main
from surgery.io.checkpoint import state_dict_hash
from surgery.model.loading import load
from surgery.sae import SAEConfig, SparseAutoencoder, save_sae

EMBED = ["embed", "builtin:tiny", "--site", "embedding", "--batch-size", "4"]
PLAN_HEADS = [{"tower": "vision", "layer": 0, "head": 1, "scale": 0.0}]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert len(result.output.strip().splitlines()) == 1, result.output


def _no_temp_files(folder) -> None:
    leftovers = [str(p) for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or "clipsurgery-" in p.name]
    assert leftovers == []


@pytest.fixture(scope="module")
def cache_and_sae(tmp_path_factory):
    """An embed cache of builtin:tiny's image embeddings (2 parts) and an SAE of that site."""
    root = tmp_path_factory.mktemp("hardening")
    images, _ = labelled_image_folder(root, 8)
    _ok(_run(*EMBED, "--images", images, "--unit-images", "4", "--out", root / "cache"))
    sae = SparseAutoencoder(SAEConfig(d_in=32, expansion=2, kind="topk", k=4, site="embedding", tower="vision",
                                      model_hash=state_dict_hash(load("builtin:tiny").model)))
    save_sae(sae.eval(), str(root / "sae"))
    return root


# ----------------------------------------------------------------------------- resource limits
def _gz_shard(path, members: list[tuple[str, bytes | int]]) -> str:
    """A .tar.gz; an int member is that many zero bytes (streamed, never held in memory)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, int):
                info.size = data
                tar.addfile(info, _Zeros(data))
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def test_a_compressed_shard_member_over_the_cap_is_refused_before_it_is_read(tmp_path):
    png = Path(labelled_image_folder(tmp_path, 2)[0], "00.png").read_bytes()
    (tmp_path / "shards").mkdir()
    _gz_shard(tmp_path / "shards" / "00000.tar.gz", [("a.png", png), ("a.txt", b"fine")])
    bomb = _gz_shard(tmp_path / "shards" / "00001.tar.gz", [("b.png", png), ("b.txt", 3_000_000)])
    assert os.path.getsize(bomb) < 30_000  # 3 MB of text in a few kB
    args = [*EMBED, "--images", tmp_path / "shards", "--out", tmp_path / "c", "--max-member-bytes", "1000000"]
    _one_line_error(_run(*args), "1 of 2 shards are missing or damaged")
    allowed = _ok(_run(*args, "--max-failed-shards", "0.5"))
    assert "over the 1,000,000-byte cap (--max-member-bytes)" in allowed.output
    # the default cap holds too: a 64 MiB + 1 member is refused from its header, not read
    from surgery.io.shards import DEFAULT_MAX_MEMBER_BYTES, ShardError, Unit, read_unit

    big = _gz_shard(tmp_path / "big.tar.gz", [("c.png", png), ("c.txt", DEFAULT_MAX_MEMBER_BYTES + 1)])
    with pytest.raises(ShardError, match="over the 67,108,864-byte cap"):
        read_unit(Unit(0, big, "tar"))


def test_a_plan_nested_too_deeply_is_one_line(tmp_path):
    plan = tmp_path / "deep.json"
    plan.write_text('{"schema": "clipsurgery.plan/1", "provenance": {"x": ' + "[" * 200_000 + "]" * 200_000 + "}}")
    _one_line_error(_run("bake", "builtin:tiny", plan, tmp_path / "o.safetensors"), "nested too deeply")


# ------------------------------------------------------------------------------ damaged caches
def _damage(cache, case: str) -> None:
    manifest_path = cache / "cache.json"
    manifest = json.loads(manifest_path.read_text())
    if case == "missing key":
        del manifest["shards"]
    elif case == "null":
        manifest["d"] = None
    elif case == "wrong type":
        manifest["shards"][0]["rows"] = "4"
    elif case == "absolute path":
        manifest["shards"][0]["file"] = "/etc/passwd"
    elif case == "deep path":
        manifest["shards"][0]["file"] = "../" * 40 + "etc/passwd"
    elif case == "truncated part":  # a disk that filled while something else copied the cache
        part = cache / manifest["shards"][1]["file"]
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("case,message", [
    ("missing key", "'shards' must be a non-empty list"),
    ("null", "'d' and 'rows' must be whole numbers"),
    ("wrong type", "shards[0] must be an object with 'file'"),
    ("absolute path", "is not a file name in the cache folder"),
    ("deep path", "is not a file name in the cache folder"),
    ("truncated part", "is damaged"),
])
def test_sae_commands_on_a_damaged_cache_say_what_is_wrong_in_one_line(cache_and_sae, tmp_path, case, message):
    cache = tmp_path / "cache"
    shutil.copytree(cache_and_sae / "cache", cache)
    _damage(cache, case)
    _one_line_error(_run("sae", "train", "builtin:tiny", "--cache", cache, "--site", "embedding", "--steps", "2",
                         "--out", tmp_path / "s"), message)
    _one_line_error(_run("sae", "neurons", cache_and_sae / "sae", "builtin:tiny", "--cache", cache,
                         "--attribute", "group", "--out", tmp_path / "n.json"), message)


def test_an_sae_config_with_a_huge_width_is_refused_before_anything_is_allocated(cache_and_sae, tmp_path):
    sae = tmp_path / "sae"
    shutil.copytree(cache_and_sae / "sae", sae)
    record = json.loads((sae / "cfg.json").read_text())
    record["config"]["d_in"] = 10 ** 12
    (sae / "cfg.json").write_text(json.dumps(record))
    _one_line_error(_run("sae", "neurons", sae, "builtin:tiny", "--cache", cache_and_sae / "cache",
                         "--attribute", "group", "--out", tmp_path / "n.json"), "weights do not fit cfg.json")


def test_sae_train_on_an_unfinished_cache_says_it_is_unfinished(cache_and_sae, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(cache_and_sae / "cache", cache)
    (cache / "cache.json").unlink()  # as a killed 'embed' leaves it
    _one_line_error(_run("sae", "train", "builtin:tiny", "--cache", cache, "--site", "embedding", "--out",
                         tmp_path / "s"), "is an unfinished cache")
    result = _run("sae", "train", "builtin:tiny", "--cache", cache, "--site", "embedding", "--out", tmp_path / "s")
    assert "rerun the same 'clipsurgery embed' command" in result.output


# ------------------------------------------------------------------------------------- plans
def test_bake_of_a_plan_whose_sha256_is_a_number_is_one_line(tmp_path):
    _ok(_run("export", "builtin:tiny", tmp_path / "t.safetensors"))  # a file: its sha256 is compared
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema": "clipsurgery.plan/1", "source": {"sha256": 12345}, "heads": PLAN_HEADS}))
    _one_line_error(_run("bake", tmp_path / "t.safetensors", plan, tmp_path / "o.safetensors"),
                    "'source.sha256' must be a string")


def test_a_plan_given_as_a_folder_is_called_a_folder(tmp_path):
    _one_line_error(_run("bake", "builtin:tiny", tmp_path, tmp_path / "o.safetensors"),
                    "is a folder, not a plan file")


# ------------------------------------------------------------------------ read-only, full disk
def test_a_read_only_out_is_one_line_before_any_work(cache_and_sae, tmp_path):
    images, _ = labelled_image_folder(tmp_path, 4)
    _one_line_error(_run(*EMBED, "--images", images, "--out", "/proc/clipsurgery-cache"), "cannot write in /proc")
    sae_args = ["--site", "embedding", "--kind", "topk", "--expansion", "2", "--k", "4", "--steps", "2"]
    _one_line_error(_run("sae", "train", "builtin:tiny", "--images", images, *sae_args, "--out", "/proc/sae"),
                    "cannot write in /proc")
    _one_line_error(_run("sae", "train", "builtin:tiny", "--cache", cache_and_sae / "cache", *sae_args, "--out",
                         "/proc/sae"), "cannot write in /proc")


def _full_disk(monkeypatch, module, name: str, path_arg: int) -> None:
    """``module.name`` writes a few bytes of its file, then fails as a full disk does."""
    def write_then_fail(*args, **kwargs):
        with open(args[path_arg], "wb") as fh:
            fh.write(b"\0" * 16)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, name, write_then_fail)


def test_embed_on_a_full_disk_is_one_line_and_leaves_no_half_part(tmp_path, monkeypatch):
    import safetensors.torch

    images, _ = labelled_image_folder(tmp_path, 4)
    _full_disk(monkeypatch, safetensors.torch, "save_file", 1)
    _one_line_error(_run(*EMBED, "--images", images, "--out", tmp_path / "c"), "no space left on device")
    assert not (tmp_path / "c" / "part-00000.safetensors").exists() and not (tmp_path / "c" / "cache.json").exists()
    _no_temp_files(tmp_path / "c")


@pytest.mark.parametrize("out", ["m.safetensors", "m.onnx"])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, out):
    import onnx
    import safetensors.torch

    _full_disk(monkeypatch, safetensors.torch, "save_file", 1)
    _full_disk(monkeypatch, onnx, "save_model", 1)
    _one_line_error(_run("export", "builtin:tiny", tmp_path / out, "--tower", "vision"), "no space left on device")
    assert sorted(os.listdir(tmp_path)) == []  # no output, no temp file, no staging folder


def test_embed_skips_and_counts_a_file_whose_name_is_not_utf8(tmp_path):
    images, _ = labelled_image_folder(tmp_path, 20)
    shutil.copyfile(Path(images, "00.png"), os.path.join(os.fsencode(images), b"caf\xe9.png"))  # Latin-1 name
    result = _ok(_run(*EMBED, "--images", images, "--out", tmp_path / "c"))
    assert "skipped 1 unreadable images, e.g. caf\\xe9.png: file name is not UTF-8" in result.output
    (tmp_path / "few").mkdir()
    few, _ = labelled_image_folder(tmp_path / "few", 4)
    shutil.copyfile(Path(few, "00.png"), os.path.join(os.fsencode(few), b"\xff.png"))
    _one_line_error(_run(*EMBED, "--images", few, "--out", tmp_path / "c2"), "file name is not UTF-8")
