"""Open vocabulary (issue 28): does the exported encoder cut bias for queries nobody listed?

    python benchmarks/open_vocab.py                       # the bundled world and every suite world
    python benchmarks/open_vocab.py --only bundled,col3   # some of them
    python benchmarks/open_vocab.py --labels-only         # the labels-only path (no --queries)

Per world, as a new user would: ``clipsurgery debias WORLD out.onnx --queries FIT`` where FIT is the
world's neutral concept queries less its last two concepts; then both exported towers through ONNX
Runtime (``clipsurgery compare``) on the world's eval split (the report split) and on a fresh draw.
The queries are split three ways:

* fitted: the FIT list, in its own wording ("a photo of a circle");
* held-out concepts: the two concepts left out of FIT, in every wording (held out of everything);
* held-out wordings: the fitted concepts in the world's four other wordings ("a drawing of a circle").

Beside them: concept accuracy, zero-shot group accuracy, the group-naming queries' precision@50
and both Recall@5 (drops in points), debias's exit code, and the gate's confusion (the share of
neutral queries it corrects, gate > 0.5, and of group-naming texts, the world's cell queries and
the fresh draw's captions, it leaves alone, gate < 0.5).

``--labels-only``: debias on a folder whose CSV has only file,group (no concepts, captions or
world.json), ``--group-prompts`` naming the groups and no ``--queries`` at all (the built-in
occupation and trait queries calibrate the gate); every world concept query is then held out.
The suite's worlds come from ``benchmarks/world_suite.py`` (trained there, cached). One job at a time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world_suite as suite  # noqa: E402

from surgery.edit.bake import open_balance_module  # noqa: E402
from surgery.edit.plan import SurgeryPlan  # noqa: E402
from surgery.model.encode import text_embeddings  # noqa: E402
from surgery.model.loading import load  # noqa: E402
from surgery.world.checkpoint import world_params_of  # noqa: E402
from surgery.world.generator import balanced_size  # noqa: E402
from surgery.world.prompts import cell_queries, neutral_queries, query_wordings  # noqa: E402

HELD_OUT_CONCEPTS = 2  # the world's last concepts, left out of --queries
BUNDLED = "bundled"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True)


def model_of(name: str) -> str:
    return "builtin:world" if name == BUNDLED else suite.model_path(next(w for w in suite.SUITE if w.name == name))


def split(model: str, out: str, seed: int, n: int) -> None:
    gen = _cli("world", "generate", "--out", out, "--like", model, "--seed", str(seed), "--n", str(n))
    if gen.returncode != 0:
        raise RuntimeError(gen.stderr.strip().splitlines()[-1])


def compare(model: str, out: str, split_dir: str, report: str) -> dict:
    run = _cli("compare", model, out, "--images", os.path.join(split_dir, "images"), "--labels",
               os.path.join(split_dir, "labels.csv"), "--captions", os.path.join(split_dir, "captions.csv"),
               "--out", report)
    if run.returncode != 0:
        raise RuntimeError(run.stderr.strip().splitlines()[-1])
    with open(os.path.join(report, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def cut_of(rows: list[dict]) -> dict:
    """Mean cut (1 - sum after / sum before) and the worst query's cut of per-query rows."""
    before, after = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    cuts = [r["cut"] for r in rows if r["cut"] is not None]
    return {"mean_cut": 1 - after / before if before > 0 else None, "worst_cut": min(cuts) if cuts else None,
            "n": len(rows)}


def figures(report: dict, fitted: list[str], held_concepts: list[str]) -> dict:
    """The three query sets' cuts and the budgeted drops (points) of one compare report."""
    attr = next(iter(report["per_query"]))
    per = report["per_query"][attr]
    rows = list(per["queries"]) + [r for w in per.get("wordings", {}).values() for r in w["queries"]]
    concept_of = {q: c for c, q in enumerate(report["before"]["queries"])}
    for w in per.get("wordings", {}).values():
        concept_of.update({r["query"]: i for i, r in enumerate(w["queries"])})
    held_ids = {concept_of[q] for q in held_concepts}
    out = {"fitted": cut_of([r for r in rows if r["query"] in fitted]),
           "held_out_concepts": cut_of([r for r in rows if concept_of[r["query"]] in held_ids]),
           "held_out_wordings": cut_of([r for r in rows if r["query"] not in fitted
                                        and concept_of[r["query"]] not in held_ids])}
    before, after = report["before"], report["after"]
    out["acc_drop"] = 100 * (before["zero_shot_accuracy"] - after["zero_shot_accuracy"])
    out["group_acc_drop"] = 100 * (before["bias"][attr]["group_accuracy"] - after["bias"][attr]["group_accuracy"])
    out["naming_precision_drop"] = 100 * (before["cell_precision"]["mean"] - after["cell_precision"]["mean"])
    for key in ("t2i@5", "i2t@5"):
        out[f"{key}_drop"] = 100 * (before["retrieval"][key] - after["retrieval"][key])
    return out


def met(f: dict, fitted_needed: bool = True) -> bool:
    """Issue 28's acceptance on one split."""
    held = f["held_out_concepts"]
    ok = held["mean_cut"] >= 0.6 and held["worst_cut"] >= 0.3
    if fitted_needed and f["fitted"]["n"]:
        ok &= f["fitted"]["mean_cut"] >= 0.6
    return ok and all(f[k] <= 2.0 + 1e-9 for k in ("acc_drop", "group_acc_drop", "naming_precision_drop",
                                                      "t2i@5_drop", "i2t@5_drop"))


