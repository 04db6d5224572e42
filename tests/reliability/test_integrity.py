"""Issue 23, integrity: no user data lost, and no wrong output shipped with exit 0, around embed
caches, shards, neuron searches and neuron plans. Each test failed on the main it was written
against (data deleted or overwritten, a stale or foreign part read as if it were fresh)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import labelled_image_folder
from PIL import Image

from surgery.cli.main import main
from surgery.errors import CacheError, DataError
from surgery.io.checkpoint import state_dict_hash
from surgery.io.shards import Unit, open_source, read_unit
from surgery.model.loading import load
from surgery.model.preprocess import image_transform, preprocess_key
from surgery.sae import SAEConfig, Site, SparseAutoencoder, open_cache, save_sae
from surgery.sae.extract import ExtractOptions, extract

EMBED = ["embed", "builtin:tiny", "--site", "embedding", "--batch-size", "4"]


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


def _png(seed: int, size: int = 24) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]) -> str:
    """A tar file with the given (name, bytes) members, in that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _shards(folder, n_shards: int = 3, per: int = 3, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per):
            key = f"{s:02d}{i:03d}"
            members += [(f"{key}.png", _png(seed * 1000 + s * per + i)),
                        (f"{key}.json", json.dumps({"group": "a" if i % 2 else "b"}).encode())]
        paths.append(_tar(folder / f"{s:05d}.tar", members))
    return paths


def _rows(path) -> torch.Tensor:
    return torch.cat(list(open_cache(str(path)).iter_rows()))


@pytest.fixture(scope="module")
def tiny():
    loaded = load("builtin:tiny")
    return loaded, state_dict_hash(loaded.model)


def _extract(tiny, images, out, model_hash=None, **options):
    loaded, real_hash = tiny
    return extract(loaded.model, Site("vision", "embedding"), open_source(str(images)), str(out),
                   image_transform(loaded.preprocess), ExtractOptions(batch_size=4, **options),
                   model_hash=model_hash or real_hash, preprocess=preprocess_key(loaded.preprocess))


# ------------------------------------------------------------------------------ data loss
def test_embed_force_deletes_only_its_own_parts_and_refuses_out_in_the_images(tmp_path):
    images, _ = labelled_image_folder(tmp_path, 6)
    shutil.copyfile(Path(images, "00.png"), Path(images, "part-01.png"))  # the user's files named part-*
    Path(images, "part-list.txt").write_text("mine")
    _one_line_error(_run(*EMBED, "--images", images, "--out", images, "--force"), "is the image folder")
    _one_line_error(_run(*EMBED, "--images", images, "--out", Path(images, "sub")), "inside the image folder")
    assert Path(images, "part-01.png").is_file() and Path(images, "part-list.txt").read_text() == "mine"
    assert not Path(images, "sub").exists()
    out = tmp_path / "cache"
    out.mkdir()
    (out / "part-notes.txt").write_text("mine")
    (out / "part-1.json").write_text("{}")  # not the tool's part-NNNNN
    _ok(_run(*EMBED, "--images", images, "--out", out))
    _ok(_run(*EMBED, "--images", images, "--out", out, "--force"))
    assert (out / "part-notes.txt").read_text() == "mine" and (out / "part-1.json").read_text() == "{}"
    assert open_cache(str(out)).samples == 7


def test_sae_neurons_never_writes_over_an_input_or_an_existing_file(tmp_path, tiny):
    images, labels = labelled_image_folder(tmp_path, 8)
    sae_dir = tmp_path / "sae"
    sae = SparseAutoencoder(SAEConfig(d_in=32, expansion=2, kind="topk", k=4, site="embedding", tower="vision",
                                      model_hash=tiny[1]))
    save_sae(sae.eval(), str(sae_dir))
    before = {p: Path(p).read_bytes() for p in (labels, sae_dir / "cfg.json")}
    common = ["sae", "neurons", sae_dir, "builtin:tiny", "--images", images, "--labels", labels,
              "--attribute", "colour", "--tau", "0.1"]
    _one_line_error(_run(*common, "--out", labels), "is the input file")
    _one_line_error(_run(*common, "--out", sae_dir / "cfg.json"), "is the input file")
    other = tmp_path / "notes.json"
    other.write_text("keep")
    _one_line_error(_run(*common, "--out", other), "never replaces a file")
    assert all(Path(p).read_bytes() == data for p, data in before.items()) and other.read_text() == "keep"
    _ok(_run(*common, "--out", tmp_path / "neurons.json"))


