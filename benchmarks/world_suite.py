"""The world suite: `clipsurgery debias` with unchanged defaults on worlds nobody tuned it on.

    python benchmarks/world_suite.py                 # train the missing worlds, then run every check
    python benchmarks/world_suite.py --only col3     # one world
    python benchmarks/world_suite.py --train-only    # just build the cache

Each world is a tiny CLIP trained by the same code as the bundled model (surgery.world.train) on a
planted-bias world that differs from the bundled one (red/blue, six shapes, bias 0.9, seed 0) and
from the others: texture and colour attributes, 2-4 groups, 4-8 concepts, bias strengths 0.7-0.95,
other seeds, and two weaker models (fewer training images and epochs). The trained models are
cached outside git ($CLIPSURGERY_SUITE_DIR, default ~/.cache/clipsurgery/world-suite).

Checks per world (one table at the end; the world models are not part of the test suite):
  quality    zero-shot concept accuracy (>= 0.65) and mean MaxSkew@50 (>= 0.6 ln G): worth debiasing
  debias     `clipsurgery debias WORLD out.onnx` with default settings (its exit status: 0 = targets met
             on the report's images, 3 = missed): on the world's eval split the mean MaxSkew@50 cut
             (>= 60%), the worst query's cut (>= 30%), the concept accuracy, zero-shot group accuracy
             and both Recall@5 drops (<= 2 points each); beside them the cut for the queries in the
             world's other caption wordings, the group-naming queries' precision@50, and the balance
             edit's cut for queries held out of its fit (from the plan)
  fresh      the same exported pair on a fresh draw of the world (`clipsurgery compare`), and the
             t2i@5 change on --noise-draws more fresh draws (its spread is the metric's noise floor)
  labels     the group-labels-only path: `debias --images FOLDER --labels CSV --queries FILE` on a
             folder with a `file,group` CSV only (no concepts, captions or world.json) and the world's
             concept queries as the list; the pair is then compared on the eval split and the fresh draw.
             With --retrieval, debias also gets `--retrieval captions.csv` (another draw's images and
             captions, no labels) and its own report (recall on that set's held-out half) is a row too
Runs one job at a time (2 cores).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from surgery.audit.vision import DEFAULT_SWEEP_TOP
from surgery.world.checkpoint import save_world_model
from surgery.world.generator import balanced_size
from surgery.world.params import WorldParams
from surgery.world.prompts import group_prompts, neutral_queries
from surgery.world.train import WorldTrainOptions, evaluate_world_model, train_world_model

FRESH_SEED_OFFSET = 5000  # a fresh draw: another seed of the same world than any the tool generated
NOISE_SEED_OFFSET = 5100  # more fresh draws, for the spread of t2i@5 (seed + 5100 + i)
LABELS_SEED_OFFSET = 4000  # the group-labels-only probe: another draw than the tool's own selection draws
RETRIEVAL_SEED_OFFSET = 4500  # the labels-only path's retrieval set (--retrieval): yet another draw
AUDIT_CHOOSE_OFFSET, AUDIT_MEASURE_OFFSET = 6000, 7000  # the audit's set is chosen on one draw, measured on another


@dataclass(frozen=True)
class SuiteWorld:
    name: str
    params: dict  # WorldParams fields
    train: dict = field(default_factory=dict)  # WorldTrainOptions fields
    weak: bool = False  # trained short on purpose: a model well below the bundled one's accuracy
    # For the balance edit's settings (benchmarks/RESULTS.md, "The balance edit"): "dev": chosen looking
    # at this world's results; "seen": its results were read while choosing them (col4, col2-weak);
    # "new": run only for the acceptance table, no setting chosen on it (tex3-weak, col3-new, tex2-new);
    # "open": added for the open balance (#28), first run for its table
    role: str = "new"


SUITE = (
    SuiteWorld("tex2", {"seed": 11, "attribute_kind": "texture", "groups": ("stripes", "dots"), "bias_strength": 0.9},
               role="dev"),
    SuiteWorld("col3", {"seed": 21, "groups": ("red", "green", "blue"),
                        "concepts": ("circle", "triangle", "star", "diamond", "hexagon"), "bias_strength": 0.85},
               role="dev"),
    SuiteWorld("col4", {"seed": 31, "groups": ("red", "blue", "yellow", "purple"),
                        "concepts": ("square", "cross", "ring", "crescent"), "bias_strength": 0.95}, role="seen"),
    SuiteWorld("tex3-weak", {"seed": 41, "attribute_kind": "texture", "groups": ("stripes", "dots", "checks"),
                             "concepts": ("circle", "square", "triangle", "cross", "ring", "star", "diamond",
                                          "hexagon"), "bias_strength": 0.8},
               {"n_train": 20000, "epochs": 6, "warmup_steps": 60}, weak=True),
    # weak by harder images (smaller shapes, more pixel noise), as fine-grained concepts are for real CLIPs
    SuiteWorld("col2-weak", {"seed": 51, "groups": ("orange", "cyan"),
                             "concepts": ("circle", "square", "triangle", "cross", "ring", "star", "diamond",
                                          "crescent"), "bias_strength": 0.75, "noise_std": 0.08,
                             "size_range": (0.35, 0.7)},
               {"n_train": 20000, "epochs": 4, "warmup_steps": 60}, weak=True, role="seen"),
    # Added for the balance edit's acceptance; never run before its final table (issue #22/#23).
    SuiteWorld("col3-new", {"seed": 61, "groups": ("green", "orange", "purple"),
                            "concepts": ("square", "triangle", "cross", "ring", "star", "hexagon"),
                            "bias_strength": 0.85}, role="new"),
    SuiteWorld("tex2-new", {"seed": 71, "attribute_kind": "texture", "groups": ("checks", "grid"),
                            "concepts": ("circle", "diamond", "crescent", "cross", "star"), "bias_strength": 0.9},
               role="new"),
    # Added for the open-vocabulary balance (#28); no setting of the open mode was chosen on them, and
    # they were first run for its acceptance table.
    SuiteWorld("col3-open", {"seed": 91, "groups": ("pink", "cyan", "yellow"),
                             "concepts": ("crescent", "hexagon", "square", "star", "ring", "diamond"),
                             "bias_strength": 0.85}, role="open"),
    SuiteWorld("tex3-open", {"seed": 101, "attribute_kind": "texture", "groups": ("stripes", "grid", "solid"),
                             "concepts": ("circle", "triangle", "cross", "ring", "hexagon", "crescent"),
                             "bias_strength": 0.9}, role="open"),
)


def cache_dir() -> str:
    return os.environ.get("CLIPSURGERY_SUITE_DIR", os.path.expanduser("~/.cache/clipsurgery/world-suite"))


def model_path(world: SuiteWorld) -> str:
    return os.path.join(cache_dir(), f"{world.name}.safetensors")


def train_options(world: SuiteWorld) -> WorldTrainOptions:
    params = world_params(world)
    return WorldTrainOptions(seed=params.seed, n_eval=balanced_size(params), **world.train)


def train(world: SuiteWorld, device: str = "cpu") -> None:
    """Train and cache the world's model, unless another run of this script did meanwhile (a lock
    per world: several runs can train different worlds side by side)."""
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), f".{world.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_current(world):
            _train(world, device)


def _train(world: SuiteWorld, device: str = "cpu") -> None:
    params = world_params(world)
    options = train_options(world)
    start = time.perf_counter()
    model, history = train_world_model(params, options, device=device)
    quality = evaluate_world_model(model, params, n_eval=options.n_eval)
    os.makedirs(cache_dir(), exist_ok=True)
    save_world_model(model, params, model_path(world), history=history, quality=quality)
    print(f"[{world.name}] trained in {time.perf_counter() - start:.0f} s: concept accuracy "
          f"{quality.concept_accuracy:.3f}, MaxSkew@50 {quality.max_skew_at_50:.3f}", flush=True)


def quality_of(world: SuiteWorld) -> dict:
    from safetensors import safe_open

    with safe_open(model_path(world), "pt") as f:
        meta = f.metadata()
    quality = json.loads(meta["clipsurgery.quality"])
    groups = len(json.loads(meta["clipsurgery.world"])["groups"])
    return {"concept_accuracy": quality["concept_accuracy"], "max_skew": quality["max_skew_at_50"],
            "worth": quality["concept_accuracy"] >= 0.65 and quality["max_skew_at_50"] >= 0.6 * math.log(groups),
            "groups": groups}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True)


def figures(report_json: str) -> dict:
    """Cuts and drops (points) of a compare/debias report."""
    with open(report_json, encoding="utf-8") as f:
        report = json.load(f)
    before, after = report["before"], report["after"]
    attr, per = next(iter(report["per_query"].items()))
    out = {"mean_cut": per["mean_cut"], "worst_cut": per["worst_cut"],
           "per_query": {r["query"]: r["cut"] for r in per["queries"]},
           "acc_drop": 100 * (before.get("zero_shot_accuracy", 0) - after.get("zero_shot_accuracy", 0))}
    if "group_accuracy" in before["bias"][attr]:
        out["group_acc_drop"] = 100 * (before["bias"][attr]["group_accuracy"] - after["bias"][attr]["group_accuracy"])
    if "cell_precision" in before:
        out["naming_precision_drop"] = 100 * (before["cell_precision"]["mean"] - after["cell_precision"]["mean"])
    if per.get("wordings"):
        cuts = per["wordings"].values()
        out["wordings_mean_cut"] = sum(c["mean_cut"] for c in cuts) / len(cuts)
        out["wordings_worst_cut"] = min(c["worst_cut"] for c in cuts)
    for key in ("t2i@5", "i2t@5"):
        if key in before.get("retrieval", {}):
            out[f"{key}_drop"] = 100 * (before["retrieval"][key] - after["retrieval"][key])
    return out


def met(f: dict) -> bool:
    """The balance issue's acceptance on one split: mean cut >= 60%, worst query >= 30%, every drop <= 2 points."""
    drops = [f.get(key, 0.0) for key in ("acc_drop", "group_acc_drop", "t2i@5_drop", "i2t@5_drop")]
    return (f["mean_cut"] is not None and f["mean_cut"] >= 0.6 and f["worst_cut"] is not None
            and f["worst_cut"] >= 0.3 and all(d <= 2.0 + 1e-9 for d in drops))


