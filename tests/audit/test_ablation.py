"""Audit scores (c) and (d): the activation-reusing sweep equals naive full passes; the gradient
equals finite differences of the surrogate."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import random_probe, unit_texts

import surgery
from surgery import metrics
from surgery.audit.ablation import (
    SweepOptions,
    ablation_sweep,
    gradient_scores,
    head_means,
    soft_max_skew,
    soft_topk_params,
)
from surgery.model.tiny import build_tiny_clip


@pytest.fixture
def probe():
    return random_probe(40)


def _texts(dim, count, seed):
    return unit_texts(dim, count, seed)


def _naive(model, probe, queries, classes, means, ablation, k):
    """Reference: one full forward pass per head with the runtime mask."""
    L, H = 2, 4
    skews, accs = torch.zeros(L, H), torch.zeros(L, H)
    scores = torch.zeros(L, H, len(queries) + len(classes), len(probe))
    surgery.swap_attention(model, towers=("vision",), backend="math")
    mods = surgery.masked_modules(model, "vision")
    for layer in range(L):
        for head in range(H):
            scale = torch.ones(H)
            scale[head] = 0
            mods[layer].set_head_mask(scale)
            mods[layer].set_head_fill(means[layer] if ablation == "mean" else None)
            with torch.no_grad():
                emb = F.normalize(model.encode_image(probe.images), dim=-1)
            mods[layer].set_head_mask(None)
            mods[layer].set_head_fill(None)
            skews[layer, head] = metrics.max_skew_at_k(queries @ emb.T, probe.groups, k, 2).mean()
            accs[layer, head] = ((classes @ emb.T).argmax(0) == probe.concepts).double().mean()
            scores[layer, head] = torch.cat([queries, classes]) @ emb.T
    surgery.restore_attention(model)
    return skews, accs, scores


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_sweep_with_activation_reuse_equals_naive_passes(probe, ablation):
    model, _ = build_tiny_clip(seed=0)
    queries, classes = _texts(32, 3, 1), _texts(32, 4, 2)
    means = head_means(model, probe, batch_size=16)
    assert means.shape == (2, 4, 16)
    result = ablation_sweep(model, probe, queries, classes, means,
                            SweepOptions(batch_size=16, k=10, ablation=ablation, backend="math"))
    want_skew, want_acc, want_scores = _naive(copy.deepcopy(model), probe, queries, classes, means, ablation, 10)
    torch.testing.assert_close(result.max_skew, want_skew, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.accuracy, want_acc.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.scores, want_scores, atol=1e-5, rtol=0)  # per-head scores kept for analysis
    with torch.no_grad():
        unedited = F.normalize(model.encode_image(probe.images), dim=-1)
    torch.testing.assert_close(result.base_scores, torch.cat([queries, classes]) @ unedited.T, atol=1e-5, rtol=0)
    assert result.max_skew.std() > 0  # heads differ


def test_a_shortlisted_sweep_equals_the_full_sweep_on_the_heads_it_ablates(probe):
    """--sweep-top: only the listed heads are ablated (a layer with none is not re-run); their
    figures equal the full sweep's, the others are NaN and ``swept`` says which ran."""
    model, _ = build_tiny_clip(seed=0)
    queries, classes = _texts(32, 3, 1), _texts(32, 4, 2)
    means = head_means(model, probe, batch_size=16)
    options = SweepOptions(batch_size=16, k=10, backend="math")
    full = ablation_sweep(model, probe, queries, classes, means, options)
    heads = [(1, 3), (1, 0)]  # none of layer 0
    short = ablation_sweep(model, probe, queries, classes, means, options, heads=heads)
    assert short.swept.tolist() == [[False] * 4, [True, False, False, True]]
    assert full.swept is None and full.was_swept((0, 0)) and not short.was_swept((0, 0))
    for layer, head in heads:
        assert short.max_skew[layer, head] == full.max_skew[layer, head]
        assert short.accuracy[layer, head] == full.accuracy[layer, head]
        torch.testing.assert_close(short.scores[layer, head], full.scores[layer, head], atol=1e-6, rtol=0)
    assert torch.isnan(short.max_skew[0]).all() and torch.isnan(short.scores[0]).all()
    assert torch.isnan(short.bias_removed[1, 1]) and not torch.isnan(short.bias_removed[1, 3])
    torch.testing.assert_close(short.base_scores, full.base_scores)


def test_head_means_match_captured_outputs(probe):
    model, _ = build_tiny_clip(seed=0)
    means = head_means(model, probe, batch_size=7)
    surgery.swap_attention(model, backend="math")
    attn = surgery.masked_modules(model, "vision")[0]
    attn.capture = True
    with torch.no_grad():
        model.encode_image(probe.images)
    torch.testing.assert_close(means[0], attn.captured.mean((0, 2)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_means", [True, False])
def test_gradient_equals_finite_differences(probe, use_means):
    model, _ = build_tiny_clip(seed=0)
    model = model.double()
    probe.images = probe.images.double()
    queries = _texts(32, 3, 1).double()
    means = head_means(model, probe, batch_size=16).double() if use_means else None
    grad, s0 = gradient_scores(model, probe, queries, means, k=10, batch_size=16, backend="math")
    with torch.no_grad():
        base = queries @ F.normalize(model.encode_image(probe.images), dim=-1).T
    threshold, tau = soft_topk_params(base, 10)  # the surrogate's constants, fixed at the unedited model
    surgery.swap_attention(model, towers=("vision",), backend="math")
    mods = surgery.masked_modules(model, "vision")

    def surrogate(layer, head, scale):
        m = torch.ones(4, dtype=torch.float64)
        m[head] = scale
        mods[layer].set_head_mask(m)
        mods[layer].set_head_fill(means[layer] if means is not None else None)
        with torch.no_grad():
            emb = F.normalize(model.encode_image(probe.images), dim=-1)
        mods[layer].set_head_mask(None)
        mods[layer].set_head_fill(None)
        return float(soft_max_skew(queries @ emb.T, probe.groups, 2, threshold, tau))

    assert abs(surrogate(0, 0, 1.0) - s0) < 1e-12
    assert grad.abs().max() > 1e-4  # a real signal to compare
    eps = 1e-5
    for layer, head in [(0, 1), (1, 3), (1, 0)]:
        fd = (surrogate(layer, head, 1 + eps) - surrogate(layer, head, 1 - eps)) / (2 * eps)
        assert abs(fd - grad[layer, head].item()) <= 1e-6 * max(1.0, abs(fd)), (layer, head, fd, grad[layer, head])


def test_soft_max_skew_tracks_the_hard_metric():
    """Balanced top-K -> ~0; one group only -> ~ln 2 (the hard MaxSkew@K for 2 groups)."""
    groups = torch.arange(100) % 2
    balanced = torch.linspace(1, 0, 100).unsqueeze(0)  # alternating groups down the ranking
    one_sided = torch.where(groups == 0, 1.0 + torch.linspace(0, 0.1, 100), torch.linspace(0, 0.1, 100)).unsqueeze(0)
    for scores, want in ((balanced, 0.0), (one_sided, torch.log(torch.tensor(2.0)).item())):
        t, tau = soft_topk_params(scores, 10)
        got = float(soft_max_skew(scores, groups, 2, t, tau))
        assert abs(got - want) < 0.05, (got, want)
