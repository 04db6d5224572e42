"""Choose the edits: from audit scores to the fewest head edits that meet the targets.

Heads are tried in the audit's cheap-score order (mean rank of (a), (b), (d)); each candidate set
is confirmed with real forward passes on the selection probe set. A head whose ablation alone
costs more concept accuracy than allowed is skipped. The search stops at the first set that
meets both targets (bias ratio and accuracy drop), or reports the best it found.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.audit.ablation import evaluate_head_set
from surgery.audit.probe import ProbeSet
from surgery.audit.vision import AuditResult
from surgery.debias.budget import Budget
from surgery.edit.plan import HeadEdit, SurgeryPlan

log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    budget: Budget = field(default_factory=Budget)  # the bias target and the accuracy / recall budgets
    max_heads: int = 8  # never edit more heads than this
    scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)  # kept fractions tried for each head (0 = removed)
    k: int = 50  # MaxSkew@K
    ablation: str = "mean"  # how edited heads are removed


@dataclass
class SearchResult:
    heads: dict[tuple[int, int], float]  # (layer, head) -> kept scale
    met: bool  # both targets met on the selection probe set
    before: dict  # {"max_skew", "accuracy"}
    after: dict
    steps: list[dict] = field(default_factory=list)  # every candidate tried, for the plan's provenance


def evaluate_on_draws(model: nn.Module, probes: Sequence[ProbeSet], heads, means, query_emb: torch.Tensor,
                      class_emb: torch.Tensor | None, k: int, post=None,
                      caption_embs: Sequence[torch.Tensor | None] | None = None) -> dict:
    """``evaluate_head_set`` averaged over several probe sets (independent draws): mean MaxSkew@K
    of one draw is a noisy objective that a greedy search would otherwise fit. ``caption_embs``:
    per draw, its images' caption embeddings (N, D) or None (adds ``recall``)."""
    captions = list(caption_embs) if caption_embs is not None else [None] * len(probes)
    return mean_figures([evaluate_head_set(model, p, heads, means, query_emb, class_emb, k, post=post, caption_emb=c)
                         for p, c in zip(probes, captions)])


def mean_figures(figures: list[dict]) -> dict:
    """Key-wise mean of per-draw figures (every draw measures the same keys)."""
    return {key: sum(f[key] for f in figures) / len(figures) for key in figures[0]}


def search_heads(model: nn.Module, probe: ProbeSet | Sequence[ProbeSet], audit: AuditResult,
                 query_emb: torch.Tensor, class_emb: torch.Tensor | None, options: SearchOptions | None = None,
                 post=None, before: dict | None = None,
                 caption_embs: Sequence[torch.Tensor | None] | None = None) -> SearchResult:
    """Greedy forward selection over the audit's ranking, confirmed by forward passes.

    ``probe``: the selection probe set, or several draws (figures are averaged over them);
    ``post``: an embedding-site edit already chosen (applied in every trial); ``before``: the
    unedited model's figures (targets are relative to them), measured here when not given;
    ``caption_embs``: per draw, its images' caption embeddings, to keep text->image recall within
    the recall budget.
    """
    opt = options or SearchOptions()
    probes = [probe] if isinstance(probe, ProbeSet) else list(probe)
    means = audit.means if opt.ablation == "mean" else None

    def evaluate(heads: dict, with_post) -> dict:
        return evaluate_on_draws(model, probes, heads, means, query_emb, class_emb, opt.k, post=with_post,
                                 caption_embs=caption_embs)

    before = before or evaluate({}, None)
    start = evaluate({}, post) if post else before
    chosen: dict[tuple[int, int], float] = {}
    current = start
    steps = []
    if opt.budget.bias_met(before, current):
        return SearchResult(chosen, True, before, current, steps)
    for head in audit.cheap_rank:
        if len(chosen) >= opt.max_heads:
            break
        best = None
        for scale in opt.scales:  # the strongest edit of this head that keeps accuracy within budget
            trial = evaluate({**chosen, head: scale}, post)
            ok = trial["max_skew"] < current["max_skew"] and opt.budget.within(before, trial)
            steps.append({"head": list(head), "scale": scale, "max_skew": trial["max_skew"],
                          "accuracy": trial.get("accuracy"), "recall": trial.get("recall"), "within_budget": ok})
            if ok and (best is None or trial["max_skew"] < best[1]["max_skew"]):
                best = (scale, trial)
        if best is not None:
            chosen[head] = best[0]
            current = best[1]
            if opt.budget.bias_met(before, current):
                return SearchResult(chosen, True, before, current, steps)
    return SearchResult(chosen, False, before, current, steps)


def plan_from_search(search: SearchResult, audit: AuditResult, source: dict, options: SearchOptions) -> SurgeryPlan:
    means = audit.means
    return SurgeryPlan(
        source=source,
        heads=[HeadEdit("vision", l, h, scale, options.ablation,
                        means[l, h].tolist() if options.ablation == "mean" else None)
               for (l, h), scale in search.heads.items()],
        provenance={
            "method": "clipsurgery debias: greedy over the audit's cheap-score ranking, confirmed by forward passes",
            "targets": options.budget.to_dict(),
            "met_on_selection_probe": search.met, "before": search.before, "after": search.after,
            "search": search.steps,
        },
    ).validate()
