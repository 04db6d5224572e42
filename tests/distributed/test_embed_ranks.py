"""``clipsurgery embed`` on one process and on two gloo ranks (launched by torchrun, as users do):
the same cache, bit for bit, from a folder and from shards; resume after a real kill; refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch
from dist_jobs import cli, image_folder, ranks, write_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgery
from surgery.sae.activations import open_cache
from surgery.sae.extract import KILL_AT_PART_ENV, read_part_sidecars

pytestmark = pytest.mark.slow

MODEL = "builtin:world"


def _rows(path) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows and their sample ids, in cache order."""
    cache = open_cache(str(path))
    rows = torch.cat(list(cache.iter_rows()))
    ids = torch.cat([cache.read_samples(i) for i in range(len(cache.shards))])
    return rows, ids


def _assert_same_cache(a, b) -> None:
    rows_a, ids_a = _rows(a)
    rows_b, ids_b = _rows(b)
    assert torch.equal(rows_a, rows_b) and torch.equal(ids_a, ids_b)  # bit for bit, same order
    assert open_cache(str(a)).shards == open_cache(str(b)).shards


def _ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    names = image_folder(root / "imgs", 30)
    names_bad = names[:]
    shards = write_shards(root / "imgs", root / "shards", names, per_shard=7,
                          labels={n: "red" if i % 3 else "blue" for i, n in enumerate(names_bad)})
    return root, names, shards