def test_embed_resumed_with_other_options_is_refused_before_the_manifest_is_removed(tmp_path):
    images, _ = labelled_image_folder(tmp_path, 6)
    out = tmp_path / "cache"
    _ok(_run(*EMBED, "--images", images, "--out", out))
    refused = _run(*EMBED[:-1], "8", "--images", images, "--out", out)  # --batch-size 8 on a finished cache
    _one_line_error(refused, "made with other settings (batch_size")
    assert open_cache(str(out)).samples == 6  # still a readable cache


# ---------------------------------------------------------------------------- stale resume
def test_a_shard_replaced_under_the_same_name_is_embedded_again_on_resume(tmp_path, tiny):
    shards = _shards(tmp_path / "shards")
    _extract(tiny, tmp_path / "shards", tmp_path / "cache")
    _shards(tmp_path / "other", seed=7)
    shutil.copyfile(tmp_path / "other" / "00001.tar", shards[1])  # other content, same name
    resumed = _extract(tiny, tmp_path / "shards", tmp_path / "cache")
    _extract(tiny, tmp_path / "shards", tmp_path / "fresh")
    assert torch.equal(_rows(tmp_path / "cache"), _rows(tmp_path / "fresh"))  # was: the old shard's rows, kept
    assert open_cache(str(tmp_path / "cache")).source == open_cache(str(tmp_path / "fresh")).source
    assert (resumed.reused_parts, resumed.redone_parts) == (2, 1)


def test_a_folder_that_gained_files_redoes_the_parts_whose_units_shifted(tmp_path, tiny):
    images, _ = labelled_image_folder(tmp_path, 8)
    _extract(tiny, images, tmp_path / "cache", unit_images=4)  # units [0:4] [4:8]
    shutil.copyfile(Path(images, "07.png"), Path(images, "00a.png"))  # sorts second: every unit shifts
    resumed = _extract(tiny, images, tmp_path / "cache", unit_images=4)  # [0:4] [4:8] [8:9]
    _extract(tiny, images, tmp_path / "fresh", unit_images=4)
    assert torch.equal(_rows(tmp_path / "cache"), _rows(tmp_path / "fresh"))  # was: parts of the old units kept
    assert resumed.reused_parts == 0 and resumed.redone_parts == 2
    again = _extract(tiny, images, tmp_path / "cache", unit_images=4)
    assert (again.reused_parts, again.redone_parts) == (3, 0)  # unchanged sources are kept


# -------------------------------------------------------------------------- foreign parts
def test_a_part_from_another_model_or_data_set_is_refused_when_the_cache_is_read(tmp_path, tiny):
    images, _ = labelled_image_folder(tmp_path, 8)
    (tmp_path / "o").mkdir()
    others, _ = labelled_image_folder(tmp_path / "o", 8)
    Path(others, "00.png").write_bytes(_png(3, 32))  # another data set (one image differs)
    for name, cache_images, model_hash in (("mine", images, None), ("model", images, "f" * 64),
                                           ("data", others, None)):
        _extract(tiny, cache_images, tmp_path / name, model_hash=model_hash, unit_images=4)
    open_cache(str(tmp_path / "mine"))
    for source, message in (("model", "made from another model"), ("data", "made from other data")):
        swapped = tmp_path / f"swapped-{source}"
        shutil.copytree(tmp_path / "mine", swapped)
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(tmp_path / source / f"part-00001{suffix}", swapped / f"part-00001{suffix}")
        with pytest.raises(CacheError, match=message):
            open_cache(str(swapped))
    _one_line_error(_run("sae", "train", "builtin:tiny", "--cache", tmp_path / "swapped-data", "--site", "embedding",
                         "--steps", "2", "--out", tmp_path / "s"), "made from other data")


