"""SurgeryPlan validation and exact baking: baked weights == runtime head masks."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import assert_same_embeddings

import surgery
from surgery.edit.bake import apply_runtime, bake
from surgery.edit.plan import SCHEMA, BalanceEdit, HeadEdit, PlanError, SurgeryPlan
from surgery.model.tiny import build_tiny_clip


def _plan(**kw):
    heads = kw.pop("heads", [{"tower": "vision", "layer": 1, "head": 2, "scale": 0.0}])
    return SurgeryPlan.from_dict({"schema": SCHEMA, "source": kw.pop("source", {}), "heads": heads})


@pytest.mark.parametrize(
    "heads, message",
    [
        ([{"tower": "audio", "layer": 0, "head": 0}], "unknown tower 'audio'"),
        ([{"tower": "vision", "layer": 0, "head": 0, "scale": 1.5}], r"scale must be in \[0, 1\]"),
        ([{"tower": "vision", "layer": -1, "head": 0}], "layer must be an integer >= 0"),
        ([{"tower": "vision", "layer": 0, "head": 0, "ablation": "noise"}], "ablation must be one of zero, mean"),
        ([{"tower": "vision", "layer": 0, "head": 0, "ablation": "mean"}], "needs the head's mean output"),
        ([{"tower": "vision", "layer": 0}], "missing head"),
        ([{"tower": "vision", "layer": 0, "head": 0, "gain": 2}], "unknown keys gain"),
        ([{"tower": "vision", "layer": 0, "head": 1}, {"tower": "vision", "layer": 0, "head": 1}], "appears twice"),
    ],
)
def test_malformed_plans(heads, message):
    with pytest.raises(PlanError, match=message):
        _plan(heads=heads)


def test_plan_that_does_not_fit_the_model(tiny):
    model, _ = tiny
    with pytest.raises(PlanError, match=r"layer 5 is out of range \(0..1\)"):
        _plan(heads=[{"tower": "vision", "layer": 5, "head": 0}]).check_fits(model, None)
    with pytest.raises(PlanError, match=r"head 4 is out of range \(0..3\)"):
        _plan(heads=[{"tower": "vision", "layer": 0, "head": 4}]).check_fits(model, None)
    with pytest.raises(PlanError, match="mean has 3 values; the head width is 16"):
        _plan(heads=[{"tower": "vision", "layer": 0, "head": 0, "ablation": "mean", "mean": [0, 0, 0]}]).check_fits(model, None)
    plan = _plan(source={"sha256": "a" * 64})
    with pytest.raises(PlanError, match="pass --force"):
        plan.check_fits(model, "b" * 64)
    plan.check_fits(model, "b" * 64, force=True)


def test_save_load_merge(tmp_path):
    plan = _plan(source={"sha256": "x"})
    path = tmp_path / "plan.json"
    plan.save(str(path))
    assert SurgeryPlan.load(str(path)).to_dict() == plan.to_dict()
    other = _plan(heads=[{"tower": "text", "layer": 0, "head": 1, "scale": 0.5}], source={"sha256": "x"})
    merged = plan.merged(other)
    assert [(h.tower, h.layer, h.head) for h in merged.heads] == [("vision", 1, 2), ("text", 0, 1)]
    with pytest.raises(PlanError, match="appears twice"):
        plan.merged(plan)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        SurgeryPlan.load(str(tmp_path / "bad.json"))


def _balance(tower, dim=32, rank=3, seed=7):
    """A random low-rank map e -> (I + U V^T) e of a tower's (dim,) output embedding."""
    gen = torch.Generator().manual_seed(seed)
    u, v = 0.3 * torch.randn(dim, rank, generator=gen), torch.randn(dim, rank, generator=gen) / dim ** 0.5
    return BalanceEdit(tower, u.tolist(), v.tolist(), {"queries": ["q1", "q2", "q3"], "groups": ["a", "b"]})


