"""An embed cache read as one cache by the SAE stages: ``sae neurons`` from the cache (labels from
the shards' JSON or a CSV) finds what it finds from the images, without running the model."""
from __future__ import annotations

import csv

import pytest
import torch
from dist_jobs import write_shards
from helpers import labelled_image_folder

from surgery.io.checkpoint import state_dict_hash
from surgery.io.shards import open_source
from surgery.model.loading import load
from surgery.model.preprocess import image_transform, preprocess_key
from surgery.sae import (
    NeuronOptions,
    SAEConfig,
    SAEError,
    Site,
    SparseAutoencoder,
    neurons_from_cache,
    neurons_from_images,
    pooled_reduction,
)
from surgery.sae.extract import ExtractOptions, extract


@pytest.fixture(scope="module")
def world():
    loaded = load("builtin:world")
    return loaded, state_dict_hash(loaded.model)


def _sae(d: int, site: str, model_hash: str) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, expansion=4, kind="topk", k=12, site=site, tower="vision",
                                      model_hash=model_hash))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    return sae.eval()


def _same_report(a, b) -> None:
    assert a.groups == b.groups and a.samples_per_group == b.samples_per_group
    assert a.rule == b.rule and a.selected == b.selected
    for group in a.ranked:
        assert [r["id"] for r in a.ranked[group]] == [r["id"] for r in b.ranked[group]]
        for ra, rb in zip(a.ranked[group], b.ranked[group]):
            assert ra["score"] == pytest.approx(rb["score"], abs=1e-6)


@pytest.mark.parametrize("site,reduce", [("embedding", "pooled"), ("residual", "pooled"), ("residual", "max"),
                                         ("residual", "mean")])
def test_neurons_from_a_folder_cache_equal_neurons_from_the_images(world, tmp_path, site, reduce):
    (loaded, model_hash) = world
    images, labels_csv = labelled_image_folder(tmp_path, n=24)
    transform = image_transform(loaded.preprocess)
    cache = extract(loaded.model, Site("vision", site), open_source(images), str(tmp_path / "cache"), transform,
                    ExtractOptions(batch_size=5, unit_images=7), model_hash=model_hash,
                    preprocess=preprocess_key(loaded.preprocess)).cache
    sae = _sae(cache.d, site, model_hash)
    options = NeuronOptions(tau=0.4, top_n=4, token_reduce=reduce)
    direct = neurons_from_images(loaded.model, sae, images, labels_csv, "colour", transform, options)
    labels = {row["file"]: row["colour"] for row in csv.DictReader(open(labels_csv))}
    pooled = pooled_reduction(loaded.model, Site("vision", site)) if site == "residual" else "first"
    cached = neurons_from_cache(sae, cache, "colour", options, pooled_as=pooled, labels=labels)
    assert sum(len(v) for v in direct.ranked.values()) > 0  # something to compare
    _same_report(direct, cached)
    assert cached.source == "cache"


def test_neurons_from_shard_labels_equal_neurons_from_the_images(world, tmp_path):
    (loaded, model_hash) = world
    images, labels_csv = labelled_image_folder(tmp_path, n=20)
    labels = {row["file"]: row["colour"] for row in csv.DictReader(open(labels_csv))}
    names = sorted(labels)
    write_shards(images, tmp_path / "shards", names, per_shard=6, labels=labels)  # JSON {"group": colour}
    transform = image_transform(loaded.preprocess)
    cache = extract(loaded.model, Site("vision", "embedding"), open_source(str(tmp_path / "shards")),
                    str(tmp_path / "cache"), transform, model_hash=model_hash,
                    preprocess=preprocess_key(loaded.preprocess)).cache
    sae = _sae(cache.d, "embedding", model_hash)
    options = NeuronOptions(tau=0.4, top_n=4)
    direct = neurons_from_images(loaded.model, sae, images, labels_csv, "colour", transform, options)
    cached = neurons_from_cache(sae, cache, "group", options)
    direct.attribute = cached.attribute = "x"
    _same_report(direct, cached)
    with pytest.raises(SAEError, match="no sample of the cache has a 'race' label"):
        neurons_from_cache(sae, cache, "race", options)
    other_site = _sae(cache.d, "residual", model_hash)
    with pytest.raises(SAEError, match="reads vision/residual but the cache holds vision/embedding"):
        neurons_from_cache(other_site, cache, "group", options)


def test_sae_neurons_cli_reads_an_embed_cache(world, tmp_path):
    import json

    from click.testing import CliRunner

    from surgery.cli.main import main
    from surgery.sae import save_sae

    (loaded, model_hash) = world
    images, labels_csv = labelled_image_folder(tmp_path, n=16)
    runner = CliRunner()
    result = runner.invoke(main, ["embed", "builtin:world", "--images", images, "--site", "embedding",
                                  "--out", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    sae = _sae(64, "embedding", model_hash)
    save_sae(sae, str(tmp_path / "sae"))
    out = tmp_path / "neurons.json"
    result = runner.invoke(main, ["sae", "neurons", str(tmp_path / "sae"), "builtin:world", "--cache",
                                  str(tmp_path / "cache"), "--labels", labels_csv, "--attribute", "colour",
                                  "--tau", "0.4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["source"] == "cache" and written["groups"] == ["blue", "red"]
    assert written["samples_per_group"] == [8, 8]
    both = runner.invoke(main, ["sae", "neurons", str(tmp_path / "sae"), "builtin:world", "--cache",
                                str(tmp_path / "cache"), "--images", images, "--attribute", "colour", "--out", str(out)])
    assert both.exit_code == 2 and "--cache replaces --images" in both.output


def test_eval_reads_image_embeddings_from_an_embed_cache(tmp_path):
    import json

    from click.testing import CliRunner

    from surgery.cli.main import main

    runner = CliRunner()
    split = tmp_path / "split"
    assert runner.invoke(main, ["world", "generate", "--out", str(split), "--n", "120", "--like",
                                "builtin:world"]).exit_code == 0
    result = runner.invoke(main, ["embed", "builtin:world", "--images", str(split), "--site", "embedding",
                                  "--unit-images", "50", "--out", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    common = ["--images", str(split), "--labels", str(split / "labels.csv"), "--k", "20"]
    ran = runner.invoke(main, ["eval", "builtin:world", *common, "--out", str(tmp_path / "ran")])
    cached = runner.invoke(main, ["eval", "builtin:world", *common, "--embed-cache", str(tmp_path / "cache"),
                                  "--out", str(tmp_path / "cached")])
    assert ran.exit_code == 0 and cached.exit_code == 0, ran.output + cached.output
    a = json.loads((tmp_path / "ran" / "report.json").read_text())["before"]
    b = json.loads((tmp_path / "cached" / "report.json").read_text())["before"]
    assert a["n_images"] == b["n_images"] == 120
    assert a["zero_shot_accuracy"] == pytest.approx(b["zero_shot_accuracy"], abs=1e-9)
    for attribute in a["bias"]:
        for key in ("max_skew", "ndkl"):
            assert a["bias"][attribute][key] == pytest.approx(b["bias"][attribute][key], abs=1e-6), key
    other = runner.invoke(main, ["eval", "builtin:tiny", *common, "--embed-cache", str(tmp_path / "cache"),
                                 "--out", str(tmp_path / "other")])
    assert other.exit_code == 1 and "made from another model" in other.output
