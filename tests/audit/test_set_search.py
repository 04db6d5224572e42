"""forward_select: greedy forward selection over measured set effects (shared by audit and debias)."""
from __future__ import annotations

import itertools

import pytest

from surgery.audit.set_search import forward_select

# A toy whose effects do not add up: a and b each lower the objective most on their own, but
# together they undo each other; c is weak alone and strong with a.
TABLE = {
    (): (1.0, 0.0), ("a",): (0.5, 0.0), ("b",): (0.55, 0.0), ("c",): (0.9, 0.0), ("d",): (0.4, 5.0),
    ("a", "b"): (0.8, 0.0), ("a", "c"): (0.2, 0.0), ("b", "c"): (0.7, 0.0),
}


def evaluate(chosen):
    key = tuple(sorted(chosen))
    if key not in TABLE:  # any set with d, or all three
        value = (0.3, 5.0) if "d" in key else (0.6, 0.0)
    else:
        value = TABLE[key]
    return {"obj": value[0], "cost": value[1]}


def run(**kw):
    args = dict(objective=lambda f: f["obj"], allowed=lambda f: f["cost"] <= 1.0, done=lambda f: False, max_size=2)
    args.update(kw)
    return forward_select(["a", "b", "c", "d"], evaluate, **args)


def test_picks_the_best_measured_set_not_the_best_singles():
    sel = run()
    # d is best alone but over budget; then a; then c (measured with a: 0.2), not b (0.8 with a)
    assert sel.chosen == ["a", "c"]
    assert sel.after["obj"] == pytest.approx(0.2)
    assert sel.before["obj"] == pytest.approx(1.0)
    assert not sel.met


def test_every_trial_is_recorded_and_exactly_the_kept_ones_are_marked():
    sel = run()
    assert len(sel.steps) == 4 + 3  # all four singles, then the three open ones beside a
    kept = [s["candidate"] for s in sel.steps if s["chosen"]]
    assert kept == ["a", "c"]
    assert [s["within_budget"] for s in sel.steps if s["candidate"] == "d"] == [False, False]  # tried at both steps


def test_stops_as_soon_as_the_target_holds():
    sel = run(done=lambda f: f["obj"] <= 0.5, max_size=3)
    assert sel.chosen == ["a"] and sel.met


def test_stops_when_no_candidate_lowers_the_objective():
    sel = run(max_size=4)
    assert sel.chosen == ["a", "c"]  # {a, c, b} = 0.6 > 0.2 and d is over budget
    assert len(sel.steps) == 4 + 3 + 2


def test_an_empty_set_that_already_meets_the_target_measures_nothing_else():
    calls = []
    sel = forward_select(["a"], lambda c: calls.append(c) or {"obj": 0.0}, objective=lambda f: f["obj"],
                         allowed=lambda f: True, done=lambda f: True, max_size=3)
    assert sel.chosen == [] and sel.met and calls == [[]]


def test_conflicting_candidates_are_never_chosen_together():
    # (head, scale) pairs: one head at two strengths conflicts
    cands = [("h1", 0.0), ("h1", 0.5), ("h2", 0.0)]

    def ev(chosen):
        return {"obj": 1.0 - 0.3 * len(chosen)}

    sel = forward_select(cands, ev, objective=lambda f: f["obj"], allowed=lambda f: True, done=lambda f: False,
                         max_size=3, conflicts=lambda a, b: a[0] == b[0])
    heads = [c[0] for c in sel.chosen]
    assert len(heads) == len(set(heads)) == 2


def test_a_shortlist_bounds_what_is_measured():
    measured = []

    def ev(chosen):
        measured.append(tuple(chosen))
        return evaluate(chosen)

    sel = forward_select(["a", "b", "c", "d"], ev, objective=lambda f: f["obj"], allowed=lambda f: f["cost"] <= 1,
                         done=lambda f: False, max_size=1, shortlist=lambda chosen, open_: [c for c in open_ if c != "a"])
    assert ("a",) not in measured
    assert sel.chosen == ["b"]


def test_matches_a_brute_force_greedy_on_random_tables():
    import random

    rng = random.Random(0)
    items = list("abcde")
    for _ in range(20):
        table = {frozenset(s): rng.random() for r in range(6) for s in itertools.combinations(items, r)}
        sel = forward_select(items, lambda c: {"obj": table[frozenset(c)]}, objective=lambda f: f["obj"],
                             allowed=lambda f: True, done=lambda f: False, max_size=3)
        chosen, current = [], table[frozenset()]
        while len(chosen) < 3:  # the plain reference: argmin over every open candidate
            options = {c: table[frozenset(chosen + [c])] for c in items if c not in chosen}
            c = min(options, key=options.get)
            if options[c] >= current:
                break
            chosen.append(c)
            current = options[c]
        assert sel.chosen == chosen


def test_max_size_must_not_be_negative():
    with pytest.raises(ValueError, match="max_size"):
        run(max_size=-1)


def test_on_step_reports_each_step_and_the_one_that_found_nothing():
    seen = []
    run(max_size=4, on_step=lambda size, kept, figures, trials: seen.append((size, kept, round(figures["obj"], 2), trials)))
    assert seen == [(1, "a", 0.5, 4), (2, "c", 0.2, 3), (3, None, 0.2, 2)]


def test_why_it_stopped_and_how_much_it_measured():
    assert run(done=lambda f: f["obj"] <= 0.5, max_size=3).stopped_by == "target met"
    full = run(max_size=4)
    assert full.stopped_by == "no trial helped" and full.trials == 4 + 3 + 2 and full.seconds >= 0
    assert run(max_size=1).stopped_by == "size limit"


def test_a_trial_budget_ends_the_search_with_the_best_trial_measured_so_far():
    sel = run(max_trials=5)  # the four singles, then one trial of step 2 ({a, b}: 0.8, no better than a)
    assert sel.trials == 5 and sel.stopped_by == "trial budget"
    assert sel.chosen == ["a"] and len(sel.steps) == 5
    sel = run(max_trials=2)  # step 1 cut short after a and b: a is kept (d, the over-budget one, never measured)
    assert sel.chosen == ["a"] and sel.trials == 2 and sel.stopped_by == "trial budget"
    assert run(max_trials=100).stopped_by == "size limit"


def test_a_time_budget_ends_the_search():
    calls = []

    def slow(chosen):
        calls.append(chosen)
        return evaluate(chosen)

    sel = forward_select(["a", "b", "c", "d"], slow, objective=lambda f: f["obj"], allowed=lambda f: f["cost"] <= 1.0,
                         done=lambda f: False, max_size=2, max_seconds=0.0)
    assert sel.stopped_by == "time budget" and sel.trials == 0 and sel.chosen == [] and calls == [[]]
