"""The targets of a debias run, in one object, validated once.

A :class:`Budget` is relative to the unedited model: mean MaxSkew@K must fall to at most
``max_bias_ratio`` of its value, while zero-shot concept accuracy and Recall@5 may
drop by at most ``max_accuracy_drop`` / ``max_recall_drop`` (fractions; the CLI takes points),
the recall budget holding in both directions (text->image and image->text), and zero-shot group
accuracy with the group prompts (attribute retention: group-naming texts keep their meaning) by at
most ``max_group_accuracy_drop``.
The head search, the neuron search and the final report all read the same object.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from surgery.errors import SurgeryError

#: The tightest bias ratio a selection budget is tightened to (a ratio of 0 cannot be met).
MIN_SELECTION_RATIO = 0.05
#: Float noise allowed when a drop in points is compared with its budget (differences of means).
POINTS_TOLERANCE = 1e-9
#: The recall figures a budget checks: text->image and image->text hit@5 (see audit.probe.edit_figures).
RECALL_KEYS = ("recall", "recall_i2t")
#: Guards a ratio of MaxSkew values against a zero denominator.
_TINY = 1e-12


@dataclass(frozen=True)
class Budget:
    max_bias_ratio: float = 0.5  # mean MaxSkew@K after / before must be <= this, in (0, 1]
    max_accuracy_drop: float = 0.02  # zero-shot concept accuracy may drop by at most this (fraction, [0, 1])
    max_recall_drop: float = 0.02  # text->image and image->text Recall@5 may each drop by at most this (fraction)
    max_group_accuracy_drop: float = 0.02  # zero-shot group accuracy (group prompts) may drop by at most this

    def __post_init__(self) -> None:
        if not 0 < self.max_bias_ratio <= 1:
            raise SurgeryError(f"--max-bias-ratio must be in (0, 1], got {self.max_bias_ratio}")
        for name in ("max_accuracy_drop", "max_recall_drop", "max_group_accuracy_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise SurgeryError(f"--{name.replace('_', '-')} must be between 0 and 100 points, "
                                   f"got {100 * getattr(self, name):g}")

    def bias_met(self, before: dict, current: dict) -> bool:
        """Mean MaxSkew@K of ``current`` is at most ``max_bias_ratio`` of ``before``'s."""
        return current["max_skew"] <= self.max_bias_ratio * before["max_skew"]

    def within(self, before: dict, trial: dict) -> bool:
        """Concept accuracy, recall in both directions and group accuracy (where measured) dropped
        by no more than their budgets."""
        return (before.get("accuracy", 0.0) - trial.get("accuracy", 0.0) <= self.max_accuracy_drop + POINTS_TOLERANCE
                and all(before.get(key, 0.0) - trial.get(key, 0.0) <= self.max_recall_drop + POINTS_TOLERANCE
                        for key in RECALL_KEYS)
                and before.get("group_accuracy", 0.0) - trial.get("group_accuracy", 0.0)
                <= self.max_group_accuracy_drop + POINTS_TOLERANCE)

    def misses(self, before: dict, trial: dict, k: int | None = None) -> list[str]:
        """What ``trial`` misses, one phrase per budget, each naming the figure and its limit:
        "MaxSkew@50 ratio 0.62 (target <= 0.45)", "text->image Recall@5 drop 3.1 points (budget 2)".
        The bias ratio is checked when both carry "max_skew"; an empty list: every budget holds."""
        out = []
        if "max_skew" in before and "max_skew" in trial and not self.bias_met(before, trial):
            ratio = bias_ratio(before["max_skew"], trial["max_skew"])
            out.append(f"MaxSkew{'@' + str(k) if k else ''} ratio {ratio:.2f} (target <= {self.max_bias_ratio:g})")
        drops = [("accuracy", "concept accuracy", self.max_accuracy_drop),
                 ("recall", "text->image Recall@5", self.max_recall_drop),
                 ("recall_i2t", "image->text Recall@5", self.max_recall_drop),
                 ("group_accuracy", "group accuracy", self.max_group_accuracy_drop)]
        for key, name, limit in drops:
            drop = before.get(key, 0.0) - trial.get(key, 0.0)
            if drop > limit + POINTS_TOLERANCE:
                out.append(f"{name} drop {100 * drop:.1f} points (budget {100 * limit:g})")
        return out

    def tightened(self, margin: float, bias_margin: float) -> Budget:
        """The budget a search aims for on selection probes, so that it still holds on other images:
        accuracy and recall budgets less ``margin``, the bias ratio less ``bias_margin``."""
        return dataclasses.replace(
            self, max_bias_ratio=max(MIN_SELECTION_RATIO, self.max_bias_ratio - bias_margin),
            max_accuracy_drop=max(0.0, self.max_accuracy_drop - margin),
            max_recall_drop=max(0.0, self.max_recall_drop - margin),
            max_group_accuracy_drop=max(0.0, self.max_group_accuracy_drop - margin))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def bias_ratio(before: float, after: float) -> float:
    """after / before for MaxSkew values, safe when ``before`` is 0."""
    return after / max(before, _TINY)