def verdicts(report_json: str) -> dict:
    """Each budget's verdict in a debias report (held / missed / unresolved / not measured)."""
    with open(report_json, encoding="utf-8") as f:
        return {c["name"]: c["verdict"] for c in json.load(f).get("targets", [])}


def plan_figures(plan_json: str) -> dict:
    """What the plan says: edit counts, whether removal edits were searched, what each kind
    contributed (selection draws), the balance edit's held-out-query cut."""
    with open(plan_json, encoding="utf-8") as f:
        plan = json.load(f)
    prov = plan["provenance"]
    out = {"heads": len(plan["heads"]), "neurons": sum(len(n["ids"]) for n in plan["neurons"]),
           "balance": [b["tower"] for b in plan.get("balance", [])], "open_balance": len(plan.get("open_balance", [])),
           "removal_searched": prov.get("removal_searched"),
           "contributions": {k: (v or {}).get("max_skew") for k, v in (prov.get("contributions") or {}).items()},
           "selection_before": prov.get("before", {}).get("max_skew")}
    for edit in plan.get("balance", []):
        held = edit["provenance"].get("held_out_queries") or {}
        out["held_out_query_cut"] = held.get("cut")
    return out


def compare_on(world: SuiteWorld, model: str, out: str, split_dir: str, report_dir: str) -> dict:
    cmp = _cli("compare", model, out, "--images", os.path.join(split_dir, "images"), "--labels",
               os.path.join(split_dir, "labels.csv"), "--captions", os.path.join(split_dir, "captions.csv"),
               "--out", report_dir)
    if cmp.returncode != 0:
        return {"error": cmp.stderr.strip().splitlines()[-1]}
    return figures(os.path.join(report_dir, "report.json"))


