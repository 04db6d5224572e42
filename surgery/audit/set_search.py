"""Greedy forward selection over measured set effects: the one search behind the audit's proposed
plan and ``clipsurgery debias``'s search (heads and social neurons in one pool; also the
neuron-only search of ``examples/sae_world.py``).

Single-edit scores cannot rank sets of edits whose effects do not add up (#4: the audit's top 3 by
single-head scores beat only 82-95% of all 3-head sets, `python examples/audit_world.py --exhaustive`). So a set is grown one edit at a time,
and every candidate set is *measured* (``evaluate``: real forward passes, or an SAE pass on
cached embeddings), never predicted:

    chosen = []
    repeat until done(current) or |chosen| = max_size:
        try every candidate that does not conflict with the chosen ones (or a shortlist of them)
        keep the trial with the lowest objective among those the budget allows
        stop if none lowers the objective

A ``shortlist`` (e.g. the candidates whose added-up single-edit effects predict the lowest
objective) bounds the forward passes per step on big models; the choice is still confirmed by
measuring.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


STOP_REASONS = ("target met", "no trial helped", "size limit", "trial budget", "time budget")


@dataclass
class Selection(Generic[T]):
    chosen: list[T]  # in the order they were added
    met: bool  # ``done`` holds for the final set
    before: dict  # figures of the empty set
    after: dict  # figures of the chosen set
    steps: list[dict] = field(default_factory=list)  # every trial: the candidate, its figures, allowed, chosen
    stopped_by: str = "target met"  # one of STOP_REASONS
    trials: int = 0  # sets measured (the empty set not counted)
    seconds: float = 0.0


def forward_select(candidates: Sequence[T], evaluate: Callable[[list[T]], dict], *,
                   objective: Callable[[dict], float], allowed: Callable[[dict], bool],
                   done: Callable[[dict], bool], max_size: int,
                   conflicts: Callable[[T, T], bool] | None = None,
                   shortlist: Callable[[list[T], list[T]], Sequence[T]] | None = None,
                   describe: Callable[[T], dict] | None = None, start: dict | None = None,
                   on_step: Callable[[int, T | None, dict, int], None] | None = None,
                   max_trials: int | None = None, max_seconds: float | None = None) -> Selection[T]:
    """Grow a set of ``candidates`` greedily by the measured ``objective`` (lower is better).

    ``evaluate(set)``: the figures of a set (a list of candidates); ``allowed(figures)``: the
    budget a trial must stay within; ``done(figures)``: the target (the search stops as soon as it
    holds); ``conflicts(a, b)``: candidates that cannot be chosen together (e.g. one head at two
    strengths); ``shortlist(chosen, open)``: the open candidates to measure this step (default:
    all); ``describe(candidate)``: how a step names it; ``start``: the figures of the empty set,
    when already measured; ``on_step(size, kept or None, figures, trials)``: called after each step
    (progress for long searches); ``max_trials`` / ``max_seconds``: the search's budget. Once it is
    spent no further set is measured: the step under way keeps the best trial measured so far, and
    the search stops (``stopped_by`` says why it stopped, whatever the reason).
    """
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    clash = conflicts or (lambda a, b: a == b)
    name = describe or (lambda c: {"candidate": c})
    clock = time.monotonic()
    chosen: list[T] = []
    before = start if start is not None else evaluate([])
    current, steps = before, []
    measured, spent = 0, None

    def budget_spent() -> str | None:
        if max_trials is not None and measured >= max_trials:
            return "trial budget"
        if max_seconds is not None and time.monotonic() - clock >= max_seconds:
            return "time budget"
        return None

    while len(chosen) < max_size and not done(current) and spent is None:
        open_ = [c for c in candidates if not any(clash(c, d) for d in chosen)]
        trials = list(shortlist(chosen, open_)) if shortlist is not None else open_
        best: tuple[T, dict, int] | None = None  # (candidate, figures, index of its step)
        for candidate in trials:
            spent = budget_spent()
            if spent is not None:
                break
            measured += 1
            figures = evaluate(chosen + [candidate])
            ok = bool(allowed(figures))
            steps.append({**name(candidate), "size": len(chosen) + 1, **figures, "within_budget": ok, "chosen": False})
            if ok and objective(figures) < objective(current) and (
                    best is None or objective(figures) < objective(best[1])):
                best = (candidate, figures, len(steps) - 1)
        if best is None:
            if on_step is not None and spent is None:
                on_step(len(chosen) + 1, None, current, len(trials))
            break
        chosen.append(best[0])
        current = best[1]
        steps[best[2]]["chosen"] = True
        if on_step is not None:
            on_step(len(chosen), best[0], current, len(trials))
    met = bool(done(current))
    reason = "target met" if met else spent or ("size limit" if len(chosen) >= max_size else "no trial helped")
    return Selection(chosen, met, before, current, steps, reason, measured, time.monotonic() - clock)
