"""The open balance's selection figures on a world, draw by draw (why debias did or did not keep it).

    python benchmarks/open_balance_selection.py MODEL [--held-out 2]

Fits the open balance as debias does (bank: the first selection draw; gate: the world's neutral
queries less the last ``--held-out`` concepts, and its group prompts), then on two other selection
draws prints each budgeted figure before -> after and the share of captions the gate lets through
(gate > 0: partly corrected although they name a group).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

import surgery
from surgery.audit.probe import edit_figures, world_probe_set
from surgery.debias.balance import Draw
from surgery.debias.open_balance import OpenBalanceOptions, fit_open_balance
from surgery.debias.probes import SELECTION_SEED_OFFSET
from surgery.model.encode import text_embeddings
from surgery.world.checkpoint import world_params_of
from surgery.world.prompts import group_prompts, neutral_queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--held-out", type=int, default=2)
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = surgery.load(args.model)
    params = world_params_of(loaded)
    texts = lambda xs: F.normalize(text_embeddings(loaded.model, xs, loaded.tokenizer), dim=-1)  # noqa: E731
    queries = neutral_queries(params)
    q, g = texts(queries[:len(queries) - args.held_out]), texts(group_prompts(params))
    draws = []
    for i in range(3):
        probe = world_probe_set(dataclasses.replace(params, seed=params.seed + SELECTION_SEED_OFFSET + i),
                                loaded.preprocess)
        with torch.no_grad():
            draws.append((probe, loaded.model.encode_image(probe.images[0:len(probe)])))
    fit = fit_open_balance(q, g, [Draw(draws[0][1], draws[0][0].groups)], params.n_groups,
                           OpenBalanceOptions(neighbours=args.k))
    c = fit.calibration
    print(f"gate: lo {c.gate_lo:.3f}, hi {c.gate_hi:.3f}; listed queries lean at most {max(c.neutral_leans):.3f}, "
          f"query+group mixtures at least {min(c.naming_leans):.3f}")
    edited = lambda t: F.normalize(fit.apply_texts(t), dim=-1)  # noqa: E731
    for i, (probe, emb) in enumerate(draws[1:], start=1):
        caps = texts(probe.captions)
        img = F.normalize(emb, dim=-1)
        before = edit_figures(img, probe, q, q, args.k, caps, g)
        after = edit_figures(img, probe, edited(q), edited(q), args.k, edited(caps), edited(g))
        through = float((fit.module.gate(caps) > 0).float().mean())
        print(f"selection draw {i}: " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in before)
              + f"; captions the gate lets through: {through:.1%}")


if __name__ == "__main__":
    main()