def generate_split(world: SuiteWorld, out: str, seed: int) -> str | None:
    gen = _cli("world", "generate", "--out", out, "--like", model_path(world), "--seed", str(seed))
    return None if gen.returncode == 0 else gen.stderr.strip().splitlines()[-1]


def world_params(world: SuiteWorld) -> WorldParams:
    return WorldParams.from_dict({**WorldParams().to_dict(), **world.params})


def is_current(world: SuiteWorld) -> bool:
    """The cached model exists and was trained on this suite world's parameters and training
    options (a world retrained with other options is never silently reused)."""
    if not os.path.isfile(model_path(world)):
        return False
    from safetensors import safe_open

    with safe_open(model_path(world), "pt") as f:
        meta = f.metadata()
    cached = json.loads(meta["clipsurgery.world"])
    trained = json.loads(meta.get("clipsurgery.training", "{}")).get("options")
    return (WorldParams.from_dict(cached) == world_params(world)
            and trained == dataclasses.asdict(train_options(world)))


def labels_only_row(world: SuiteWorld, work: str, group_prompts_file: bool = True, retrieval: bool = False) -> dict:
    """Only the group-labels-only path (``--labels-only``): a fresh draw, then :func:`labels_only_check`."""
    fresh = os.path.join(work, f"{world.name}-fresh")
    error = generate_split(world, fresh, world_params(world).seed + FRESH_SEED_OFFSET)
    return {"error": error} if error else {"labels_only": labels_only_check(world, work, fresh, group_prompts_file,
                                                                            retrieval)}