def _mixed_plan(d_vision=16, d_text=16, balance=True):
    gen = torch.Generator().manual_seed(5)
    return SurgeryPlan(heads=[
        HeadEdit("vision", 0, 1, 0.0, "zero"),  # seed 002's pruning
        HeadEdit("vision", 1, 2, 0.3, "zero"),  # soft
        HeadEdit("vision", 1, 0, 0.25, "mean", torch.randn(d_vision, generator=gen).tolist()),
        HeadEdit("text", 1, 1, 0.0, "mean", torch.randn(d_text, generator=gen).tolist()),
        HeadEdit("text", 0, 0, 0.6, "zero"),
    ], balance=[_balance("text"), _balance("vision", seed=8)] if balance else []).validate()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_baked_equals_runtime_masked(tiny, images, tokens, backend):
    """Compared in float64: baking is exact, so the two agree to float64 rounding (about 1e-15 here).
    In float32 they differ by float32 rounding of two different op orders (the folded projection
    against the map after it: up to 26 ulps of a 0.5 entry, 1.55e-6, on the math backend), a bound
    that says nothing about exactness; float64 does (a scale held as float32 in the runtime mask
    showed as 1e-8 here, hidden in float32)."""
    model, _ = tiny
    plan = _mixed_plan()
    model64 = copy.deepcopy(model).double()
    runtime = apply_runtime(copy.deepcopy(model64), plan, backend=backend)
    baked = bake(copy.deepcopy(model64), plan)
    assert_same_embeddings(runtime, baked, images.double(), tokens, atol=1e-12)
    baked = bake(copy.deepcopy(model), plan)  # the float32 model, as exported
    # and the plan does something
    with torch.no_grad():
        assert (baked.encode_image(images) - model.encode_image(images)).abs().max() > 1e-3
        assert (baked.encode_text(tokens) - model.encode_text(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_a_baked_balance_edit_equals_the_map_on_the_embeddings(tiny, images, tokens, tower):
    """The projection folds e -> e + U V^T e exactly: the baked tower's embedding is the map of the
    original one (float64 reference), and the other tower is untouched."""
    model, _ = tiny
    edit = _balance(tower)
    baked = bake(copy.deepcopy(model), SurgeryPlan(balance=[edit]).validate())
    u, v = torch.tensor(edit.u, dtype=torch.float64), torch.tensor(edit.v, dtype=torch.float64)
    with torch.no_grad():
        before = {"vision": model.encode_image(images), "text": model.encode_text(tokens)}
        after = {"vision": baked.encode_image(images), "text": baked.encode_text(tokens)}
    expected = (before[tower].double() + before[tower].double() @ v @ u.T).float()
    torch.testing.assert_close(after[tower], expected, atol=1e-6, rtol=1e-6)
    assert (after[tower] - before[tower]).abs().max() > 1e-2  # the map does something
    other = "text" if tower == "vision" else "vision"
    assert torch.equal(after[other], before[other])


def test_a_balance_edit_folds_into_a_linear_projection():
    """Text towers with an nn.Linear projection (e = W x + b): W and b both take the map."""
    from torch import nn

    from surgery.edit.bake import balance_map, fold_balance

    edit = _balance("text", dim=8, rank=2)
    proj = nn.Linear(5, 8)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = balance_map(edit)(proj(x))
        fold_balance(proj, edit)
        torch.testing.assert_close(proj(x), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(PlanError, match="8-dimensional but the text embedding has 5"):
        fold_balance(nn.Linear(8, 5), edit)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"u": [[float("nan")] * 3] * 32}, "finite numbers only"),
        ({"u": [[0.0] * 2] * 32}, "u is 32 x 2 but v is 32 x 3"),
        ({"v": [[0.0] * 3, [0.0] * 2]}, "rows of one length"),
        ({"u": []}, "non-empty list of rows"),
        ({"tower": "audio"}, "unknown tower 'audio'"),
        ({"provenance": {"queries": ["q"], "groups": ["a", "b"]}}, r"rank 3 is above queries x \(groups - 1\) = 1"),
        ({"u": "[[1]]"}, "non-empty list of rows"),
    ],
)
def test_malformed_balance_edits(change, message):
    entry = {**_balance("text").__dict__, **change}
    with pytest.raises(PlanError, match=message):
        SurgeryPlan.from_dict({"schema": SCHEMA, "balance": [entry]})


def test_balance_plans_round_trip_and_refuse_what_does_not_fit(tiny, tmp_path):
    model, _ = tiny
    plan = _mixed_plan()
    path = tmp_path / "plan.json"
    plan.save(str(path))
    loaded = SurgeryPlan.load(str(path))
    assert loaded.to_dict() == plan.to_dict() and len(loaded.balance) == 2
    loaded.check_fits(model, None)
    with pytest.raises(PlanError, match="the map is 8-dimensional but the text embedding has 32"):
        SurgeryPlan(balance=[_balance("text", dim=8, rank=2)]).validate().check_fits(model, None)
    with pytest.raises(PlanError, match="a second balance edit of the text tower"):
        SurgeryPlan(balance=[_balance("text"), _balance("text", seed=9)]).validate()
    old = json.loads(path.read_text())
    old.pop("balance")
    old["schema"] = "clipsurgery.plan/1"  # plans written before balance edits still load
    assert SurgeryPlan.from_dict(old).heads == plan.heads


