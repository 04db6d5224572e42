"""eval / compare on a world split: embedding cache, reports, zero change against itself."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import surgery
from surgery.cli.main import main
from surgery.errors import DataError
from surgery.eval.compare import compare, write_report
from surgery.eval.embedding import EmbedOptions, embed_images
from surgery.eval.encoders import TorchEncoder
from surgery.eval.evaluate import evaluate, spec_from_folder
from surgery.io.metadata import META_MODEL_CONFIG
from surgery.metrics.bias import BiasConventions
from surgery.model.preprocess import image_transform, images_to_tensor
from surgery.world.generator import generate, write_split
from surgery.world.params import WorldParams


@pytest.fixture(scope="module")
def world_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "eval"
    write_split(generate(WorldParams(), "eval", 120), root)
    return root


@pytest.fixture
def tiny_encoder():
    return TorchEncoder(surgery.load("builtin:tiny"))


def _spec(world_split, k=10):
    return spec_from_folder(str(world_split / "images"), str(world_split / "labels.csv"),
                            conventions=BiasConventions(k=k))


def test_world_split_fills_in_the_spec(world_split):
    spec = _spec(world_split)
    assert spec.attributes == ["group"] and spec.concept_column == "concept"
    assert spec.queries[0] == "a photo of a circle" and spec.captions is not None


def test_png_path_equals_in_memory_preprocessing(world_split, tiny_encoder):
    """Embedding the written PNGs through open_clip's transform equals the training-time path."""
    split = generate(WorldParams(), "eval", 120)
    from PIL import Image

    transform = image_transform(tiny_encoder.preprocess)
    from_png = torch.stack([transform(Image.open(world_split / "images" / f).convert("RGB")) for f in split.files[:8]])
    in_memory = images_to_tensor(split.images[:8], tiny_encoder.preprocess)
    torch.testing.assert_close(from_png, in_memory, atol=1e-6, rtol=0)


def test_embedding_cache_hits_and_matches(world_split, tiny_encoder, tmp_path):
    files = sorted(p.name for p in (world_split / "images").iterdir())
    opt = EmbedOptions(batch_size=32, cache_dir=str(tmp_path / "cache"))
    first = embed_images(tiny_encoder, str(world_split / "images"), files, opt)
    second = embed_images(tiny_encoder, str(world_split / "images"), files, opt)
    assert not first.from_cache and second.from_cache
    assert torch.equal(first.embeddings, second.embeddings) and torch.equal(first.indices, second.indices)
    other = TorchEncoder(surgery.load("builtin:tiny"))
    with torch.no_grad():
        other.model.visual.proj.mul_(2)  # other weights -> other identity -> no stale cache hit
    third = embed_images(other, str(world_split / "images"), files, opt)
    assert not third.from_cache
    torch.testing.assert_close(third.embeddings, 2 * first.embeddings, atol=1e-5, rtol=1e-5)


def test_compare_with_itself_reports_zero_change(world_split, tiny_encoder):
    result = compare(tiny_encoder, tiny_encoder, _spec(world_split))
    assert result["rows"] and all(r["change"] == 0 for r in result["rows"])