def test_two_ranks_write_the_same_cache_as_one_from_a_folder(data, tmp_path):
    root, names, _ = data
    args = ["embed", MODEL, "--images", str(root / "imgs"), "--site", "residual", "--unit-images", "8",
            "--batch-size", "5"]
    _ok(cli(*args, "--out", str(tmp_path / "one")))
    two = _ok(cli(*args, "--out", str(tmp_path / "two"), "--nproc", "2"))
    assert "2 ranks" in two.stdout
    _assert_same_cache(tmp_path / "one", tmp_path / "two")
    cache = open_cache(str(tmp_path / "one"))
    assert cache.samples == 30 and len(cache.shards) == 4  # 8 + 8 + 8 + 6 images
    rows, ids = _rows(tmp_path / "one")
    assert sorted(set(ids.tolist())) == list(range(30))  # every image, each once
    assert rows.shape[0] == 30 * (rows.shape[0] // 30)  # the same number of tokens per image


def test_two_ranks_write_the_same_cache_as_one_from_shards_with_labels(data, tmp_path):
    root, names, shards = data
    pattern = str(root / "shards" / "{00000..00004}.tar")
    args = ["embed", MODEL, "--images", pattern, "--site", "embedding", "--batch-size", "4"]
    _ok(cli(*args, "--out", str(tmp_path / "one")))
    _ok(cli(*args, "--out", str(tmp_path / "two"), "--nproc", "2"))
    _assert_same_cache(tmp_path / "one", tmp_path / "two")
    # the shards' embeddings equal the folder's: the same images through the same model
    _ok(cli("embed", MODEL, "--images", str(root / "imgs"), "--site", "embedding", "--batch-size", "4",
            "--out", str(tmp_path / "folder")))
    rows_s, ids_s = _rows(tmp_path / "one")
    rows_f, ids_f = _rows(tmp_path / "folder")
    torch.testing.assert_close(rows_s[ids_s.argsort()], rows_f[ids_f.argsort()], atol=1e-5, rtol=1e-5)
    sidecars = read_part_sidecars(open_cache(str(tmp_path / "one")))
    assert [len(s["keys"]) for s in sidecars] == [7, 7, 7, 7, 2]
    assert sidecars[0]["captions"][1] == "caption of 0001" and sidecars[0]["meta"][1] == {"group": "red"}


def test_a_rank_killed_mid_run_resumes_to_the_same_cache(data, tmp_path):
    root, _, _ = data
    args = ["embed", MODEL, "--images", str(root / "imgs"), "--site", "embedding", "--unit-images", "4",
            "--batch-size", "4", "--nproc", "2"]
    # the unbroken cache to compare with, made in one process (no torchrun launch): a two-rank run
    # writes the same cache bit for bit (the two tests above)
    _ok(cli(*args[:-2], "--out", str(tmp_path / "unbroken")))
    killed = cli(*args, "--out", str(tmp_path / "resumed"), env={KILL_AT_PART_ENV: "5"})
    assert killed.returncode != 0
    assert not os.path.exists(tmp_path / "resumed" / "cache.json")  # no manifest: not readable as a cache
    assert not os.path.exists(tmp_path / "resumed" / "part-00005.safetensors")  # killed mid-part
    assert os.path.exists(tmp_path / "resumed" / "part-00005.json")  # ... after its sidecar
    done_before = sorted(p for p in os.listdir(tmp_path / "resumed") if p.endswith(".safetensors"))
    assert done_before and "part-00000.safetensors" in done_before
    stamps = {p: os.stat(tmp_path / "resumed" / p).st_mtime_ns for p in done_before}
    resumed = _ok(cli(*args, "--out", str(tmp_path / "resumed")))
    assert f"{len(done_before)} kept from an earlier run" in resumed.stdout
    assert all(os.stat(tmp_path / "resumed" / p).st_mtime_ns == t for p, t in stamps.items())  # not redone
    _assert_same_cache(tmp_path / "unbroken", tmp_path / "resumed")


def test_missing_and_damaged_shards_are_skipped_with_a_count_or_refused(data, tmp_path):
    root, _, shards = data
    damaged = tmp_path / "00001.tar"
    damaged.write_bytes(open(shards[1], "rb").read()[:3000] + b"\x01" * 600)
    spec = f"{shards[0]}::{damaged}::{tmp_path / 'absent.tar'}::{shards[2]}"
    refused = cli("embed", MODEL, "--images", spec, "--site", "embedding", "--out", str(tmp_path / "c"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "2 of 4 shards are missing or damaged" in refused.stderr
    allowed = _ok(cli("embed", MODEL, "--images", spec, "--site", "embedding", "--out", str(tmp_path / "c"),
                      "--max-failed-shards", "0.5"))
    assert "skipped shard" in allowed.stdout and "absent.tar" in allowed.stdout
    manifest = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert len(manifest["failed_shards"]) == 2 and manifest["samples"] == 14


def test_ranks_that_disagree_on_the_model_are_refused_at_start(data, tmp_path):
    root, _, _ = data
    other = tmp_path / "other.safetensors"
    bundled = os.path.join(os.path.dirname(surgery.__file__), "data", "world_model.safetensors")
    state = load_file(bundled)
    with safe_open(bundled, "pt") as fh:
        meta = fh.metadata()
    state["ln_final.bias"] = state["ln_final.bias"] + 0.01
    save_file(state, str(other), metadata=meta)
    args = ["--images", str(root / "imgs"), "--site", "embedding", "--out", str(tmp_path / "c")]
    results = ranks([["embed", MODEL, *args], ["embed", str(other), *args]])
    for r in results:
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "the ranks disagree on model_hash" in r.stderr
    assert not os.path.exists(tmp_path / "c")  # refused before any work
    # a cache from another model, or of another site, is refused by training
    _ok(cli("embed", MODEL, *args))
    wrong_model = cli("sae", "train", str(other), "--cache", str(tmp_path / "c"), "--site", "embedding",
                      "--out", str(tmp_path / "s"), "--steps", "2")
    assert wrong_model.returncode == 1 and "made from another model" in wrong_model.stderr
    wrong_site = cli("sae", "train", MODEL, "--cache", str(tmp_path / "c"), "--site", "residual",
                     "--out", str(tmp_path / "s"), "--steps", "2")
    assert wrong_site.returncode == 1 and "holds vision/embedding activations" in wrong_site.stderr
    # and a resume into a folder of another model's parts
    again = cli("embed", str(other), *args)
    assert again.returncode == 1 and "made with other settings (model_hash" in again.stderr
