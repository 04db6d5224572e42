"""The audit's proposed plan, chosen at set level: greedy forward selection of heads to remove
(:func:`surgery.audit.set_search.forward_select`), each set measured by a forward pass on the probe,
within a concept-accuracy budget.

Candidates per step: the ``confirm`` open heads whose added-up single-head per-image score changes
(from the causal sweep (c)) predict the lowest mean MaxSkew@K together with the heads already
chosen, or, without a sweep, the first ``confirm`` open heads of the cheap ranking. The
prediction only orders what is measured; what is kept is always measured.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgery import metrics
from surgery.audit.ablation import SweepResult, evaluate_head_set
from surgery.audit.probe import ProbeSet
from surgery.audit.set_search import Selection, forward_select

Head = tuple[int, int]


@dataclass
class HeadSetOptions:
    size: int = 3  # heads in the proposed set (fewer when no further head lowers bias within budget)
    k: int = 50  # MaxSkew@K
    max_accuracy_drop: float = 0.02  # concept accuracy (fraction) a chosen set may lose, when measurable
    confirm: int = 16  # heads measured per step (all of a model with <= 16 heads)
    batch_size: int = 256


def additive_prediction(sweep: SweepResult, probe: ProbeSet, k: int, n_queries: int):
    """``predict(heads) -> mean MaxSkew@K`` from the sweep's single-head per-image score changes,
    added up (a head the sweep did not ablate adds nothing: its effect is unknown, not zero, so
    :func:`head_shortlist` measures such heads only after the swept ones)."""
    base = sweep.base_scores[:n_queries]  # (Q, N)
    delta = torch.nan_to_num(sweep.scores[:, :, :n_queries] - base, nan=0.0)  # (L, H, Q, N)
    n_groups = len(probe.group_names)

    def predict(heads: Sequence[Head]) -> float:
        scores = base + sum((delta[h] for h in heads), torch.zeros_like(base))
        return float(metrics.max_skew_at_k(scores, probe.groups, k, n_groups).mean())

    return predict


def head_shortlist(confirm: int, sweep: SweepResult | None = None, probe: ProbeSet | None = None, k: int = 50,
                   n_queries: int = 0):
    """``shortlist(chosen, open) -> heads to measure``: the ``confirm`` open heads whose added-up
    single-head changes (``sweep`` on ``probe``) predict the lowest mean MaxSkew@K together with
    ``chosen``, then heads the sweep did not ablate in ``open``'s order; without a sweep, the first
    ``confirm`` of ``open`` (keep it in ranking order)."""
    if sweep is None:
        return lambda chosen, open_: list(open_)[:confirm]
    predict = additive_prediction(sweep, probe, k, n_queries)

    def shortlist(chosen, open_):
        swept = sorted((h for h in open_ if sweep.was_swept(h)), key=lambda h: predict(list(chosen) + [h]))
        return (swept + [h for h in open_ if not sweep.was_swept(h)])[:confirm]
    return shortlist


def propose_head_set(model: nn.Module, probe: ProbeSet, means: torch.Tensor | None, query_emb: torch.Tensor,
                     class_emb: torch.Tensor | None, ranked: Sequence[Head], options: HeadSetOptions | None = None,
                     sweep: SweepResult | None = None) -> Selection[Head]:
    """Remove heads one at a time, each the one whose removal (measured) lowers mean MaxSkew@K the
    most while concept accuracy stays within budget. ``ranked``: every head, cheap ranking first."""
    opt = options or HeadSetOptions()
    shortlist = head_shortlist(opt.confirm, sweep, probe, opt.k, query_emb.shape[0])

    def evaluate(heads: list[Head]) -> dict:
        return evaluate_head_set(model, probe, heads, means, query_emb, class_emb, opt.k, opt.batch_size)

    before = evaluate([])

    def allowed(figures: dict) -> bool:
        return before.get("accuracy", 0.0) - figures.get("accuracy", 0.0) <= opt.max_accuracy_drop + 1e-9

    return forward_select(list(ranked), evaluate, objective=lambda f: f["max_skew"], allowed=allowed,
                          done=lambda f: False, max_size=opt.size, shortlist=shortlist, start=before,
                          describe=lambda h: {"head": list(h)})
