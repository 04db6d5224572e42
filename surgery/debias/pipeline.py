"""``clipsurgery debias``: choose edits -> plan -> bake -> export -> verify -> compare.

:func:`run_debias` reads as its steps: check the outputs, open the model, build the probes (what
the edits are chosen on, and the report's images), embed the prompts, choose the edits, write the
plan (and move the SAE into place when the plan uses it), bake and export, compare before / after.

Choosing the edits (:func:`choose_edits`) goes from cheap to dear: the open balance (every text's
own correction from a bank of probe images, :mod:`surgery.debias.open_balance`) and then the fixed
balance map (a closed-form fit on the probe's embeddings, seconds) are measured first; when one
alone meets the targets on the selection draws, the removal edits are not searched
(``removal="always"`` searches them anyway). The outputs are checked in :mod:`surgery.debias.outputs`,
the targets on the report's images in :mod:`surgery.debias.targets`.
Otherwise the heads are audited, an SAE is trained for social-neuron candidates, and one search
chooses among the balance edit, head edits and neurons together (the balance refitted on top of
every removal edit it is tried with).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass

import torch

from surgery.audit.vision import AuditOptions, AuditResult, audit_vision
from surgery.debias import targets
from surgery.debias.budget import bias_ratio
from surgery.debias.heads import SearchResult, plan_from_search
from surgery.debias.neurons import NeuronStageOptions, neuron_edit, train_social_sae
from surgery.debias.open_balance import OpenBalanceFit
from surgery.debias.options import DebiasOptions
from surgery.debias.outputs import Outputs, check_exported_towers, edited_towers, remove_previous
from surgery.debias.probes import Probes, Prompts, Say, build_probes, checked_queries, embed_prompts
from surgery.debias.search import BalanceCandidate, EditSearchOptions, search_edits
from surgery.edit.bake import bake_copy
from surgery.edit.plan import NeuronEdit, SurgeryPlan
from surgery.errors import SurgeryError
from surgery.eval.compare import Row, compare, format_query_cuts, format_table, write_report
from surgery.eval.embedding import EmbedOptions
from surgery.eval.encoders import OnnxEncoder, TorchEncoder, open_encoder
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.export.safetensors import export_safetensors
from surgery.io.fs import staging_dir
from surgery.io.retrieval import RetrievalSet
from surgery.model.loading import LoadedModel, load
from surgery.model.preprocess import images_to_tensor
from surgery.runtime.progress import StageProgress
from surgery.world.generator import generate


def run_debias(model_in: str, out: str, options: DebiasOptions, *, images_dir: str | None = None,
               labels_path: str | None = None, attribute: str | None = None, queries: list[str] | None = None,
               group_prompts: dict[str, str] | None = None, progress: Say | None = None, inputs: tuple = (),
               retrieval: RetrievalSet | None = None) -> dict:
    """Debias ``model_in`` into ``out`` (.onnx or .safetensors); returns the table and summary lines.
    ``inputs``: the other files the caller read (queries, group prompts): no output may be one of them.
    ``queries``: the neutral queries (default: the world's concepts, or the built-in occupations and traits).
    ``group_prompts``: how a folder probe's group values are named (default: as people).
    ``retrieval``: captioned images for a folder probe (``--retrieval``): split like the probe
    (``holdout``), one part anchors the balance edit and gates recall in the search, the other is
    the report's recall."""
    say = progress or (lambda msg: None)
    outputs = Outputs.of(out, options.tower)
    outputs.check(model_in, options.force, (images_dir, labels_path, *inputs,
                                            *((retrieval.source, retrieval.images_dir) if retrieval is not None else ())),
                  sae_needed=options.neurons)
    queries = checked_queries(queries)
    check_exported_towers(out, options.tower, possible_towers(options))
    loaded = load(model_in)
    work = staging_dir("clipsurgery-debias-")
    neurons, placed, plan_saved = None, False, False
    try:
        probes = build_probes(loaded, model_in, options, work, images_dir, labels_path, attribute, say, queries,
                              group_prompts, retrieval)
        prompts = embed_prompts(loaded, probes, say)
        choice = choose_edits(loaded, probes, prompts, options, outputs.sae, say)
        neurons, search = choice.neurons, choice.search
        entry = neuron_edit(outputs.sae, search.latents, NeuronStageOptions()) if search.latents else None
        plan = make_plan(loaded, choice, options, probes, entry)
        check_exported_towers(out, options.tower, edited_towers(plan), every=True)
        remove_previous(outputs)  # --force: an earlier run's plan and SAE go together, before either is replaced
        if entry is not None:
            os.replace(neurons.staging, outputs.sae)  # complete: trained in staging beside it
            placed = True
        patched, exported = bake_and_export(loaded, plan, out, probes, options, say)
        plan.save(outputs.plan)
        plan_saved = True
        result = compare_before_after(loaded, patched, out, probes, plan, outputs.report, work, say, options)
    except BaseException:  # an error or SIGTERM: no SAE folder without the plan that refers to it
        if placed and not plan_saved:
            shutil.rmtree(outputs.sae, ignore_errors=True)
        raise
    finally:
        if neurons is not None:
            shutil.rmtree(neurons.staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return summarise(result, choice, exported, outputs, plan, options, probes.first.queries)


def possible_towers(options: DebiasOptions) -> set[str]:
    """The towers the run's edit kinds can change: heads and neurons the image tower, the balance
    edit the tower of its side."""
    towers = {"vision"} if options.heads or options.neurons else set()
    if options.balance:
        towers.add("text" if options.balance_options.side == "text" else "vision")
    return towers


@dataclass
class Neurons:
    """The SAE trained for this run (in ``staging`` until the plan needs it), its social-neuron
    candidates, and its summary for the plan's provenance."""

    sae: torch.nn.Module
    candidates: list[int]
    summary: dict
    staging: str


def train_neurons(loaded: LoadedModel, probes: Probes, options: DebiasOptions, sae_dir: str, say: Say
                  ) -> Neurons | None:
    """Seed 001's SAE on unlabelled vision embeddings and its social-neuron candidates (None with --heads-only)."""
    if not options.neurons:
        return None
    say("training an SAE on unlabelled vision embeddings and finding social-neuron candidates")
    if probes.world is not None:
        train = images_to_tensor(generate(probes.world, "train", options.sae_images).images, loaded.preprocess)
    else:
        train = probes.first.images[0:len(probes.first)]
    # trained in a staging folder beside sae_dir and moved into place complete when the plan uses it:
    # a killed run never leaves a half-written SAE folder (a SIGKILL's staging is removed by the next run)
    staging = staging_dir(f".{os.path.basename(sae_dir)}.", os.path.dirname(os.path.abspath(sae_dir)))
    try:
        sae, candidates, summary = train_social_sae(loaded.model, train, probes.selection, staging, NeuronStageOptions(),
                                                    progress=StageProgress(say, "SAE training", "steps"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Neurons(sae, candidates, summary, staging)


@dataclass
class Choice:
    """What :func:`choose_edits` decided and what it ran to decide it."""

    search: SearchResult
    audit: AuditResult | None  # None: the heads were not audited (balance alone met the targets, or --no-heads)
    neurons: Neurons | None  # None: no SAE was trained
    removal_searched: bool  # False: the balance edit alone met the targets and removal edits were not searched


def choose_edits(loaded: LoadedModel, probes: Probes, prompts: Prompts, options: DebiasOptions, sae_dir: str,
                 say: Say) -> Choice:
    """The edits, cheap kinds first (see the module docstring)."""
    balance = balance_candidate(prompts, options) if options.balance else None
    removal = options.heads or options.neurons
    if balance is not None and (options.removal == "auto" or not removal):
        first = None
        for candidate, line in balance_stages(balance):
            say(line)
            result = run_search(loaded, probes, prompts, options, None, None, candidate, say)
            if first is None or result.met or (not first.met and result.after["max_skew"] < first.after["max_skew"]):
                first = result
            if result.met:
                break
        if first.met or not removal:
            if removal:
                say("the balance edit alone met the targets on the selection draws: head and neuron edits not "
                    "searched (--removal always searches them too)")
            return Choice(first, None, None, False)
        say("the balance edit alone missed the targets on the selection draws: searching head and neuron edits "
            "with it")
    audit = None
    if options.heads:
        say("auditing heads (cheap scores a, b, d and the single-head ablation sweep c)")
        stages: dict[str, StageProgress] = {}

        def audit_progress(stage: str, done: int, total: int) -> None:
            stages.setdefault(stage, StageProgress(say, stage, "images"))(done, total)

        audit = audit_vision(loaded.model, probes.first, loaded.tokenizer,
                             AuditOptions(k=options.k, sweep=True, textspan_iterations=0, propose=False),
                             progress=audit_progress)
    neurons = train_neurons(loaded, probes, options, sae_dir, say)
    try:
        search = run_search(loaded, probes, prompts, options, audit, neurons, balance, say)
    except BaseException:
        if neurons is not None:
            shutil.rmtree(neurons.staging, ignore_errors=True)
        raise
    return Choice(search, audit, neurons, True)


def balance_stages(balance: BalanceCandidate) -> list[tuple[BalanceCandidate, str]]:
    """The balance searches tried one after the other, each alone: the open balance first (it
    covers every text, not only the listed queries), then the fixed map."""
    stages = []
    if balance.open_options is not None:
        stages.append((dataclasses.replace(balance, fixed=False),
                       "fitting the open balance: every text's own least change toward equal evidence in each group's "
                       "nearest probe images, gated off for texts that name a group (measured on the selection draws)"))
    if balance.fixed:
        stages.append((dataclasses.replace(balance, open_options=None),
                       "fitting the balance edit: the least change of the text embeddings that gives each neutral "
                       "query equal evidence in every group (measured on the selection draws)"))
    return stages


def balance_candidate(prompts: Prompts, options: DebiasOptions) -> BalanceCandidate:
    """The balance edit's texts that weigh its change, all normalised: the class prompts (weight 1),
    and the anchors at ``anchor_weight``: the group prompts and every distinct caption of the
    selection draws and of the retrieval set's selection part (texts that must keep their meaning:
    captions name their images' groups, and caption retrieval is budgeted).

    As anchors the captions moved less: over eight fresh draws the text->image Recall@5 drop kept its
    mean (tex2 1.0 -> 1.25, col3 1.5 -> 0.8 points) and its spread shrank (standard deviation 2.7 ->
    1.7 and 3.1 -> 2.1), at the same bias cut (benchmarks/RESULTS.md, "balance edit"; `python
    benchmarks/balance_settings.py MODEL --fresh-draws 8`, rows "default" and "captions weigh 1"). Tried and
    dropped: the group values in four more phrasings as anchors ("{}", "a {} thing", "a photo of
    something {}", "a photo of a {} person"): a label is not always the model's word for its group
    (a texture world's "stripes" is "striped" in its captions), and on tex2 they raised that mean
    drop from 1.0 to 2.9 points."""
    anchor = float(options.balance_options.anchor_weight)
    parts, weights = [], []
    for texts, weight in ((prompts.classes, 1.0), (prompts.distinct_captions, anchor), (prompts.groups, anchor)):
        if texts is not None:
            parts.append(texts)
            weights.append(torch.full((len(texts),), weight))
    open_ok = options.balance_mode in ("auto", "open") and options.balance_options.side == "text"
    return BalanceCandidate(options.balance_options, torch.cat(parts), torch.cat(weights),
                            open_options=options.open_options if open_ok else None,
                            fixed=options.balance_mode in ("auto", "fixed"))


def run_search(loaded: LoadedModel, probes: Probes, prompts: Prompts, options: DebiasOptions,
               audit: AuditResult | None, neurons: Neurons | None, balance: BalanceCandidate | None,
               say: Say) -> SearchResult:
    """One search over the candidates given (a None kind has none), measured on the selection draws."""
    stage = NeuronStageOptions()
    search_options = EditSearchOptions(budget=options.selection_budget(),
                                       max_heads=options.max_heads if audit is not None else 0,
                                       max_neurons=stage.max_neurons, k=options.k, alpha=stage.alpha, form=stage.form,
                                       stop_at_target=options.removal == "auto", max_trials=options.search_trials,
                                       max_seconds=options.search_seconds)
    return search_edits(loaded.model, probes.selection, audit, prompts.queries, prompts.classes, search_options,
                        sae=neurons.sae if neurons else None, latents=neurons.candidates if neurons else (),
                        caption_embs=prompts.captions, progress=say, group_emb=prompts.groups, balance=balance,
                        retrieval=probes.retrieval, retrieval_emb=prompts.retrieval)


def make_plan(loaded: LoadedModel, choice: Choice, options: DebiasOptions, probes: Probes,
              neurons_entry: NeuronEdit | None) -> SurgeryPlan:
    """The SurgeryPlan of the chosen edits, with how they were chosen; refuses an empty plan."""
    search = choice.search
    plan = plan_from_search(search, choice.audit, {"arch": loaded.arch, "sha256": loaded.sha256},
                            options.selection_budget())
    plan.provenance["removal_searched"] = choice.removal_searched
    plan.provenance["contributions"] = search.contributions
    if probes.source is not None:
        plan.provenance["probe"] = probes.source
    if neurons_entry is not None:
        plan.neurons = [neurons_entry]
        plan.provenance["neurons"] = {**(choice.neurons.summary if choice.neurons else {}),
                                      "chosen": list(neurons_entry.ids)}
    if search.balance is not None:
        probe = probes.first
        common = {"queries": list(probe.queries), "groups": list(probe.group_names), "attribute": probe.attribute,
                  "group_prompts": list(probe.group_prompts),  # anchors / gate prompts, and the group-accuracy prompts
                  "selection_images": sum(len(p) for p in probes.selection), "fit": search.balance.statistics(),
                  "held_out_queries": search.held_out.to_dict() if search.held_out is not None else None}
        if isinstance(search.balance, OpenBalanceFit):
            plan.open_balance = [search.balance.edit({
                "method": "clipsurgery open balance: per text, the least change giving equal mean score to every "
                          "group's nearest bank images (closed form in the text graph), gated by the text's lean "
                          "toward one group prompt", **common,
                "options": dataclasses.asdict(options.open_options),
                "covers": "every text: the queries listed only calibrate the gate (see held_out_queries)"})]
        else:
            plan.balance = [search.balance.edit({
                "method": "clipsurgery balance: least change of the embeddings under 'equal mean score of every "
                          "group's nearest images' constraints per neutral query (closed form, iterated)", **common,
                "options": dataclasses.asdict(options.balance_options),
                "covers": "the queries it was fit on; other queries get only what they share with them "
                          "(see held_out_queries)"})]
    plan.validate()
    if plan.empty:
        raise SurgeryError("no edit lowered bias within the accuracy, recall and group-accuracy budgets; raise "
                           "--max-accuracy-drop or --max-recall-drop")
    return plan


def bake_and_export(loaded: LoadedModel, plan: SurgeryPlan, out: str, probes: Probes, options: DebiasOptions,
                    say: Say) -> tuple[LoadedModel, list[str]]:
    """Bake ``plan`` into a copy of the model and export it (ONNX parity-gated); returns the patched
    model and what was written."""
    patched = copy.copy(loaded)
    patched.model = bake_copy(loaded.model, plan)  # shares every tensor the plan leaves alone
    say(f"baked {len(plan.heads)} head edits, {sum(len(n.ids) for n in plan.neurons)} neuron deactivations, "
        f"{len(plan.balance)} balance edit(s) and {len(plan.open_balance)} open balance(s); exporting {out}")
    if not out.endswith(".onnx"):
        export_safetensors(patched, out, plan, force=options.force)
        return patched, [out]
    results = export_onnx(patched, out, plan, OnnxOptions(tower=options.tower, force=options.force),
                          probe_images=probes.first.images[0:options.parity_images])
    return patched, [f"{r['path']} (ONNX Runtime vs PyTorch max abs error {r['max_abs_error']:.1e})"
                     for r in results.values()]


def compare_before_after(loaded: LoadedModel, patched: LoadedModel, out: str, probes: Probes, plan: SurgeryPlan,
                         report_dir: str, work: str, say: Say, options: DebiasOptions | None = None) -> dict:
    """The exported model against the original on the report's images; writes the report. A tower
    that was not exported (--tower vision|text) is run as the patched PyTorch model."""
    vision_unchanged = not any(e.tower == "vision" for e in (*plan.heads, *plan.neurons, *plan.balance,
                                                              *plan.open_balance))
    say("comparing before / after" + (" (the plan leaves the image tower as it was: the report's images are "
                                      "embedded once, and the exported image tower was parity-checked)"
                                      if vision_unchanged else ""))
    after = OnnxEncoder(out, fallback=TorchEncoder(patched)) if out.endswith(".onnx") else open_encoder(out)
    result = compare(TorchEncoder(loaded), after, probes.spec, EmbedOptions(cache_dir=os.path.join(work, "cache")),
                     progress=StageProgress(say, "embedding the report's images", "images"), same_images=vision_unchanged,
                     retrieval_progress=StageProgress(say, "embedding the retrieval set's report images", "images"))
    if probes.eval_name:
        result["spec"]["images_dir"] = probes.eval_name
    result["plan"] = plan.to_dict()
    if options is not None:
        result["targets"] = target_checks(result, options)
    write_report(report_dir, result, title="clipsurgery debias")
    return result


def summarise(result: dict, choice: Choice, exported: list[str], outputs: Outputs, plan: SurgeryPlan,
              options: DebiasOptions, fitted: list[str] | None = None) -> dict:
    """The table and the lines the CLI prints."""
    search = choice.search
    rows = [Row(r["metric"], r["before"], r["after"], r["better"]) for r in result["rows"]]
    met = "met" if search.met else "NOT met"
    selection = options.selection_budget()
    lines = [*(f"wrote {p}" for p in exported), f"wrote {outputs.plan}", f"report: {outputs.report}/report.md",
             *([f"SAE: {outputs.sae}/ (the plan's neuron edit refers to it)"] if plan.neurons else []),
             f"targets on the selection probe ({met}): MaxSkew@{options.k} {search.before['max_skew']:.3f} -> "
             f"{search.after['max_skew']:.3f} (ratio {bias_ratio(search.before['max_skew'], search.after['max_skew']):.2f} "
             f"vs <= {selection.max_bias_ratio:g}, the target less a {options.selection_bias_margin:g} margin)",
             *contribution_lines(choice, options.k, options.heads or options.neurons),
             *format_query_cuts(result["per_query"], options.k)]
    held = targets.held_out_line(result, list(fitted), options.k) if fitted else None
    if held:
        lines.append(held)
    met_on_report, line = check_targets(result, options)
    lines.append(line)
    return {"table": format_table(rows), "lines": lines, "result": result, "search": search, "met": met_on_report}


def contribution_lines(choice: Choice, k: int, removal_offered: bool = True) -> list[str]:
    """What each kind of edit contributed on the selection draws, and what the balance edit covers."""
    search = choice.search
    before = search.before["max_skew"]
    parts = []
    for name, figures in search.contributions.items():
        if figures is not None:
            parts.append(f"{name} {figures['max_skew']:.3f} (cut {1 - bias_ratio(before, figures['max_skew']):.0%})")
        elif name == "removal only":
            parts.append("removal only: " + ("no head or neuron edit kept" if choice.removal_searched
                                             else "not searched (the balance edit alone met the targets)"
                                             if removal_offered else "not asked for"))
    lines = [f"what each kind contributed (selection draws, mean MaxSkew@{k} {before:.3f} before): " + "; ".join(parts)]
    if search.budget:
        b = search.budget
        limits = ", ".join(x for x in (f"{b['max_trials']} trials" if b["max_trials"] else "",
                                       f"{b['max_seconds']:g} s" if b["max_seconds"] else "") if x) or "none"
        lines.append(f"edit search: {b['trials']} trials in {b['seconds']:.1f} s (budget: {limits}); stopped: "
                     f"{b['stopped_by']}")
    if search.held_out is not None and search.held_out.cut is not None:
        if isinstance(search.balance, OpenBalanceFit):
            lines.append(f"the open balance corrects every text at run time (the {len(search.held_out.per_query)} "
                         f"queries only calibrate its gate); a query left out of the calibration is cut "
                         f"{search.held_out.cut:.0%} on the mean (two folds, selection draws)")
        else:
            lines.append(f"the balance edit covers the {len(search.held_out.per_query)} queries it was fit on; a "
                         f"query left out of the fit is cut {search.held_out.cut:.0%} on the mean (two folds, "
                         "selection draws)")
    return lines


def report_targets(result: dict, options: DebiasOptions) -> str:
    """One line: the targets checked on the report's images (not the selection probe)."""
    return check_targets(result, options)[1]


def check_targets(result: dict, options: DebiasOptions) -> tuple[bool, str]:
    """(met, line): ``options``' budget checked on the report's images (:func:`surgery.debias.targets.check_targets`)."""
    return targets.check_targets(result, options.budget, options.k)


def target_checks(result: dict, options: DebiasOptions) -> list[dict]:
    """Every target and budget on the report's images, judged (:func:`surgery.debias.targets.target_checks`)."""
    return targets.target_checks(result, options.budget, options.k)
