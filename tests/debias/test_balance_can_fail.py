"""Issue 29, tests that cannot fail: each test here fails a one-line mutation of the balance edit
that every earlier balance test let through (named in its docstring)."""
from __future__ import annotations

import torch

import surgery.debias.balance as balance_module
from surgery.debias.balance import BalanceOptions, Draw, Texts, fit_balance, held_out_queries
from surgery.edit.bake import balance_map


def _planted(seed: int, n_groups: int = 3, n: int = 600, dim: int = 14, concepts: int = 4):
    """Each concept is recognised most strongly in one group and least in another (strength 1.0 /
    0.75 / 0.55 for three groups), the images carry a group direction each. Returns (queries, draw)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)))[0]
    concept_dirs, group_dirs = basis[:concepts], basis[concepts:concepts + n_groups]
    c = torch.arange(n) % concepts
    g = (torch.arange(n) // concepts) % n_groups
    strengths = torch.tensor([1.0, 0.75, 0.55, 0.45][:n_groups])
    strength = strengths[(g + c) % n_groups][:, None]  # which group is favoured rotates with the concept
    x = strength * concept_dirs[c] + 0.5 * group_dirs[g] + 0.3 * torch.randn(n, dim, generator=gen)
    return concept_dirs.clone(), Draw(x, g)


def _texts(queries, seed=3, anchor_weight=100.0, anchors=None):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(30, queries.shape[1], generator=gen)
    weights = torch.ones(len(pool))
    if anchors is not None:
        pool, weights = torch.cat([pool, anchors]), torch.cat([weights, torch.full((len(anchors),), anchor_weight)])
    return Texts(queries, pool, weights)


def test_held_out_rows_are_never_in_the_fit_that_measures_them(monkeypatch):
    """Mutation: every fold fitted on all queries (the cut read 0.77 instead of an honest 0.09)."""
    queries, draw = _planted(0, n_groups=2)
    seen: list[set[int]] = []
    real = balance_module.fit_balance

    def spy(texts, draws, n_groups, options):
        rows = {int(i) for i in (texts.queries[:, None, :] == queries[None]).all(-1).nonzero()[:, 1]}
        assert len(rows) == len(texts.queries)  # every fitted row is one of the queries
        seen.append(rows)
        return real(texts, draws, n_groups, options)

    monkeypatch.setattr(balance_module, "fit_balance", spy)
    result = held_out_queries(_texts(queries), ["q0", "q1", "q2", "q3"], [draw], 2, BalanceOptions(k=40))
    assert len(seen) == 2 and seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(4))
    assert result.cut is not None


def test_three_groups_every_group_is_balanced_on_both_sides():
    """Mutations: only the last group constrained (``means[:, -1:] - means[:, :1]``), and the image
    side never checked against its constraints."""
    queries, draw = _planted(0)
    for side in ("text", "image"):
        fit = fit_balance(_texts(queries), [draw], 3, BalanceOptions(k=60, side=side))
        assert min(fit.gaps_before) > 0.05, side
        assert max(fit.gaps_after) < 0.1 * min(fit.gaps_before), (side, fit.gaps_after, fit.gaps_before)
        assert fit.map.constraints == len(queries) * 2


def test_the_plan_written_is_the_map_fitted():
    """Mutation: u and v swapped in BalanceFit.edit (the plan would carry A^T, not A)."""
    queries, draw = _planted(0)
    for side in ("text", "image"):
        fit = fit_balance(_texts(queries), [draw], 3, BalanceOptions(k=60, side=side))
        edit = fit.edit({"queries": ["a", "b", "c", "d"], "groups": ["x", "y", "z"]})
        apply = balance_map(edit)
        probe = torch.randn(5, queries.shape[1], generator=torch.Generator().manual_seed(4))
        want = fit.apply_texts(probe) if side == "text" else fit.apply_images(probe)
        torch.testing.assert_close(apply(probe), want, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(want, probe, atol=1e-3)  # the map does something


def test_anchor_weights_hold_the_anchors_still():
    """Mutations: the anchors weighed 1 (or 0) instead of anchor_weight, or the weights ignored
    in Sigma: anchors then move as much as any text."""
    queries, draw = _planted(0)
    anchors = torch.nn.functional.normalize(
        queries[:2] + 0.5 * torch.randn(2, queries.shape[1], generator=torch.Generator().manual_seed(5)), dim=-1)
    moved = {}
    for weight in (0.0, 1.0, 100.0):
        fit = fit_balance(_texts(queries, anchor_weight=weight, anchors=anchors), [draw], 3, BalanceOptions(k=60))
        moved[weight] = float((fit.apply_texts(anchors) - anchors).norm(dim=-1).max())
    assert moved[100.0] < 0.5 * moved[1.0] and moved[1.0] < moved[0.0], moved


def test_the_debias_pool_weighs_anchors_at_anchor_weight():
    """Mutations: balance_candidate weighting captions or group prompts 1 (or class prompts 100), or
    the default anchor weight changed from the 100 the README documents."""
    from surgery.debias.pipeline import DebiasOptions, balance_candidate
    from surgery.debias.probes import Prompts

    dim = 6
    prompts = Prompts(queries=torch.eye(dim)[:2], classes=torch.eye(dim)[:3], captions=[None],
                      groups=torch.eye(dim)[3:5], distinct_captions=torch.eye(dim)[:4])
    candidate = balance_candidate(prompts, DebiasOptions())  # the default weight, 100 (README, "The balance edit")
    assert candidate.pool_weights.tolist() == [1.0] * 3 + [100.0] * 4 + [100.0] * 2
    assert torch.equal(candidate.pool, torch.cat([prompts.classes, prompts.distinct_captions, prompts.groups]))
