"""The targets of a debias run checked on its report's images: the bias target and each budget,
the budgets with their intervals (issue 30), and the cut of the queries the edits were not chosen on.
"""
from __future__ import annotations

from surgery.debias.budget import POINTS_TOLERANCE, Budget
from surgery.metrics.intervals import drop_interval, ratio_interval


def held_out_line(result: dict, fitted: list[str], k: int) -> str | None:
    """One line: the report's cut of its queries that the edits were not chosen on (None: there are none)."""
    for name, per in result["per_query"].items():
        rows = [r for r in per["queries"] if r["query"] not in fitted]
        if rows:
            before, after = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
            cuts = [r["cut"] for r in rows if r["cut"] is not None]
            mean = f"{1 - after / before:.0%}" if before > 0 else "-"
            worst = f"{min(cuts):.0%}" if cuts else "-"
            return (f"{name}: queries not in the fitted list ({len(rows)}: {', '.join(r['query'] for r in rows[:4])}"
                    f"{', ...' if len(rows) > 4 else ''}): MaxSkew@{k} cut {mean} on the mean, {worst} on the worst "
                    "(report's images)")
    return None


def check_targets(result: dict, budget: Budget, k: int) -> tuple[bool, str]:
    """(met, line): the targets checked on the report's images (not the selection probe).

    The bias target is met when mean MaxSkew@K after / before is at most the target. Each budget
    (accuracy, group accuracy, Recall@5 both ways) is a drop in points measured on a sample, so it
    is given with its 95% paired bootstrap interval over the report's images or caption queries
    (:mod:`surgery.metrics.intervals`) and judged by a stated rule: **missed** only when the whole
    interval is above the budget (the drop is resolved as too large); **unresolved** when the
    interval is wider than the budget on either side (the report's images cannot tell a drop of the
    budget's size from none: the line says so, and it is not counted as a miss); **held** otherwise.
    A report without per-item outcomes (an older report) is judged on the point figures."""
    checks = target_checks(result, budget, k)
    met = all(c["verdict"] != "missed" for c in checks)
    parts = [c["text"] for c in checks]
    if "zero_shot_accuracy" not in result["before"]:
        parts.append("accuracy not measured (no concept labels)")
    if "t2i@5" not in result["before"].get("retrieval", {}):
        parts.append("recall not measured (no captions)")
    unresolved = [c["name"] for c in checks if c["verdict"] == "unresolved"]
    line = f"targets on the report's images ({'met' if met else 'NOT met'}): " + ", ".join(parts)
    if unresolved:
        line += (f"; not resolved by the report's images (interval wider than the budget): {', '.join(unresolved)}"
                 " - more images or captions would gate them")
    return bool(met), line


def target_checks(result: dict, budget: Budget, k: int) -> list[dict]:
    """Every target and budget on the report's images: ``{"name", "value", "limit", "interval",
    "verdict": held | missed | unresolved, "text"}`` (see :func:`check_targets` for the rule)."""
    before, after = result["before"], result["after"]
    items_b, items_a = before.get("items") or {}, after.get("items") or {}
    checks = []
    for name, summ in before["bias"].items():
        ratio = after["bias"][name]["max_skew"] / summ["max_skew"] if summ["max_skew"] > 0 else 1.0
        per_b, per_a = (summ.get("per_query") or {}).get("max_skew"), (after["bias"][name].get("per_query") or {}).get("max_skew")
        interval = ratio_interval(per_b, per_a) if per_b and per_a else None
        verdict = "held" if ratio <= budget.max_bias_ratio else "missed"
        shown = f" [95% {interval.low:.2f}, {interval.high:.2f}]" if interval else ""
        checks.append({"name": f"{name} MaxSkew@{k} ratio", "value": ratio, "limit": budget.max_bias_ratio,
                       "interval": interval.to_dict() if interval else None, "verdict": verdict,
                       "text": f"{name} MaxSkew@{k} ratio {ratio:.2f}{shown} (<= {budget.max_bias_ratio})"})

    def drop(label: str, b_items, a_items, b_value: float, a_value: float, limit: float) -> None:
        value = 100 * (b_value - a_value)
        interval = drop_interval(b_items, a_items) if b_items is not None and a_items is not None else None
        if interval is None:
            verdict = "missed" if value > 100 * limit + POINTS_TOLERANCE else "held"
            text = f"{label} drop {value:.1f} points (<= {100 * limit:g})"
        else:
            low, high = 100 * interval.low, 100 * interval.high
            verdict = ("missed" if low > 100 * limit + POINTS_TOLERANCE
                       else "unresolved" if 100 * interval.half_width > 100 * limit else "held")
            text = f"{label} drop {value:.1f} points [95% {low:.1f}, {high:.1f}] (<= {100 * limit:g}{', unresolved' if verdict == 'unresolved' else ''})"
        checks.append({"name": f"{label} drop", "value": value, "limit": 100 * limit,
                       "interval": interval.to_dict() if interval else None, "verdict": verdict, "text": text})

    if "zero_shot_accuracy" in before:
        drop("accuracy", items_b.get("concept_correct"), items_a.get("concept_correct"),
             before["zero_shot_accuracy"], after["zero_shot_accuracy"], budget.max_accuracy_drop)
    for name, summ in before["bias"].items():
        if "group_accuracy" in summ:
            drop(f"{name} accuracy", (items_b.get("group_correct") or {}).get(name),
                 (items_a.get("group_correct") or {}).get(name), summ["group_accuracy"],
                 after["bias"][name]["group_accuracy"], budget.max_group_accuracy_drop)
    ranks_b, ranks_a = items_b.get("retrieval_ranks") or {}, items_a.get("retrieval_ranks") or {}
    for key, side, label in (("t2i@5", "t2i", "text->image Recall@5"), ("i2t@5", "i2t", "image->text Recall@5")):
        if key in before.get("retrieval", {}) and key in after.get("retrieval", {}):
            hits = lambda ranks: [int(r < 5) for r in ranks[side]] if side in ranks else None  # noqa: E731
            drop(label, hits(ranks_b), hits(ranks_a), before["retrieval"][key], after["retrieval"][key],
                 budget.max_recall_drop)
    return checks
