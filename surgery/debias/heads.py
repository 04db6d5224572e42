"""Choose the head edits: the fewest soft-prunings that meet the targets, chosen as a set.

The shared greedy forward selection (:func:`surgery.audit.set_search.forward_select`) over
(head, kept scale) candidates: at each step the open heads whose added-up single-head ablation
effects predict the lowest bias together with the chosen ones (the audit's sweep) are measured at
every scale, each candidate set confirmed by forward passes on the selection draws; the trial with
the lowest mean MaxSkew@K within the accuracy and recall budgets is kept. The search stops at the
first set that meets the bias target, when no trial lowers bias within budget, or at ``max_heads``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.audit.ablation import evaluate_head_set
from surgery.audit.head_set import head_shortlist
from surgery.audit.probe import ProbeSet
from surgery.audit.set_search import forward_select
from surgery.audit.vision import AuditResult
from surgery.debias.budget import Budget
from surgery.edit.plan import HeadEdit, SurgeryPlan

log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    budget: Budget = field(default_factory=Budget)  # the bias target and the accuracy / recall budgets
    max_heads: int = 8  # never edit more heads than this
    scales: tuple[float, ...] = (0.0, 0.5)  # kept fractions tried for each head (0 = removed)
    k: int = 50  # MaxSkew@K
    ablation: str = "mean"  # how edited heads are removed
    confirm: int = 4  # heads measured (at every scale) per step; the others are only predicted


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
                 caption_embs: Sequence[torch.Tensor | None] | None = None, progress=None) -> SearchResult:
    """Greedy forward selection over the audit's ranking, confirmed by forward passes.

    ``probe``: the selection probe set, or several draws (figures are averaged over them);
    ``post``: an embedding-site edit already chosen (applied in every trial); ``before``: the
    unedited model's figures (targets are relative to them), measured here when not given;
    ``caption_embs``: per draw, its images' caption embeddings, to keep text->image recall within
    the recall budget; ``progress(line)``: told after each step.
    """
    opt = options or SearchOptions()
    probes = [probe] if isinstance(probe, ProbeSet) else list(probe)
    means = audit.means if opt.ablation == "mean" else None
    Candidate = tuple[tuple[int, int], float]  # ((layer, head), kept scale)

    def evaluate(chosen: list[Candidate], with_post=post) -> dict:
        return evaluate_on_draws(model, probes, dict(chosen), means, query_emb, class_emb, opt.k, post=with_post,
                                 caption_embs=caption_embs)

    before = before or evaluate([], None)
    heads_first = head_shortlist(opt.confirm, audit.sweep, probes[0], opt.k, query_emb.shape[0])

    def shortlist(chosen: list[Candidate], open_: list[Candidate]) -> list[Candidate]:
        heads = heads_first([h for h, _ in chosen], list(dict.fromkeys(h for h, _ in open_)))
        return [c for h in heads for c in open_ if c[0] == h]

    candidates = [(head, scale) for head in audit.cheap_rank for scale in opt.scales]
    selection = forward_select(
        candidates, evaluate, objective=lambda f: f["max_skew"], allowed=lambda f: opt.budget.within(before, f),
        done=lambda f: opt.budget.bias_met(before, f), max_size=opt.max_heads, conflicts=lambda a, b: a[0] == b[0],
        shortlist=shortlist, describe=lambda c: {"head": list(c[0]), "scale": c[1]},
        start=evaluate([]) if post else before, on_step=_step_reporter(progress, opt.k))
    return SearchResult(dict(selection.chosen), selection.met, before, selection.after, selection.steps)


def _step_reporter(progress, k: int):
    if progress is None:
        return None

    def report(size: int, kept, figures: dict, trials: int) -> None:
        if kept is None:
            progress(f"head step {size}: none of {trials} trials lowered MaxSkew@{k} within budget; stopping")
        else:
            (layer, head), scale = kept
            progress(f"head step {size}: L{layer}.H{head} kept at {scale:g} -> MaxSkew@{k} {figures['max_skew']:.3f} "
                     f"(best of {trials} trials)")
    return report


def plan_from_search(search: SearchResult, audit: AuditResult, source: dict, options: SearchOptions) -> SurgeryPlan:
    means = audit.means
    return SurgeryPlan(
        source=source,
        heads=[HeadEdit("vision", l, h, scale, options.ablation,
                        means[l, h].tolist() if options.ablation == "mean" else None)
               for (l, h), scale in search.heads.items()],
        provenance={
            "method": "clipsurgery debias: greedy forward selection over measured set effects (heads x scales)",
            "targets": options.budget.to_dict(),
            "met_on_selection_probe": search.met, "before": search.before, "after": search.after,
            "search": search.steps,
        },
    ).validate()