def test_zero_scale_zero_ablation_zeroes_the_out_proj_columns(tiny):
    model, _ = tiny
    before = model.visual.transformer.resblocks[1].attn.out_proj.weight.clone()
    bias_before = model.visual.transformer.resblocks[1].attn.out_proj.bias.clone()
    bake(model, _plan())
    after = model.visual.transformer.resblocks[1].attn.out_proj.weight
    assert after[:, 32:48].abs().max() == 0  # head 2 of width 16
    assert torch.equal(after[:, :32], before[:, :32]) and torch.equal(after[:, 48:], before[:, 48:])
    assert torch.equal(model.visual.transformer.resblocks[1].attn.out_proj.bias, bias_before)  # untouched


def test_baked_model_is_a_plain_open_clip_model(tiny, tmp_path, registered_tiny, images, tokens):
    """open_clip alone (no clipsurgery import) loads the baked safetensors and gives the same
    embeddings, image and text (the plan edits both towers: heads and a balance map each)."""
    import subprocess
    import sys

    from surgery.export.safetensors import export_safetensors

    loaded = surgery.load("builtin:tiny")
    bake(loaded.model, _mixed_plan())
    out = tmp_path / "baked.safetensors"
    export_safetensors(loaded, str(out), _mixed_plan())
    torch.save(images, tmp_path / "images.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "Tiny-Plain.json").write_text(json.dumps(loaded.config))
    script = f"""
import sys, torch, open_clip
open_clip.add_model_config({str(cfg_dir)!r})
model = open_clip.create_model("Tiny-Plain", pretrained={str(out)!r})
assert "surgery" not in sys.modules
images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True)
tokens = torch.load({str(tmp_path / 'tokens.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.save(model.eval().encode_image(images), {str(tmp_path / 'emb.pt')!r})
    torch.save(model.encode_text(tokens), {str(tmp_path / 'text.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    theirs = torch.load(tmp_path / "emb.pt", weights_only=True)
    with torch.no_grad():
        ours = loaded.model.encode_image(images)
        ours_text = loaded.model.encode_text(tokens)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "text.pt", weights_only=True), ours_text, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # and the text tower was edited (a plain model that dropped it would differ)
        assert (ours_text - surgery.load("builtin:tiny").model.encode_text(tokens)).abs().max() > 1e-3
    restored = surgery.load(str(out))
    assert restored.metadata["plan"]["heads"][0]["layer"] == 0
    with torch.no_grad():
        torch.testing.assert_close(restored.model.encode_image(images), ours, atol=0, rtol=0)


def test_mean_ablation_with_learned_head_scale_bakes_exactly(images, tokens):
    """open_clip's learned head_scale is part of the head's output (and of its mean)."""
    from surgery.audit.ablation import head_means
    from surgery.audit.probe import ProbeSet

    model, _ = build_tiny_clip(seed=7, vision_cfg={"scale_heads": True})
    with torch.no_grad():
        surgery.get_towers(model)["vision"].attention(1).head_scale.copy_(torch.tensor([0.5, 2.0, 1.5, 0.7]).view(4, 1, 1))
    probe = ProbeSet(images=images, groups=torch.tensor([0, 1, 0]), group_names=["a", "b"], queries=["q"],
                     group_prompts=["a", "b"])
    means = head_means(model, probe)
    plan = SurgeryPlan(heads=[HeadEdit("vision", 1, 1, 0.3, "mean", means[1, 1].tolist())]).validate()
    runtime = apply_runtime(copy.deepcopy(model), plan)
    baked = bake(copy.deepcopy(model), plan)
    assert_same_embeddings(runtime, baked, images, tokens, atol=1e-6)


def test_inner_attention_norm_is_refused():
    model, _ = build_tiny_clip(seed=0, vision_cfg={"scale_attn_inner": True})
    with pytest.raises(surgery.UnsupportedTowerError, match="cannot be baked exactly"):
        bake(model, SurgeryPlan(heads=[HeadEdit("vision", 0, 0, 0.0)]))


def test_bake_copy_equals_a_baked_deep_copy_and_shares_every_tensor_the_plan_leaves_alone(tiny, images, tokens):
    from surgery.edit.bake import bake_copy, touched_tensors

    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _mixed_plan()
    cheap = bake_copy(model, plan)
    assert_same_embeddings(cheap, bake(copy.deepcopy(model), plan), images, tokens, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    touched = {id(t) for t in touched_tensors(model, plan)}
    layers = {(e.tower, e.layer) for e in plan.heads}
    assert len(touched) == 2 * len(layers) + 2  # out_proj weight and bias per edited layer; both projections
    mine, theirs = dict(model.named_parameters()), dict(cheap.named_parameters())
    for name, param in mine.items():
        assert (theirs[name] is param) == (id(param) not in touched), name