def gate_confusion(model: str, plan_path: str, fresh: str) -> dict | None:
    """Share of neutral queries (every concept, every wording) the gate corrects (gate > 0.5) and of
    group-naming texts (cell queries, the fresh draw's distinct captions) it leaves alone (< 0.5)."""
    plan = SurgeryPlan.load(plan_path)
    if not plan.open_balance:
        return None
    loaded = load(model)
    params = world_params_of(loaded)
    module = open_balance_module(plan.open_balance[0])
    with open(os.path.join(fresh, "captions.csv"), encoding="utf-8") as f:
        captions = sorted({r["caption"] for r in csv.DictReader(f)})
    neutral = neutral_queries(params) + [q for qs in query_wordings(params).values() for q in qs]
    naming = [q for q, _ in cell_queries(params)] + captions
    with torch.no_grad():
        g_neutral = module.gate(text_embeddings(loaded.model, neutral, loaded.tokenizer))
        g_naming = module.gate(text_embeddings(loaded.model, naming, loaded.tokenizer))
    return {"neutral_corrected": float((g_neutral > 0.5).float().mean()),
            "naming_left_alone": float((g_naming < 0.5).float().mean()),
            "neutral_gate_min": float(g_neutral.min()), "naming_gate_max": float(g_naming.max()),
            "n_neutral": len(neutral), "n_naming": len(naming)}


def run_world(name: str, work: str, labels_only: bool) -> dict:
    model = model_of(name)
    loaded = load(model)
    params = world_params_of(loaded)
    n = balanced_size(params)
    queries = neutral_queries(params)
    fitted = [] if labels_only else queries[:-HELD_OUT_CONCEPTS]
    held = queries if labels_only else queries[-HELD_OUT_CONCEPTS:]
    out = os.path.join(work, f"{name}.onnx")
    if labels_only:
        folder = os.path.join(work, f"{name}-labels")
        split(model, folder, params.seed + suite.LABELS_SEED_OFFSET, 2 * n)
        group_only = suite.write_group_only(folder, params)
        args = ["--images", os.path.join(folder, "images"), "--labels", os.path.join(group_only, "labels.csv"),
                "--group-prompts", os.path.join(group_only, "group_prompts.csv")]
    else:
        fit_file = os.path.join(work, f"{name}-fit.txt")
        with open(fit_file, "w", encoding="utf-8") as f:
            f.write("\n".join(fitted) + "\n")
        args = ["--queries", fit_file]
    run = _cli("debias", model, out, *args)
    row: dict = {"world": name, "exit": run.returncode, "fitted": fitted, "held_out": held}
    if run.returncode not in (0, 3):
        row["error"] = (run.stderr.strip().splitlines() or ["?"])[-1]
        return row
    plan_path = os.path.join(work, f"{name}.plan.json")
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    row["edit"] = "open" if plan.get("open_balance") else "fixed" if plan.get("balance") else "removal"
    for label, seed in (("eval", params.seed), ("fresh", params.seed + suite.FRESH_SEED_OFFSET)):
        folder = os.path.join(work, f"{name}-{label}")
        split(model, folder, seed, n)
        row[label] = figures(compare(model, out, folder, folder + ".report"), fitted, held)
        row[label]["met"] = met(row[label], not labels_only)
    row["gate"] = gate_confusion(model, plan_path, os.path.join(work, f"{name}-fresh"))
    return row


pct = suite._pct


def table(rows: list[dict]) -> str:
    lines = ["| world | role | edit | exit | split | fitted: mean cut | held-out concepts: mean / worst | "
             "held-out wordings: mean / worst | acc | group acc | naming P@50 | t2i@5 | i2t@5 | met | "
             "gate: neutral corrected / naming left alone |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    roles = {w.name: w.role for w in suite.SUITE}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['world']} | | | {r['exit']} | error: {r['error']} |" + " |" * 10)
            continue
        g = r.get("gate") or {}
        gate = f"{pct(g.get('neutral_corrected'))} / {pct(g.get('naming_left_alone'))}" if g else "-"
        for label in ("eval", "fresh"):
            f = r[label]
            lines.append(
                f"| {r['world']} | {roles.get(r['world'], 'dev')} | {r['edit']} | {r['exit']} | {label} | "
                f"{pct(f['fitted']['mean_cut'])} | {pct(f['held_out_concepts']['mean_cut'])} / "
                f"{pct(f['held_out_concepts']['worst_cut'])} | {pct(f['held_out_wordings']['mean_cut'])} / "
                f"{pct(f['held_out_wordings']['worst_cut'])} | {f['acc_drop']:+.1f} | {f['group_acc_drop']:+.1f} | "
                f"{f['naming_precision_drop']:+.1f} | {f['t2i@5_drop']:+.1f} | {f['i2t@5_drop']:+.1f} | "
                f"{'yes' if f['met'] else 'NO'} | {gate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [BUNDLED] + [w.name for w in suite.SUITE]
    ap.add_argument("--only", default=None, help=f"comma-separated worlds (default: all of {', '.join(names)})")
    ap.add_argument("--labels-only", action="store_true", help="the labels-only path, without --queries")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (debias runs in its own)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = args.only.split(",") if args.only else names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        ap.error(f"unknown world {unknown[0]!r}; choose from {', '.join(names)}")
    missing = [w for w in wanted if w != BUNDLED and not os.path.isfile(model_of(w))]
    if missing:
        ap.error(f"world {missing[0]} is not trained: python benchmarks/world_suite.py --train-only --only {missing[0]}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipsurgery-open-") as work:
        for name in wanted:
            row = run_world(name, work, args.labels_only)
            rows.append(row)
            print(f"[{name}] {json.dumps(row)}", flush=True)
    print(table(rows))
    suite.save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
