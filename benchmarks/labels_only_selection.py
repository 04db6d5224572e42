"""What each balance measures on the selection side of a labels-only probe with a retrieval set.

    python benchmarks/labels_only_selection.py tex3-weak [col3-new ...]

The same folders as `python benchmarks/world_suite.py --labels-only --retrieval` (the probe: a
draw of 2x the usual size with a `file,group` CSV; the retrieval set: another draw's captions.csv),
then, for the open balance and the fixed map each alone, the selection figures `debias` judges
them by (the probe's selection half; recall on the retrieval set's selection half) and the budgets
each misses there (the budgets less the selection margins). Says why `debias --balance-mode auto`
chose the balance it chose. World models from the suite's cache (train them with world_suite.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import world_suite as ws  # noqa: E402

from surgery.debias.options import DebiasOptions  # noqa: E402
from surgery.debias.pipeline import balance_candidate, run_search  # noqa: E402
from surgery.debias.probes import build_probes, embed_prompts  # noqa: E402
from surgery.io.retrieval import load_retrieval_set  # noqa: E402
from surgery.model.loading import load  # noqa: E402
from surgery.world.generator import balanced_size  # noqa: E402
from surgery.world.prompts import group_prompts, neutral_queries  # noqa: E402

FIGURES = ("max_skew", "group_accuracy", "recall", "recall_i2t")


def folders(world: ws.SuiteWorld, work: str) -> tuple[str, str, str]:
    """(probe images, file,group labels CSV, retrieval captions.csv), as world_suite writes them."""
    params = ws.world_params(world)
    probe, retrieval = os.path.join(work, "labels"), os.path.join(work, "retrieval")
    for out, seed, n in ((probe, params.seed + ws.LABELS_SEED_OFFSET, 2 * balanced_size(params)),
                         (retrieval, params.seed + ws.RETRIEVAL_SEED_OFFSET, balanced_size(params))):
        run = ws._cli("world", "generate", "--out", out, "--like", ws.model_path(world), "--seed", str(seed),
                      "--n", str(n))
        if run.returncode != 0:
            raise SystemExit(run.stderr.strip().splitlines()[-1])
    labels = os.path.join(ws.write_group_only(probe, params), "labels.csv")
    return os.path.join(probe, "images"), labels, os.path.join(retrieval, "captions.csv")


def rows_for(world: ws.SuiteWorld) -> list[str]:
    params = ws.world_params(world)
    loaded = load(ws.model_path(world))
    out = []
    with tempfile.TemporaryDirectory(prefix="clipsurgery-labels-") as work:
        images, labels, captions = folders(world, work)
        for mode in ("open", "fixed"):
            options = DebiasOptions(balance_mode=mode, heads=False, neurons=False)
            probes = build_probes(loaded, ws.model_path(world), options, work, images, labels, None, lambda m: None,
                                  neutral_queries(params), dict(zip(params.groups, group_prompts(params))),
                                  load_retrieval_set(captions))
            prompts = embed_prompts(loaded, probes, lambda m: None)
            search = run_search(loaded, probes, prompts, options, None, None, balance_candidate(prompts, options),
                                lambda m: None)
            trial = next(step for step in search.steps if step.get("balance"))
            misses = options.selection_budget().misses(search.before, trial, options.k)
            cells = " | ".join(f"{search.before[k]:.3f} -> {trial[k]:.3f}" for k in FIGURES)
            out.append(f"| {world.name} | {mode} | {cells} | {'; '.join(misses) or 'none'} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("worlds", nargs="+", help="suite world names")
    args = ap.parse_args(argv)
    names = {w.name: w for w in ws.SUITE}
    unknown = [n for n in args.worlds if n not in names]
    if unknown:
        ap.error(f"unknown world {unknown[0]!r}; the suite has {', '.join(names)}")
    print("| world | balance | MaxSkew@50 | group accuracy | t2i@5 | i2t@5 | selection budgets missed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.worlds:
        for row in rows_for(names[name]):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
