"""The audit's set-level plan helpers: the sweep's added-up prediction and the shortlist it orders."""
from __future__ import annotations

import torch

from surgery import metrics
from surgery.audit.ablation import SweepResult
from surgery.audit.head_set import additive_prediction, head_shortlist
from surgery.audit.probe import ProbeSet


def _probe(n: int, groups: int) -> ProbeSet:
    g = torch.arange(n) % groups
    return ProbeSet(images=torch.zeros(n, 3, 4, 4), groups=g, group_names=[f"g{i}" for i in range(groups)],
                    queries=["q0", "q1"], group_prompts=[f"p{i}" for i in range(groups)])


def _sweep(L=2, H=3, Q=2, N=40, seed=0) -> SweepResult:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(Q, N, generator=gen)
    scores = base + 0.5 * torch.randn(L, H, Q, N, generator=gen)
    return SweepResult(0.0, None, torch.zeros(L, H), None, scores=scores, base_scores=base)


def test_additive_prediction_adds_each_heads_per_image_change():
    probe, sweep = _probe(40, 2), _sweep()
    predict = additive_prediction(sweep, probe, k=10, n_queries=2)
    heads = [(0, 1), (1, 2)]
    added = sweep.base_scores + (sweep.scores[0, 1] - sweep.base_scores) + (sweep.scores[1, 2] - sweep.base_scores)
    want = float(metrics.max_skew_at_k(added, probe.groups, 10, 2).mean())
    assert predict(heads) == want
    # one head: exactly the sweep's own ablated scores
    assert predict([(1, 0)]) == float(metrics.max_skew_at_k(sweep.scores[1, 0], probe.groups, 10, 2).mean())


def test_shortlist_orders_by_prediction_and_keeps_confirm():
    probe, sweep = _probe(40, 2), _sweep(seed=3)
    predict = additive_prediction(sweep, probe, k=10, n_queries=2)
    open_ = [(l, h) for l in range(2) for h in range(3) if (l, h) != (0, 0)]
    got = head_shortlist(2, sweep, probe, 10, 2)([(0, 0)], open_)
    assert got == sorted(open_, key=lambda h: predict([(0, 0), h]))[:2]
    # without a sweep: the first `confirm` open heads, in the order given (the cheap ranking)
    assert head_shortlist(3)([], open_) == open_[:3]


def test_heads_the_shortlisted_sweep_skipped_come_after_the_swept_ones_in_open_order():
    probe, sweep = _probe(40, 2), _sweep(seed=3)
    swept = torch.tensor([[True, False, True], [False, True, False]])
    sweep.scores[~swept] = float("nan")  # what a shortlisted sweep leaves for the heads it skipped
    sweep.swept = swept
    predict = additive_prediction(sweep, probe, k=10, n_queries=2)
    assert predict([(0, 1)]) == predict([])  # a skipped head adds nothing to the prediction (not NaN)
    open_ = [(1, 2), (0, 1), (0, 2), (1, 1), (1, 0)]
    got = head_shortlist(4, sweep, probe, 10, 2)([(0, 0)], open_)
    ranked = sorted([(0, 2), (1, 1)], key=lambda h: predict([(0, 0), h]))
    assert got == ranked + [(1, 2), (0, 1)]
