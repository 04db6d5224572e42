"""Can a threshold on lean tell a world's group-naming texts from its neutral ones? (issue 28's gate)

    python benchmarks/gate_overlap.py MODEL [MODEL ...]

Fits the open balance as debias does on a world (bank: the first selection draw; gate calibrated on
the world's neutral queries less its last two concepts) and prints, over every neutral query in
every wording and every group-naming text (the first selection draw's distinct captions and the
world's "a photo of a red circle" queries), the most a neutral text leans and the least a naming
text leans (in units of the group prompts' own lean), beside the gate's thresholds. Where the first
is above the second, no threshold on lean separates them.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

import surgery
from surgery.audit.probe import world_probe_set
from surgery.debias.balance import Draw
from surgery.debias.open_balance import OpenBalanceOptions, fit_open_balance
from surgery.debias.probes import SELECTION_SEED_OFFSET
from surgery.model.encode import text_embeddings
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import balanced_size
from surgery.world.prompts import cell_queries, group_prompts, neutral_queries, query_wordings


def overlap(model: str) -> str:
    loaded = surgery.load(model)
    params = world_params_of(loaded)
    texts = lambda xs: text_embeddings(loaded.model, xs, loaded.tokenizer).float()  # noqa: E731
    probe = world_probe_set(dataclasses.replace(params, seed=params.seed + SELECTION_SEED_OFFSET), loaded.preprocess,
                            balanced_size(params))
    with torch.no_grad():
        images = loaded.model.encode_image(probe.images[0:len(probe)])
    fit = fit_open_balance(texts(neutral_queries(params)[:-2]), texts(group_prompts(params)),
                           [Draw(images, probe.groups)], params.n_groups, OpenBalanceOptions())
    neutral = fit.module.lean(texts(neutral_queries(params) + [q for qs in query_wordings(params).values() for q in qs]))
    naming = fit.module.lean(texts(sorted(set(probe.captions)) + [q for q, _ in cell_queries(params)]))
    c = fit.calibration
    return (f"| {model} | {float(neutral.max()):.2f} | {float(naming.min()):.2f} | {float(naming.quantile(0.05)):.2f} | "
            f"{c.gate_lo:.2f} / {c.gate_hi:.2f} | {'yes' if float(neutral.max()) < float(naming.min()) else 'NO'} |")


def main() -> None:
    torch.set_num_threads(1)
    print("| world | neutral: most lean | naming: least lean | naming: 5% quantile | gate lo / hi | separable |")
    print("|---|---|---|---|---|---|")
    for model in sys.argv[1:]:
        print(overlap(model), flush=True)


if __name__ == "__main__":
    main()
