"""The planted-bias world: determinism, balance, planted correlation, files on disk, params."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from surgery.errors import DataError
from surgery.io.captions import load_captions
from surgery.io.labels import load_labels
from surgery.world.generator import generate, read_split, write_split
from surgery.world.params import PARAMS_JSON, WorldParams, load_params, save_params
from surgery.world.prompts import describe, neutral_queries

# sha256 of generate(WorldParams(), "eval", 12).images — pins the renderer. If a deliberate change
# to the drawing breaks this, bump GENERATOR_VERSION, update the digest, and retrain the world model.
GOLDEN_EVAL_12 = "09d6bfc9c4dc952ef2351772b4788103b2353752bed5f81f325a94d31d953861"


def test_same_params_same_bytes():
    p = WorldParams(seed=3)
    a, b = generate(p, "train", 40), generate(WorldParams(seed=3), "train", 40)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.captions == b.captions and (a.concepts == b.concepts).all() and (a.groups == b.groups).all()
    assert a.images.dtype == np.uint8 and a.images.shape == (40, 32, 32, 3)
    other = generate(WorldParams(seed=4), "train", 40)
    assert other.images.tobytes() != a.images.tobytes()


def test_train_and_eval_streams_are_independent():
    p = WorldParams()
    train, evals = generate(p, "train", 24), generate(p, "eval", 24)
    assert train.images.tobytes() != evals.images.tobytes()


def test_golden_digest():
    digest = hashlib.sha256(generate(WorldParams(), "eval", 12).images.tobytes()).hexdigest()
    assert digest == GOLDEN_EVAL_12


def test_eval_is_balanced():
    p = WorldParams()  # 6 concepts x 2 groups
    split = generate(p, "eval", 36)
    pairs, counts = np.unique(split.concepts * 2 + split.groups, return_counts=True)
    assert len(pairs) == 12 and (counts == 3).all()
    assert all(p.group_word(int(g)) in c for g, c in zip(split.groups, split.captions))  # eval names the group
    with pytest.raises(DataError, match="not a multiple of concepts x groups = 12"):
        generate(p, "eval", 30)


def test_train_cooccurrence_matches_bias_strength():
    p = WorldParams(bias_strength=0.8, group_in_caption=0.3, concepts=("circle", "square", "ring", "star"),
                    groups=("red", "blue", "green"))
    split = generate(p, "train", 3000)
    assigned = split.concepts % 3
    # P(group == assigned) = 0.8 (std sqrt(.8*.2/3000) = 0.007); the other two share 0.2 evenly
    assert abs(np.mean(split.groups == assigned) - 0.8) < 0.03
    off = split.groups[split.groups != assigned]
    assert abs(np.mean(off == (split.concepts[split.groups != assigned] + 1) % 3) - 0.5) < 0.07
    named = np.mean([any(w in c for w in ("red", "blue", "green")) for c in split.captions])
    assert abs(named - 0.3) < 0.04


def test_unbiased_world_and_colour_really_drawn():
    split = generate(WorldParams(bias_strength=0.5), "train", 400)
    assert abs(np.mean(split.groups == split.concepts % 2) - 0.5) < 0.1
    img = split.images.astype(float)
    red_minus_blue = img[..., 0].mean(axis=(1, 2)) - img[..., 2].mean(axis=(1, 2))
    assert red_minus_blue[split.groups == 0].min() > red_minus_blue[split.groups == 1].max()


def test_texture_world_renders():
    p = WorldParams(attribute_kind="texture")
    assert p.groups == ("stripes", "dots")
    split = generate(p, "eval", 12)
    assert "striped" in " ".join(split.captions) and "dotted" in " ".join(split.captions)
    # texture fills are neutral grey: channels equal up to the per-pixel noise
    spread = np.abs(split.images[..., 0].astype(int) - split.images[..., 2].astype(int)).mean()
    assert spread < 10


def test_write_split_files_and_round_trip(tmp_path):
    p = WorldParams(seed=7)
    split = generate(p, "eval", 12)
    out = write_split(split, tmp_path / "world")
    assert sorted(x.name for x in out.iterdir()) == ["captions.csv", "images", "labels.csv", "world.json"]
    assert sorted(x.name for x in (out / "images").iterdir())[:2] == ["000000.png", "000001.png"]
    with (out / "labels.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["file", "concept", "group"] and rows[1][0] == "000000.png" and len(rows) == 13
    assert (out / "captions.csv").read_text().splitlines()[0] == "file,caption"
    meta = json.loads((out / "world.json").read_text())
    assert meta["split"] == "eval" and meta["n"] == 12 and meta["hash"] == p.hash()
    back = read_split(out)
    assert back.images.tobytes() == split.images.tobytes() and back.captions == split.captions
    assert (back.concepts == split.concepts).all() and (back.groups == split.groups).all()
    # the same files read through the generic loaders
    table = load_labels(out / "labels.csv", required=("concept", "group"), allowed={"group": p.groups})
    assert table.files == split.files
    assert load_captions(out / "captions.csv")["000000.png"] == [split.captions[0]]


def test_write_split_refuses_non_empty_dir(tmp_path):
    split = generate(WorldParams(), "eval", 12)
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        write_split(split, out)
    assert (out / "keep.txt").exists()
    with pytest.raises(DataError, match="did not write"):  # overwrite replaces only a world split
        write_split(split, out, overwrite=True)
    assert (out / "keep.txt").exists()
    own = tmp_path / "own"
    write_split(split, own)
    (own / "notes.txt").write_text("x")
    write_split(generate(WorldParams(), "eval", 24), own, overwrite=True)
    assert not (own / "notes.txt").exists() and len(list((own / "images").iterdir())) == 24
    assert sorted(x.name for x in tmp_path.iterdir()) == ["own", "w"]  # no temp folders left behind


def test_params_round_trip_and_hash(tmp_path):
    p = WorldParams(seed=5, groups=("green", "yellow", "pink"), bias_strength=0.7, size_range=[0.5, 0.7])
    assert p.size_range == (0.5, 0.7)
    again = WorldParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p and again.hash() == p.hash() and len(p.hash()) == 64
    assert WorldParams(seed=6).hash() != WorldParams(seed=5).hash()
    save_params(p, tmp_path / PARAMS_JSON)
    assert load_params(tmp_path) == p
    write_split(generate(p, "eval", 18), tmp_path / "split")
    assert load_params(tmp_path / "split" / "world.json") == p


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concepts": ("circle", "square", "ring")}, "concepts needs 4 to 8 names, got 3"),
        ({"concepts": ("circle", "square", "ring", "blob")}, "unknown concepts blob; allowed: circle"),
        ({"concepts": ("circle", "circle", "ring", "star")}, "repeats"),
        ({"groups": ("red", "blue", "green", "pink", "cyan")}, "groups needs 2 to 4"),
        ({"attribute_kind": "texture", "groups": ("red", "blue")}, "allowed: stripes, dots"),
        ({"attribute_kind": "shade"}, "allowed: color, texture"),
        ({"bias_strength": 0.3}, r"bias_strength must be a number in \[0.5, 1\]"),
        ({"group_in_caption": 1.5}, "group_in_caption"),
        ({"image_size": 8}, "image_size"),
        ({"size_range": (0.8, 0.5)}, "size_range must satisfy"),
        ({"seed": -1}, "seed"),
    ],
)
def test_params_validation(kwargs, message):
    with pytest.raises(DataError, match=message):
        WorldParams(**kwargs)


def test_from_dict_rejects_unknown_keys_and_bad_split():
    with pytest.raises(DataError, match="unknown world parameters colour"):
        WorldParams.from_dict({"colour": "red"})
    with pytest.raises(DataError, match="allowed: train, eval"):
        generate(WorldParams(), "test", 12)


def test_queries_and_descriptions():
    p = WorldParams(groups=("orange", "blue"))
    assert neutral_queries(p)[:2] == ["a photo of a circle", "a photo of a square"]
    assert describe(p, 5, 0) == "an orange star"
    assert describe(p, 4) == "a ring"


def test_balanced_sizes_round_to_the_worlds_cells_and_bad_ones_name_the_nearest():
    from surgery.world.generator import balanced_size, check_eval_size

    three = WorldParams(groups=("red", "blue", "green"))  # 6 concepts x 3 groups = 18 cells
    assert balanced_size(WorldParams()) == 1200 and balanced_size(three) == 1206
    assert balanced_size(WorldParams(concepts=("circle", "square", "star", "ring", "cross"),
                                     groups=("red", "blue", "green", "yellow"))) == 1200
    assert balanced_size(three, 5) == 18  # at least one image per pair
    assert check_eval_size(three, 1206) == 1206
    with pytest.raises(DataError, match=r"eval n=1200 is not a multiple of concepts x groups = 18; use 1188 or 1206"):
        check_eval_size(three, 1200)
    with pytest.raises(DataError, match="--n-probe=1200 is not a multiple"):
        check_eval_size(three, 1200, "--n-probe")


def test_world_generate_defaults_to_a_valid_size_for_three_groups(tmp_path):
    from click.testing import CliRunner

    from surgery.cli.main import main

    result = CliRunner().invoke(main, ["world", "generate", "--out", str(tmp_path / "w"), "--groups",
                                       "red,blue,green", "--concepts", "circle,square,star,ring"])
    assert result.exit_code == 0, result.output
    assert "wrote 1200 eval images" in result.output  # 4 x 3 = 12 cells: 1200 is valid
    result = CliRunner().invoke(main, ["world", "generate", "--out", str(tmp_path / "w3"), "--groups",
                                       "red,blue,green"])
    assert result.exit_code == 0 and "wrote 1206 eval images" in result.output
    result = CliRunner().invoke(main, ["world", "generate", "--out", str(tmp_path / "w4"), "--groups",
                                       "red,blue,green", "--n", "1000"])
    assert result.exit_code == 1 and "use 990 or 1008" in result.output
