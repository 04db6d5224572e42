"""``clipsurgery balance``: fit only the balance edit and write its plan (bake it with ``clipsurgery bake``).

The probe is a labelled folder (all of its images: there is no report here) or, for a world
model, the same selection draws ``clipsurgery debias`` uses. The plan records the fit, the figures
on the probe before and after, and the cut for queries held out of the fit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from surgery.audit.probe import folder_probe_set
from surgery.debias.options import DebiasOptions
from surgery.debias.pipeline import Choice, balance_candidate, contribution_lines, make_plan, run_search
from surgery.debias.probes import Probes, attach_retrieval, checked_queries, embed_prompts, world_selection
from surgery.errors import SurgeryError
from surgery.io.fs import check_output_path
from surgery.io.images import resolve_images_dir
from surgery.io.retrieval import RetrievalSet
from surgery.model.loading import load
from surgery.world.checkpoint import world_params_of


def run_balance(model_in: str, plan_out: str, options: DebiasOptions, *, images_dir: str | None = None,
                labels_path: str | None = None, attribute: str | None = None, queries: list[str] | None = None,
                group_prompts: dict[str, str] | None = None, force: bool = False, progress: Callable[[str], None] | None = None,
                inputs: tuple = (), retrieval: RetrievalSet | None = None) -> dict:
    """Fit the balance edit of ``model_in`` and save its plan to ``plan_out``; returns the lines to print.
    ``inputs``: the other files the caller read (the queries and group-prompts files): never overwritten.
    ``retrieval``: captioned images (all of them: there is no report) whose captions anchor the edit
    and on which the recall budgets are measured."""
    say = progress or (lambda msg: None)
    check_output_path(plan_out, inputs=(model_in, labels_path, images_dir, *inputs,
                                        *((retrieval.source,) if retrieval is not None else ())), force=force)
    if retrieval is not None and not images_dir:
        raise SurgeryError("--retrieval goes with an --images/--labels probe (a world model's draws carry their own "
                           "captions)")
    queries = checked_queries(queries)
    loaded = load(model_in)
    params = world_params_of(loaded)
    if images_dir:
        probe = folder_probe_set(resolve_images_dir(images_dir), labels_path, attribute, loaded.preprocess,
                                 queries=queries, group_prompts=group_prompts)
        probes = Probes([probe], None, None, None, source={"images": images_dir, "labels": labels_path,
                                                       "selection_images": len(probe)})
        if retrieval is not None:
            attach_retrieval(probes, retrieval, loaded.preprocess)
    elif params is not None:
        probes = Probes(world_selection(loaded, params, options, queries), None, None, params)
        say(f"probing on {len(probes.selection)} generated draws of the model's world")
    else:
        raise SurgeryError(f"the balance edit needs probe images: pass --images DIR --labels CSV "
                           f"({model_in} carries no world to generate them from)")
    prompts = embed_prompts(loaded, probes, say)
    options = dataclasses.replace(options, heads=False, neurons=False, balance=True)
    search = run_search(loaded, probes, prompts, options, None, None, balance_candidate(prompts, options), say)
    budget = options.selection_budget()
    if search.balance is None:
        step = next((st for st in search.steps if st.get("balance")), {})
        missed = "; ".join(budget.misses(search.before, step)) or "no lower MaxSkew"
        raise SurgeryError(f"the balance edit missed a budget on the probe: {missed} (the budgets less the selection "
                           f"margin {options.selection_margin:g}); loosen that budget or check the probe's group labels")
    choice = Choice(search, None, None, False)
    plan = make_plan(loaded, choice, options, probes, None)
    plan.save(plan_out)
    before, after = search.before["max_skew"], search.after["max_skew"]
    missed = budget.misses(search.before, search.after, options.k)
    return {"plan": plan, "met": not missed, "missed": missed, "lines": [
        f"wrote {plan_out} (bake it: clipsurgery bake {model_in} {plan_out} OUT)",
        f"on the probe: mean MaxSkew@{options.k} {before:.3f} -> {after:.3f}; targets "
        + ("met" if not missed else f"NOT met: {'; '.join(missed)}"),
        *contribution_lines(choice, options.k, removal_offered=False)]}
