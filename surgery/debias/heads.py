"""What the edit search hands on: figures averaged over selection draws, the search's result,
and the plan made from it. The search itself is :mod:`surgery.debias.search` (heads and social
neurons in one pool, on the shared :func:`surgery.audit.set_search.forward_select`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from surgery.audit.vision import AuditResult
from surgery.debias.balance import BalanceFit, HeldOutQueries
from surgery.debias.budget import Budget
from surgery.edit.plan import HeadEdit, SurgeryPlan


@dataclass
class SearchResult:
    heads: dict[tuple[int, int], float]  # (layer, head) -> kept scale
    met: bool  # the bias target met on the selection probe set (the budgets hold for every kept step)
    before: dict  # {"max_skew", "accuracy"}
    after: dict
    steps: list[dict] = field(default_factory=list)  # every candidate tried, for the plan's provenance
    latents: list[int] = field(default_factory=list)  # SAE latents deactivated (joint search only)
    order: list[str] = field(default_factory=list)  # the kept edits in the order they were added
    balance: BalanceFit | None = None  # the balance map fitted for the chosen set (None: not chosen)
    # selection-draw figures of the chosen set's parts: "balance only", "removal only", "both" (None: not a part)
    contributions: dict[str, dict | None] = field(default_factory=dict)
    held_out: HeldOutQueries | None = None  # the balance edit's cut for queries held out of its fit
    # the search's budget and what it spent: {"trials", "seconds", "max_trials", "max_seconds", "stopped_by"}
    budget: dict = field(default_factory=dict)


def mean_figures(figures: list[dict]) -> dict:
    """Key-wise mean of per-draw figures (every draw measures the same keys)."""
    return {key: sum(f[key] for f in figures) / len(figures) for key in figures[0]}


def plan_from_search(search: SearchResult, audit: AuditResult | None, source: dict, budget: Budget,
                     ablation: str = "mean") -> SurgeryPlan:
    """The plan's head edits and provenance (the neuron and balance edits are added by the caller)."""
    if search.heads and audit is None:
        raise ValueError("head edits need the audit's head means")
    means = audit.means if audit is not None else None
    return SurgeryPlan(
        source=source,
        heads=[HeadEdit("vision", l, h, scale, ablation, means[l, h].tolist() if ablation == "mean" else None)
               for (l, h), scale in search.heads.items()],
        provenance={
            "method": "clipsurgery debias: greedy forward selection over measured set effects "
                      "(the balance edit, head soft-prunings and social neurons in one candidate pool)",
            "targets": budget.to_dict(), "order": search.order,
            "met_on_selection_probe": search.met, "before": search.before, "after": search.after,
            # without the wall-clock seconds: the same command gives a byte-identical plan
            "search_budget": {k: v for k, v in (search.budget or {}).items() if k != "seconds"} or None,
            "search": search.steps,
        },
    ).validate()
