"""Text-tower audit: prompt sets, scores (a, b, c, d), (d) against finite differences, (c) against a
naive re-run of the baked model, supervised CAVs, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery import metrics
from surgery.audit.cav import prompt_set, zero_shot_cavs
from surgery.audit.probe import ProbeSet
from surgery.audit.supervised import probe_image_embeddings, supervised_image_cavs, supervised_vision_scores
from surgery.audit.text import (
    TextAuditOptions,
    _Measure,
    audit_text,
    cav_projection,
    text_gradient_scores,
    text_head_means,
)
from surgery.audit.text_probe import TextAuditError, TextProbe, text_probe, world_text_probe
from surgery.edit.bake import bake
from surgery.edit.plan import HeadEdit, SurgeryPlan
from surgery.model.attention import head_masked
from surgery.model.preprocess import tokenize
from surgery.model.towers import get_towers
from surgery.world.checkpoint import world_params_of

QUERIES = ["a photo of a doctor", "a photo of a nurse", "a photo of a pilot", "a photo of a kind person"]


@pytest.fixture(scope="module")
def tiny_loaded():
    return surgery.load("builtin:tiny")


@pytest.fixture(scope="module")
def world():
    loaded = surgery.load("builtin:world")
    return loaded, world_params_of(loaded)


def _gender_probe():
    return text_probe("gender", prompt_set("gender"), QUERIES)


def _embed(model, tokenizer):
    return lambda texts: F.normalize(model.encode_text(tokenize(texts, tokenizer)), dim=-1)


def _image_probe(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ProbeSet(images=torch.randn(n, 3, 32, 32, generator=gen), groups=torch.arange(n) % 2,
                    group_names=["Male", "Female"], queries=QUERIES, group_prompts=["a man", "a woman"])


def test_prompt_sets():
    probe = _gender_probe()
    assert probe.group_names == ["Male", "Female"]
    assert "a photo of a doctor who is a man" in probe.prompts and "a portrait of a woman" in probe.prompts
    assert probe.groups.tolist().count(0) == probe.groups.tolist().count(1) == len(QUERIES) + len(probe.prompt_set["Male"])
    from surgery.world.params import WorldParams

    params = WorldParams()
    wp = world_text_probe(params)
    assert wp.queries[0] == "a photo of a circle" and "a photo of a red circle" in wp.prompts
    assert sorted(set(wp.group_names)) == sorted(params.groups)
    with pytest.raises(TextAuditError, match="at least 2 groups"):
        TextProbe(["q"], ["a"], torch.zeros(1, dtype=torch.long), ["a"], {"a": ["a"]})


def test_world_text_audit(world):
    loaded, params = world
    result = audit_text(loaded.model, loaded.tokenizer, world_text_probe(params), TextAuditOptions(top_k=2))
    assert set(result.scores) == {"cav", "group_acc", "gradient", "ablation"}
    assert all(s.shape == (2, 4) for s in result.scores.values())
    assert result.measure == "cav_projection" and result.baseline["cav_projection"] > 0
    assert -1 <= result.spearman_gradient_vs_ablation <= 1
    assert [(e.tower, e.layer, e.head) for e in result.plan.heads] == [("text", l, h) for l, h in result.cheap_rank[:2]]
    assert all(e.ablation == "mean" and len(e.mean) == 16 for e in result.plan.heads)
    result.plan.check_fits(loaded.model, None)
    record = result.to_dict()
    assert record["tower"] == "text" and len(record["heads"]) == 8 and "query_shift" in record["heads"][0]
    # the red/blue words: some text head separates the group-naming prompts perfectly
    assert float(result.scores["group_acc"].max()) == 1.0


def _bias_with_scales(model, tokens, scales, means, measure):
    """B with the text heads scaled by ``scales`` (L, H) along the mean-ablation direction: a plain re-run."""
    view = get_towers(model)["text"]
    with head_masked(model, towers=("text",), backend="math"), torch.no_grad():
        for layer, block in enumerate(view.blocks):
            block.attn.set_head_mask(scales[layer])
            block.attn.set_head_fill(means[layer])
        try:
            emb = F.normalize(model.encode_text(tokens), dim=-1)
        finally:
            for block in view.blocks:
                block.attn.set_head_mask(None)
                block.attn.set_head_fill(None)
    return measure.surrogate(emb, slice(0, tokens.shape[0]))


@pytest.mark.parametrize("with_images", [False, True])
def test_gradient_equals_finite_differences(tiny_loaded, with_images):
    model = copy.deepcopy(tiny_loaded.model).double()
    tok = tiny_loaded.tokenizer
    probe = _gender_probe()
    cavs = zero_shot_cavs(_embed(model, tok), probe.prompt_set)
    tokens = tokenize(probe.queries, tok)
    means = text_head_means(model, tokenize(probe.all_prompts(), tok)).double()
    with torch.no_grad():
        base = F.normalize(model.encode_text(tokens), dim=-1)
    images = None
    if with_images:
        gen = torch.Generator().manual_seed(3)
        images = (F.normalize(torch.randn(60, base.shape[1], generator=gen, dtype=torch.float64), dim=-1),
                  torch.arange(60) % 2, 2)
    measure = _Measure(cavs.directions.double(), images, 10, base)
    grad, value = text_gradient_scores(model, tokens, measure.surrogate, means, batch_size=3, backend="math")
    ones = torch.ones(2, 2, dtype=torch.float64)
    assert value == pytest.approx(float(_bias_with_scales(model, tokens, ones, means, measure)), rel=1e-9)
    eps = 1e-5
    fd = torch.zeros(2, 2)
    for l in range(2):
        for h in range(2):
            up, down = ones.clone(), ones.clone()
            up[l, h] += eps
            down[l, h] -= eps
            fd[l, h] = float(_bias_with_scales(model, tokens, up, means, measure)
                             - _bias_with_scales(model, tokens, down, means, measure)) / (2 * eps)
    assert fd.abs().max() > 1e-4  # not trivially zero
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_images", [False, True])
def test_ablation_equals_naive_rerun_of_the_baked_model(tiny_loaded, with_images):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    probe = _gender_probe()
    images = _image_probe() if with_images else None
    result = audit_text(model, tok, probe, TextAuditOptions(k=10, batch_size=3, backend="math"), images=images)
    assert result.measure == ("max_skew" if with_images else "cav_projection")
    cavs = zero_shot_cavs(_embed(model, tok), probe.prompt_set)
    tokens = tokenize(probe.queries, tok)
    img = probe_image_embeddings(model, images) if with_images else None

    def bias(m):
        with torch.no_grad():
            q = F.normalize(m.encode_text(tokens), dim=-1)
        if img is None:
            return float(cav_projection(q, cavs.directions))
        return float(metrics.max_skew_at_k(q @ img.T, images.groups, 10, 2).mean())

    base = bias(model)
    assert result.baseline[result.measure] == pytest.approx(base, abs=1e-6)
    for l in range(2):
        for h in range(2):
            edited = bake(copy.deepcopy(model),
                          SurgeryPlan(heads=[HeadEdit("text", l, h, 0.0, "mean", result.means[l, h].tolist())]))
            assert float(result.scores["ablation"][l, h]) == pytest.approx(base - bias(edited), abs=1e-5)


def test_supervised_cavs_vision_and_text(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    images = _image_probe(n=24)
    cavs = supervised_image_cavs(model, images)
    assert cavs.method == "supervised" and cavs.groups == ("Male", "Female")
    vision = supervised_vision_scores(model, images, cavs, batch_size=10)
    assert set(vision) == {"cav_supervised", "group_acc_supervised"} and vision["cav_supervised"].shape == (2, 4)
    result = audit_text(model, tok, _gender_probe(), TextAuditOptions(sweep=False), supervised=cavs)
    assert {"cav_supervised", "group_acc_supervised"} <= set(result.scores)
    assert result.supervised["method"] == "supervised" and "ablation" not in result.scores
    other = text_probe("race", prompt_set("race"), QUERIES[:1])  # group names unlike the labels': skipped
    result = audit_text(model, tok, other, TextAuditOptions(sweep=False), supervised=cavs)
    assert "cav_supervised" not in result.scores and "skipped" in result.supervised
    one_group = ProbeSet(images=torch.randn(4, 3, 32, 32), groups=torch.tensor([0, 1, 0, 1]),
                         group_names=["Male", "Female", "Other"], queries=QUERIES, group_prompts=["a", "b", "c"])
    with pytest.raises(TextAuditError, match="no samples labelled Other"):
        supervised_image_cavs(model, one_group)


def test_bad_input(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    with pytest.raises(TextAuditError, match="larger than the 40 probe images"):
        audit_text(model, tok, _gender_probe(), TextAuditOptions(k=50), images=_image_probe())
    with pytest.raises(TextAuditError, match="ablation must be"):
        TextAuditOptions(ablation="half")
    from surgery.audit.cav import CAVError

    with pytest.raises(CAVError, match="no prompts for attribute 'skin'"):
        prompt_set("skin")
