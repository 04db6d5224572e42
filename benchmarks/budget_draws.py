"""Do debias's verdicts resolve what they gate? (issue 30)

    python benchmarks/budget_draws.py                     # the bundled world and every suite world
    python benchmarks/budget_draws.py --only col3 --draws 5

Per world: ``clipsurgery debias WORLD out.onnx`` with defaults (its exit code: 0 met, 3 missed), then
the exported pair compared with the original (``clipsurgery compare``, both towers through ONNX
Runtime) on ``--draws`` fresh report draws of the world, each judged by the same rule debias applies
to its own report (surgery.debias.pipeline.check_targets: each budget with its 95% paired bootstrap
interval, missed only when the interval is above it). The verdicts agree when every draw gives
debias's own. Printed per draw: met / missed, and the budgets the draw could not resolve.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from open_vocab import BUNDLED, _cli, compare, model_of, split  # noqa: E402
import world_suite as suite  # noqa: E402

from surgery.debias.pipeline import DebiasOptions, check_targets, target_checks  # noqa: E402
from surgery.model.loading import load  # noqa: E402
from surgery.world.checkpoint import world_params_of  # noqa: E402
from surgery.world.generator import balanced_size  # noqa: E402

DRAW_SEED_OFFSET = 8000  # fresh report draws: seed + 8000 + i, apart from every draw the tool or the suite makes


def run_world(name: str, work: str, draws: int) -> dict:
    model = model_of(name)
    params = world_params_of(load(model))
    out = os.path.join(work, f"{name}.onnx")
    run = _cli("debias", model, out)
    row: dict = {"world": name, "exit": run.returncode, "draws": []}
    if run.returncode not in (0, 3):
        row["error"] = (run.stderr.strip().splitlines() or ["?"])[-1]
        return row
    options = DebiasOptions()
    for i in range(draws):
        folder = os.path.join(work, f"{name}-draw{i}")
        split(model, folder, params.seed + DRAW_SEED_OFFSET + i, balanced_size(params))
        report = compare(model, out, folder, folder + ".report")
        met, _ = check_targets(report, options)
        checks = target_checks(report, options)
        row["draws"].append({"met": met, "unresolved": [c["name"] for c in checks if c["verdict"] == "unresolved"],
                             "missed": [c["name"] for c in checks if c["verdict"] == "missed"],
                             "t2i_drop": next((c["value"] for c in checks if c["name"].startswith("text->image")), None)})
    verdicts = {d["met"] for d in row["draws"]}
    row["agree"] = verdicts == {run.returncode == 0}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [BUNDLED] + [w.name for w in suite.SUITE]
    ap.add_argument("--only", default=None, help=f"comma-separated worlds (default: all of {', '.join(names)})")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    wanted = args.only.split(",") if args.only else names
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipsurgery-draws-") as work:
        for name in wanted:
            row = run_world(name, work, args.draws)
            rows.append(row)
            print(f"[{name}] {json.dumps(row)}", flush=True)
    print("| world | debias exit | verdict per fresh draw | agree | unresolved budgets (draws) | t2i@5 drop per draw |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['world']} | {r['exit']} | error: {r['error']} | | | |")
            continue
        verdicts = " ".join("met" if d["met"] else "MISSED" for d in r["draws"])
        unresolved = sorted({u for d in r["draws"] for u in d["unresolved"]})
        counts = ", ".join(f"{u} ({sum(u in d['unresolved'] for d in r['draws'])})" for u in unresolved) or "-"
        drops = " ".join(f"{d['t2i_drop']:+.1f}" if d["t2i_drop"] is not None else "-" for d in r["draws"])
        print(f"| {r['world']} | {r['exit']} | {verdicts} | {'yes' if r['agree'] else 'NO'} | {counts} | {drops} |")
    suite.save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