def check(world: SuiteWorld, work: str, noise_draws: int = 3, labels_path: bool = True) -> dict:
    row: dict = {}
    out = os.path.join(work, f"{world.name}.onnx")
    start = time.perf_counter()
    run = _cli("debias", model_path(world), out)
    row["debias_seconds"] = time.perf_counter() - start
    row["exit"] = run.returncode
    if run.returncode not in (0, 3):
        row["error"] = (run.stderr.strip().splitlines() or ["?"])[-1]
        return row
    row["eval"] = figures(os.path.join(work, f"{world.name}.report", "report.json"))
    row["plan"] = plan_figures(os.path.join(work, f"{world.name}.plan.json"))
    params = world_params(world)
    fresh = os.path.join(work, f"{world.name}-fresh")
    error = generate_split(world, fresh, params.seed + FRESH_SEED_OFFSET)
    if error:
        row["error"] = error
        return row
    row["fresh"] = compare_on(world, model_path(world), out, fresh, os.path.join(work, f"{world.name}-fresh.report"))
    noise = []
    for i in range(noise_draws):
        draw = os.path.join(work, f"{world.name}-noise{i}")
        if generate_split(world, draw, params.seed + NOISE_SEED_OFFSET + i) is None:
            f = compare_on(world, model_path(world), out, draw, os.path.join(work, f"{world.name}-noise{i}.report"))
            if "t2i@5_drop" in f:
                noise.append(f["t2i@5_drop"])
    row["t2i_drops_more_fresh_draws"] = noise
    if labels_path:
        row["labels_only"] = labels_only_check(world, work, fresh)
    return row


def labels_only_check(world: SuiteWorld, work: str, fresh: str, group_prompts_file: bool = True,
                      retrieval: bool = False) -> dict:
    """debias on a folder whose CSV has only file,group (a fresh draw of 2x the usual size; half of it
    held out for debias's own report), the world's concept queries as a list and, unless
    ``group_prompts_file`` is off, the world's group prompts as ``--group-prompts``; then compared
    on the world's eval split and on the fresh draw with every figure. ``retrieval``: debias also
    gets ``--retrieval`` (another draw of the usual size, its captions.csv: image,caption rows) and
    its own report (recall on that set's held-out half, the targets' verdicts) is returned as "report"."""
    params = world_params(world)
    folder = os.path.join(work, f"{world.name}-labels")
    n = 2 * balanced_size(params)
    gen = _cli("world", "generate", "--out", folder, "--like", model_path(world), "--seed",
               str(params.seed + LABELS_SEED_OFFSET), "--n", str(n))
    if gen.returncode != 0:
        return {"error": gen.stderr.strip().splitlines()[-1]}
    group_only = write_group_only(folder, params)
    out = os.path.join(work, f"{world.name}-labels.onnx")
    named = ["--group-prompts", os.path.join(group_only, "group_prompts.csv")] if group_prompts_file else []
    if retrieval:
        captioned = os.path.join(work, f"{world.name}-retrieval")
        error = generate_split(world, captioned, params.seed + RETRIEVAL_SEED_OFFSET)
        if error:
            return {"error": error}
        named += ["--retrieval", os.path.join(captioned, "captions.csv")]
    run = _cli("debias", model_path(world), out, "--images", os.path.join(folder, "images"), "--labels",
               os.path.join(group_only, "labels.csv"), "--queries", os.path.join(group_only, "queries.txt"), *named)
    if run.returncode not in (0, 3):
        return {"error": (run.stderr.strip().splitlines() or ["?"])[-1]}
    own = {}
    if retrieval:
        own_json = os.path.join(work, f"{world.name}-labels.report", "report.json")
        own = {"report": figures(own_json), "verdicts": verdicts(own_json),
               "plan": plan_figures(os.path.join(work, f"{world.name}-labels.plan.json"))}
    report = os.path.join(work, f"{world.name}-labels-eval")
    error = generate_split(world, report, params.seed)
    if error:
        return {"error": error}
    return {"exit": run.returncode, **own,
            "eval": compare_on(world, model_path(world), out, report, report + ".report"),
            "fresh": compare_on(world, model_path(world), out, fresh, os.path.join(work, f"{world.name}-labels-fresh"))}