def test_compare_with_one_head_zeroed_reports_a_change(world_split, tiny_encoder, tmp_path):
    model = surgery.load("builtin:tiny").model
    with torch.no_grad():  # zero head 0 of the last vision layer (its out_proj input columns)
        model.visual.transformer.resblocks[1].attn.out_proj.weight[:, 0:16] = 0
    path = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={META_MODEL_CONFIG: json.dumps(tiny_encoder.loaded.config)})
    pruned = TorchEncoder(surgery.load(str(path)))
    result = compare(tiny_encoder, pruned, _spec(world_split))
    assert any(r["change"] for r in result["rows"])
    paths = write_report(str(tmp_path / "rep"), result)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["report.json", "report.png", "report.md"]
    assert (tmp_path / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| group: mean MaxSkew@10 |" in (tmp_path / "rep" / "report.md").read_text()


def test_compare_of_a_text_only_edit_embeds_the_images_once_with_the_same_figures(world_split, tiny_encoder):
    """same_images=True (an edit that leaves the image tower as it was): one image pass, by the
    'before' encoder, and every figure equal to the two-pass comparison."""
    from surgery.edit.bake import bake
    from surgery.edit.plan import BalanceEdit, SurgeryPlan

    gen = torch.Generator().manual_seed(2)
    loaded = surgery.load("builtin:tiny")
    bake(loaded.model, SurgeryPlan(balance=[BalanceEdit("text", (0.3 * torch.randn(32, 2, generator=gen)).tolist(),
                                                        (torch.randn(32, 2, generator=gen) / 6).tolist())]))
    after = TorchEncoder(loaded)
    two_passes = compare(tiny_encoder, after, _spec(world_split))
    calls = []
    original = after.encode_images
    after.encode_images = lambda x: calls.append(len(x)) or original(x)
    one_pass = compare(tiny_encoder, after, _spec(world_split), same_images=True)
    assert calls == []  # the after encoder never ran on the images
    assert any(r["change"] for r in one_pass["rows"])  # the text edit shows
    for a, b in zip(one_pass["rows"], two_passes["rows"]):
        assert a["metric"] == b["metric"] and a["after"] == pytest.approx(b["after"], abs=1e-6), a["metric"]


def test_corrupt_images_are_skipped_and_listed(world_split, tiny_encoder, tmp_path):
    import shutil

    copy = tmp_path / "eval"
    shutil.copytree(world_split, copy)
    (copy / "images" / "000003.png").write_bytes(b"not a png")
    report = evaluate(tiny_encoder, _spec(copy))
    assert report["n_images"] == 119
    assert report["skipped"][0]["file"] == "000003.png"


def test_bad_inputs(world_split, tmp_path):
    with pytest.raises(DataError, match="larger than the 120 images"):
        _spec(world_split, k=500)
    bad = tmp_path / "labels.csv"
    bad.write_text("file,group\n000000.png,red\n000001.png,red\n")
    with pytest.raises(DataError, match="only one group"):
        spec_from_folder(str(world_split / "images"), str(bad))
    with pytest.raises(DataError, match="does not exist"):
        spec_from_folder(str(tmp_path / "nope"), str(bad))


def test_cli_world_generate_eval_compare(tmp_path):
    runner = CliRunner()
    out = tmp_path / "w"
    result = runner.invoke(main, ["world", "generate", "--out", str(out), "--n", "48", "--bias-strength", "0.8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "world.json").read_text())["params"]["bias_strength"] == 0.8
    args = ["--images", str(out / "images"), "--labels", str(out / "labels.csv"), "--k", "8"]
    result = runner.invoke(main, ["compare", "builtin:tiny", "builtin:tiny", *args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "| group: mean MaxSkew@8 |" in result.output and "+0.0000" in result.output
    result = runner.invoke(main, ["eval", "builtin:tiny", *args, "--k", "100", "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "larger than the 48 images" in result.output
    assert not (tmp_path / "r2").exists()  # nothing written on bad input
    result = runner.invoke(main, ["world", "generate", "--out", str(out), "--n", "48"])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_world_model_compare_against_itself_and_a_pruned_copy(world_split, tmp_path):
    """Issue 3's check on the bundled world model: itself -> zero change; one head zeroed -> a change."""
    world = TorchEncoder(surgery.load("builtin:world"))
    spec = _spec(world_split)
    same = compare(world, TorchEncoder(surgery.load("builtin:world")), spec)
    assert all(r["change"] == 0 for r in same["rows"])
    pruned = TorchEncoder(surgery.load("builtin:world"))
    with torch.no_grad():
        pruned.model.visual.transformer.resblocks[0].attn.out_proj.weight[:, 32:48] = 0  # layer 0, head 2
    changed = compare(world, pruned, spec)
    skew = next(r for r in changed["rows"] if r["metric"].startswith("group: mean MaxSkew"))
    assert skew["change"] != 0


def test_query_cuts_report_each_query_and_the_worst():
    from surgery.eval.compare import format_query_cuts, query_cuts

    before = {"queries": ["q0", "q1", "q2"],
              "bias": {"group": {"max_skew": 0.6, "per_query": {"max_skew": [0.9, 0.6, 0.0]}}}}
    after = {"bias": {"group": {"max_skew": 0.3, "per_query": {"max_skew": [0.18, 0.6, 0.1]}}}}
    cuts = query_cuts(before, after)["group"]
    assert [r["cut"] for r in cuts["queries"]] == [pytest.approx(0.8), pytest.approx(0.0), None]  # no skew: no cut
    assert cuts["mean_cut"] == pytest.approx(0.5)
    assert cuts["worst_cut"] == pytest.approx(0.0) and cuts["worst_query"] == "q1"  # untouched by the edit
    line = format_query_cuts({"group": cuts}, 50)[0]
    assert line == "group: MaxSkew@50 cut 50.0% on the mean, 0.0% on the worst query (q1)"
