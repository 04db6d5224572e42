"""The open balance's settings side by side on one world model (its neighbours M and iterations).

    python benchmarks/open_balance_settings.py builtin:world
    python benchmarks/open_balance_settings.py $CLIPSURGERY_SUITE_DIR/tex2.safetensors --held-out 2

The open balance is fitted as debias fits it (bank: the first selection draw, seed + 1000; gate:
the world's neutral queries less the last ``--held-out`` concepts) for each setting, and every
neutral query in every wording is scored on a fresh draw (seed + 5000): mean cut of MaxSkew@50
(1 - sum after / sum before), the worst query's cut and the 10% quantile of the cuts.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

import surgery
from surgery import metrics
from surgery.audit.probe import world_probe_set
from surgery.debias.balance import Draw
from surgery.debias.open_balance import OpenBalanceOptions, fit_open_balance
from surgery.debias.probes import SELECTION_SEED_OFFSET
from surgery.model.encode import text_embeddings
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import balanced_size
from surgery.world.prompts import group_prompts, neutral_queries, query_wordings

FRESH_SEED_OFFSET = 5000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--held-out", type=int, default=2, help="concepts left out of the gate's calibration")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--neighbours", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = surgery.load(args.model)
    params = world_params_of(loaded)
    n = balanced_size(params)

    def draw(offset: int):
        probe = world_probe_set(dataclasses.replace(params, seed=params.seed + offset), loaded.preprocess, n)
        with torch.no_grad():
            return probe, loaded.model.encode_image(probe.images[0:len(probe)]).float()

    (bank_probe, bank), (fresh_probe, fresh) = draw(SELECTION_SEED_OFFSET), draw(FRESH_SEED_OFFSET)
    texts = lambda xs: text_embeddings(loaded.model, xs, loaded.tokenizer).float()  # noqa: E731
    queries = neutral_queries(params)
    listed, groups = texts(queries[:len(queries) - args.held_out]), texts(group_prompts(params))
    neutral = texts(queries + [q for qs in query_wordings(params).values() for q in qs])
    images = F.normalize(fresh, dim=-1)
    skew = lambda t: metrics.max_skew_at_k(F.normalize(t, dim=-1) @ images.T, fresh_probe.groups,  # noqa: E731
                                            args.k, params.n_groups)
    before = skew(neutral)
    print(f"{args.model}: {len(neutral)} neutral queries (every concept, every wording), fresh draw; "
          f"mean MaxSkew@{args.k} before {float(before.mean()):.3f}")
    print("| neighbours M | iterations | mean cut | worst query | 10% quantile |")
    print("|---|---|---|---|---|")
    for m in args.neighbours:
        for it in args.iterations:
            fit = fit_open_balance(listed, groups, [Draw(bank, bank_probe.groups)], params.n_groups,
                                   OpenBalanceOptions(neighbours=m, iterations=it, bank_per_group=max(512, m)))
            after = skew(fit.apply_texts(neutral))
            cut = 1 - after / before.clamp_min(1e-9)
            print(f"| {m} | {it} | {1 - float(after.sum()) / float(before.sum()):.0%} | {float(cut.min()):.0%} | "
                  f"{float(cut.quantile(0.1)):.0%} |", flush=True)


if __name__ == "__main__":
    main()