def write_group_only(split: str, params: WorldParams) -> str:
    """``split``/group-only/: the split's labels as ``file,group`` only (no concepts, captions or
    world.json: the group-labels-only case), the world's concept queries (queries.txt) and its group
    prompts as a user with non-people groups writes them (group_prompts.csv: the people template
    names none of a world's groups). Returns that folder."""
    with open(os.path.join(split, "labels.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    group_only = os.path.join(split, "group-only")
    os.makedirs(group_only)
    with open(os.path.join(group_only, "labels.csv"), "w", encoding="utf-8") as f:
        f.write("file,group\n" + "".join(f"{r['file']},{r['group']}\n" for r in rows))
    with open(os.path.join(group_only, "queries.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(neutral_queries(params)) + "\n")
    with open(os.path.join(group_only, "group_prompts.csv"), "w", encoding="utf-8") as f:
        f.write("group,prompt\n" + "".join(f"{g},{p}\n" for g, p in zip(params.groups, group_prompts(params))))
    return group_only


def audit_check(world: SuiteWorld, sweep_top: int | None = DEFAULT_SWEEP_TOP) -> dict:
    """The audit's proposed 3-head set (``clipsurgery audit`` defaults), chosen on one probe draw,
    against every 3-head set, all measured on another draw: the share of sets it beats (lower mean
    MaxSkew@50), of all sets and of those within the audit's accuracy budget (2 points).
    ``sweep_top``: heads the causal sweep ablates (the audit's shortlist; None: every head)."""
    import itertools

    from surgery.audit.ablation import evaluate_head_set
    from surgery.audit.probe import world_probe_set
    from surgery.audit.vision import AuditOptions, audit_vision
    from surgery.model.encode import text_embeddings
    from surgery.model.loading import load
    from surgery.world.checkpoint import world_params_of

    loaded = load(model_path(world))
    params = world_params_of(loaded)
    n = balanced_size(params)
    choose = world_probe_set(dataclasses.replace(params, seed=params.seed + AUDIT_CHOOSE_OFFSET), loaded.preprocess, n)
    measure = world_probe_set(dataclasses.replace(params, seed=params.seed + AUDIT_MEASURE_OFFSET),
                              loaded.preprocess, n)
    start = time.perf_counter()
    result = audit_vision(loaded.model, choose, loaded.tokenizer, AuditOptions(textspan_iterations=0,
                                                                                  sweep_top=sweep_top))
    audit_seconds = time.perf_counter() - start
    # the same audit with no accuracy budget: its set is the one comparable with every 3-head set
    free = audit_vision(loaded.model, choose, loaded.tokenizer, AuditOptions(textspan_iterations=0,
                                                                                max_accuracy_drop=1.0,
                                                                                sweep_top=sweep_top))
    L, H = result.scores["gradient"].shape
    heads = [(l, h) for l in range(L) for h in range(H)]
    queries = text_embeddings(loaded.model, measure.queries, loaded.tokenizer)
    classes = text_embeddings(loaded.model, measure.class_prompts, loaded.tokenizer)

    def figures(triple) -> dict:
        return evaluate_head_set(loaded.model, measure, list(triple), result.means, queries, classes)

    base = figures(())
    every = {t: figures(t) for t in itertools.combinations(heads, 3)}
    within = [f for f in every.values() if base["accuracy"] - f["accuracy"] <= 0.02]
    share = lambda pool, f: sum(f["max_skew"] < g["max_skew"] for g in pool) / max(1, len(pool))  # noqa: E731
    out = {"sets": len(every), "audit_seconds": audit_seconds, "swept_heads": len(heads) if result.sweep is None or result.sweep.swept is None else int(result.sweep.swept.sum()), "sets_within_budget": len(within),
           "max_skew_before": base["max_skew"], "accuracy_before": base["accuracy"],
           "every_set": {" ".join(f"{l}.{h}" for l, h in t): [f["max_skew"], f["accuracy"]] for t, f in every.items()}}
    for name, res in (("budget", result), ("free", free)):
        proposed = tuple(sorted((e.layer, e.head) for e in res.plan.heads))
        mine = every.get(proposed) or figures(proposed)
        out[name] = {"proposed": [list(h) for h in proposed], "beats_all": share(every.values(), mine),
                     "beats_within_budget": share(within, mine), "max_skew_after": mine["max_skew"],
                     "accuracy_drop": 100 * (base["accuracy"] - mine["accuracy"])}
    out["cheap_top3_beats_all"] = share(every.values(), every[tuple(sorted(result.cheap_rank[:3]))])
    return out


def audit_table(rows: list[dict]) -> str:
    lines = ["| world | role | swept heads | budget | proposed set | beats, of all 560 3-head sets (>=90%) | beats, of "
             "the sets within 2 acc. points | MaxSkew@50 before -> after | acc. drop |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        a = r.get("audit")
        if a is None:
            continue
        for name, label in (("budget", "2 points (default)"), ("free", "none")):
            p = a[name]
            heads = " ".join(f"L{l}.H{h}" for l, h in p["proposed"]) or "(none)"
            lines.append(f"| {r['world']} | {r['role']} | {a.get('swept_heads', '-')} | {label} | {heads} | {p['beats_all']:.1%} | "
                         f"{p['beats_within_budget']:.1%} of {a['sets_within_budget']} | "
                         f"{a['max_skew_before']:.3f} -> {p['max_skew_after']:.3f} | {p['accuracy_drop']:+.1f} |")
    audited = [r["audit"] for r in rows if "audit" in r]
    if audited:
        for name in ("budget", "free"):
            shares = [a[name]["beats_all"] for a in audited]
            lines.append(f"\n{name}: mean share of all 3-head sets beaten {sum(shares) / len(shares):.1%} (>= 95%), "
                         f"minimum {min(shares):.1%} (>= 90% on every world)")
        cheap = [a["cheap_top3_beats_all"] for a in audited]
        lines.append(f"cheap-score top 3 (the old plan): mean {sum(cheap) / len(cheap):.1%}, minimum {min(cheap):.1%}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _pts(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| world | role | G | concept acc | MaxSkew@50 | run | split | mean cut (>=60%) | worst query (>=30%) | "
             "acc drop | group acc drop | t2i@5 drop | i2t@5 drop | met (all <= 2) | other wordings: mean / worst cut | "
             "naming P@50 drop |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        head = f"| {r['world']} | {r['role']} | {r['groups']} | {r['concept_accuracy']:.3f} | {r['max_skew']:.3f} |"
        if "error" in r:
            lines.append(f"{head} error | {r['error']} |" + " |" * 10)
            continue
        runs = [(f"debias (exit {r.get('exit')})", r)]
        if r.get("labels_only") and "error" not in r["labels_only"]:
            lo = r["labels_only"]
            edit = ("open" if lo["plan"]["open_balance"] else "fixed") if "plan" in lo else None
            runs.append((f"labels only (exit {lo['exit']}" + (f", {edit} balance" if edit else "") + ")", lo))
        for run, source in runs:
            for split in ("report", "eval", "fresh"):
                f = source.get(split)
                if f is None or "error" in f:
                    continue
                wordings = (f"{_pct(f['wordings_mean_cut'])} / {_pct(f['wordings_worst_cut'])}"
                            if "wordings_mean_cut" in f else "-")
                lines.append(f"{head} {run} | {split} | {_pct(f['mean_cut'])} | {_pct(f['worst_cut'])} | "
                             f"{_pts(f['acc_drop'])} | {_pts(f.get('group_acc_drop'))} | {_pts(f.get('t2i@5_drop'))} | "
                             f"{_pts(f.get('i2t@5_drop'))} | {'yes' if met(f) else 'NO'} | {wordings} | "
                             f"{_pts(f.get('naming_precision_drop'))} |")
    return "\n".join(lines)


def detail_table(rows: list[dict]) -> str:
    """Per world: what the plan holds, what each kind contributed on the selection draws, the
    held-out-query cut, and the spread of t2i@5 on more fresh draws."""
    lines = ["| world | edits | removal searched | selection MaxSkew: none / balance only / removal only / both | "
             "held-out queries cut | t2i@5 drop on more fresh draws | debias s |",
             "| --- | --- | --- | --- | ---: | --- | ---: |"]
    for r in rows:
        p = r.get("plan")
        if p is None:
            continue
        c = p["contributions"]
        noise = r.get("t2i_drops_more_fresh_draws") or []
        lines.append(f"| {r['world']} | {p['heads']} heads, {p['neurons']} neurons, balance {p['balance'] or '-'} | "
                     f"{p['removal_searched']} | {_f3(p['selection_before'])} / {_f3(c.get('balance only'))} / "
                     f"{_f3(c.get('removal only'))} / {_f3(c.get('both'))} | {_pct(p.get('held_out_query_cut'))} | "
                     f"{', '.join(f'{x:+.1f}' for x in noise) or '-'} | {r['debias_seconds']:.0f} |")
    return "\n".join(lines)


def _f3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated world names (default: all)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--skip-debias", action="store_true", help="only the audit check")
    ap.add_argument("--skip-audit", action="store_true", help="only the debias checks")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--roles", default=None, help="comma-separated roles to run (dev, seen, new, open; default: all)")
    ap.add_argument("--noise-draws", type=int, default=3, help="more fresh draws for the spread of t2i@5")
    ap.add_argument("--sweep-top", default=str(DEFAULT_SWEEP_TOP),
                    help="the audit check's shortlist: heads its causal sweep ablates, or 'all'")
    ap.add_argument("--labels-only", action="store_true",
                    help="run only the group-labels-only path (no default debias run)")
    ap.add_argument("--no-group-prompts", action="store_true",
                    help="labels-only path without --group-prompts (groups named as people)")
    ap.add_argument("--skip-labels-only", action="store_true", help="skip the group-labels-only path")
    ap.add_argument("--retrieval", action="store_true",
                    help="labels-only path with --retrieval (another draw's captioned images, no labels)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads (1 when other jobs share the cores: oversubscribed threads thrash)")
    ap.add_argument("--device", default="cpu", help="where the missing worlds train (cuda: seconds per world; the "
                    "weights then differ from a CPU-trained world's by float rounding)")
    args = ap.parse_args(argv)
    names = [w.name for w in SUITE]
    wanted = args.only.split(",") if args.only else names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        ap.error(f"unknown world {unknown[0]!r}; the suite has {', '.join(names)}")
    worlds = [w for w in SUITE if w.name in wanted and (not args.roles or w.role in args.roles.split(","))]
    torch.set_num_threads(max(1, args.threads))
    for world in worlds:
        if not is_current(world):
            train(world, args.device)
    if args.train_only:
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipsurgery-suite-") as work:
        for world in worlds:
            row = {"world": world.name, "role": world.role, **quality_of(world)}
            if args.labels_only:
                row.update(labels_only_row(world, work, not args.no_group_prompts, args.retrieval))
            elif not args.skip_debias:
                row.update(check(world, work, args.noise_draws, not args.skip_labels_only))
            if not args.skip_audit and not args.labels_only:
                row["audit"] = audit_check(world, None if args.sweep_top == "all" else int(args.sweep_top))
            rows.append(row)
            print(f"[{world.name}] {json.dumps(row)}", flush=True)
    if args.labels_only:
        print(table(rows))
    elif not args.skip_debias:
        print(table(rows))
        print()
        print(detail_table(rows))
    if not args.skip_audit and not args.labels_only:
        print(audit_table(rows))
    save_rows(args.json, rows)
    return 0


def save_rows(path: str | None, rows: list[dict]) -> None:
    """The rows as JSON at ``path`` (``--json``; nothing when None)."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