def test_a_manifest_pointing_outside_its_folder_is_refused(tmp_path, tiny):
    images, _ = labelled_image_folder(tmp_path, 4)
    _extract(tiny, images, tmp_path / "other")
    _extract(tiny, images, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    manifest["shards"][0]["file"] = "../other/part-00000.safetensors"
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="is not a file name in the cache folder"):
        open_cache(str(tmp_path / "cache"))
    manifest["shards"][0]["file"] = "link.safetensors"
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(manifest))
    (tmp_path / "cache" / "link.safetensors").symlink_to(tmp_path / "other" / "part-00000.safetensors")
    with pytest.raises(CacheError, match="links outside the cache folder"):
        open_cache(str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------ plans
def test_a_neuron_edit_is_refused_where_its_sae_was_not_trained(tmp_path):
    from surgery.edit import SurgeryPlan, bake
    from surgery.errors import PlanError

    loaded = load("builtin:world")  # vision and text residuals are both 64 wide: the width cannot tell
    sae_dir = tmp_path / "sae"
    save_sae(SparseAutoencoder(SAEConfig(d_in=64, expansion=2, kind="topk", k=4, site="residual", tower="vision",
                                         model_hash=state_dict_hash(loaded.model))).eval(), str(sae_dir))

    def plan(tower, site):
        path = tmp_path / f"plan-{tower}-{site}.json"
        path.write_text(json.dumps({"schema": "clipsurgery.plan/1", "neurons": [
            {"tower": tower, "site": site, "sae": str(sae_dir), "ids": [0, 1], "alpha": 1.0}]}))
        return path

    for tower, site in (("text", "residual"), ("vision", "embedding")):
        _one_line_error(_run("bake", "builtin:world", plan(tower, site), tmp_path / "out.safetensors"),
                        f"trained on vision/residual activations, but the edit acts on {tower}/{site}")
        with pytest.raises(PlanError, match="trained on vision/residual"):
            bake(load("builtin:world").model, SurgeryPlan.load(str(plan(tower, site))))
    assert not (tmp_path / "out.safetensors").exists()
    _ok(_run("bake", "builtin:world", plan("vision", "residual"), tmp_path / "out.safetensors"))
    other = tmp_path / "other.safetensors"
    _ok(_run("bake", "builtin:world", plan("vision", "residual"), other))  # a model other than the SAE's
    _one_line_error(_run("bake", other, plan("vision", "residual"), tmp_path / "again.safetensors"),
                    "trained on another model's activations")


# ----------------------------------------------------------------------------------- shards
def test_a_folder_of_shards_and_images_is_refused_as_ambiguous(tmp_path):
    _shards(tmp_path / "data", n_shards=1)
    (tmp_path / "data" / "cover.png").write_bytes(_png(1))
    with pytest.raises(DataError, match="holds both tar shards"):
        open_source(str(tmp_path / "data"))
    _one_line_error(_run(*EMBED, "--images", tmp_path / "data", "--out", tmp_path / "c"), "holds both tar shards")
    assert open_source(str(tmp_path / "data" / "00000.tar")).kind == "shards"  # named, the shards are clear


def test_the_image_member_is_chosen_by_the_documented_rule_not_by_tar_order(tmp_path):
    jpg, seg = _png(1), _png(2)
    path = _tar(tmp_path / "s.tar", [("a.seg.png", seg), ("a.jpg", jpg), ("b.jpg", jpg), ("b.seg.png", seg),
                                     ("c.seg.png", seg), ("c.txt", b"mask only")])
    samples, _ = read_unit(Unit(0, path, "tar"))
    by_key = {s.key: s for s in samples}
    assert by_key["a"].image == jpg and by_key["b"].image == jpg  # whichever comes first in the tar
    assert by_key["c"].image is None and "--image-key seg.png" in by_key["c"].problem  # counted, not embedded
    from surgery.io.shards import ReadOptions  # (new with the rule)

    chosen, _ = read_unit(Unit(0, path, "tar"), options=ReadOptions(image_key="seg.png"))
    assert all(s.image == seg for s in chosen)


def test_label_json_that_cannot_be_parsed_is_counted_and_refused_past_the_threshold(tmp_path):
    members = []
    for i in range(4):
        members += [(f"k{i}.png", _png(i)), (f"k{i}.json", b"{not json" if i == 0 else b'{"group": "a"}')]
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "00000.tar", members)
    args = [*EMBED, "--images", tmp_path / "shards", "--out", tmp_path / "c"]
    _one_line_error(_run(*args), "1 of 4 samples have label JSON that cannot be parsed")
    allowed = _ok(_run(*args, "--max-bad-labels", "0.5"))
    assert "1 samples have label JSON that cannot be parsed" in allowed.output
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["bad_labels"] == 1
