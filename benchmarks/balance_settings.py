"""The balance edit's settings side by side on one world model, and the noise floor of its recall figure.

    python benchmarks/balance_settings.py builtin:world
    python benchmarks/balance_settings.py ~/.cache/clipsurgery/world-suite/tex2.safetensors --noise

The fit runs as ``clipsurgery debias`` runs it (surgery.debias.balance.fit_balance on the eight
selection draws, seeds + 1000..1007; the text pool: the class prompts, and every distinct caption
and the group prompts at the anchor weight), once per setting below, and each map is scored in embedding
space (the map applied to every text; equal to the exported model, tests/export) on the world's
eval split (the report's images) and a fresh draw (seed + 5000): mean and worst-query cut of mean
MaxSkew@50, the mean cut for the queries in the world's other caption wordings, and the change (in
points; negative = lost) of concept accuracy, zero-shot group accuracy, both Recall@5 and the
group-naming queries' precision@50.

``--fresh-draws N``: per setting, the text->image Recall@5 drop on N more fresh draws (seed + 5100
+ i), its mean and standard deviation: one draw's figure moves by a few points whatever the edit.

``--noise``: the text->image Recall@5 change under random maps of a tenth of the fitted map's
size (ten draws): what any small change of the text embeddings does to that figure on this world,
whose captions' positives are only the images that drew that exact wording.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F

from surgery import metrics
from surgery.audit.probe import caption_recalls, world_probe_set
from surgery.debias.balance import BalanceOptions, Draw, Texts, fit_balance
from surgery.debias.probes import SELECTION_SEED_OFFSET
from surgery.model.encode import caption_embeddings, image_embeddings, text_embeddings
from surgery.model.loading import load
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import balanced_size
from surgery.world.prompts import cell_queries, group_prompts, neutral_queries, query_wordings

K = 50
FRESH_SEED_OFFSET = 5000
#: the group values in four more phrasings, tried as extra anchors and dropped (pipeline.balance_candidate)
EXTRA_PHRASINGS = ("{}", "a photo of a {} person", "a photo of something {}", "a {} thing")
SETTINGS = {  # name -> BalanceOptions fields, plus "captions" (their weight) and "extra" (EXTRA_PHRASINGS as anchors)
    "default": {},
    "captions weigh 1": {"captions": 1.0},
    "extra group phrasings": {"extra": True},
    "depth 1": {"depth": 1.0},
    "depth 4": {"depth": 4.0},
    "ridge 0.1": {"ridge": 0.1},
    "ridge 0.001": {"ridge": 0.001},
    "anchor weight 1": {"anchor_weight": 1.0},
    "anchor weight 10": {"anchor_weight": 10.0},
    "1 iteration": {"iterations": 1},
    "image side": {"side": "image"},
}


@dataclasses.dataclass
class Split:
    probe: object  # ProbeSet
    images: torch.Tensor  # (N, D) unnormalised


def split(loaded, params, seed: int) -> Split:
    probe = world_probe_set(dataclasses.replace(params, seed=seed), loaded.preprocess, balanced_size(params))
    with torch.no_grad():
        raw = torch.cat([loaded.model.encode_image(x).float() for x, _ in probe.batches(256)])
    return Split(probe, raw)


def figures(fit, split_: Split, texts: dict, params) -> dict:
    """Every figure of one split with the map applied (``fit`` None: the unedited model)."""
    through = (lambda t: F.normalize(fit.apply_texts(t), dim=-1)) if fit is not None else (lambda t: t)
    images = F.normalize(fit.apply_images(split_.images) if fit is not None else split_.images, dim=-1)
    probe, n_groups = split_.probe, len(params.groups)
    skew = lambda q: metrics.max_skew_at_k(through(q) @ images.T, probe.groups, K, n_groups)  # noqa: E731
    out = {"per_query": skew(texts["queries"]), "wordings": {w: skew(e) for w, e in texts["wordings"].items()}}
    out["accuracy"] = float(((through(texts["queries"]) @ images.T).argmax(0) == probe.concepts).double().mean())
    out["group_accuracy"] = float(((through(texts["groups"]) @ images.T).argmax(0) == probe.groups).double().mean())
    captions = caption_embeddings_of(texts, probe.captions)
    recall = caption_recalls(images, through(captions), probe.captions)
    out["t2i"], out["i2t"] = recall["t2i"], recall["i2t"]
    cells = through(texts["cells"])
    top = (cells @ images.T).topk(K, dim=1).indices
    hits = [float(((probe.concepts[idx] == c) & (probe.groups[idx] == g)).double().mean())
            for idx, (c, g) in zip(top, texts["cell_labels"])]
    out["naming_precision"] = sum(hits) / len(hits)
    return out


def caption_embeddings_of(texts: dict, captions: list[str]) -> torch.Tensor:
    return torch.stack([texts["caption_of"][c] for c in captions])


def cuts(before: dict, after: dict) -> dict:
    per = 1 - after["per_query"] / before["per_query"].clamp_min(1e-12)
    words = [1 - float(after["wordings"][w].mean() / before["wordings"][w].mean()) for w in before["wordings"]]
    words_worst = min(float((1 - after["wordings"][w] / before["wordings"][w].clamp_min(1e-12)).min())
                      for w in before["wordings"])
    out = {"mean_cut": 1 - float(after["per_query"].mean() / before["per_query"].mean()), "worst_cut": float(per.min()),
           "wordings_mean": sum(words) / len(words), "wordings_worst": words_worst}
    for key in ("accuracy", "group_accuracy", "t2i", "i2t", "naming_precision"):
        out[key] = 100 * (after[key] - before[key])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--noise", action="store_true", help="also the t2i@5 change under small random maps")
    ap.add_argument("--fresh-draws", type=int, default=0, help="per setting, the t2i@5 drop on this many more draws")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load(args.model)
    params = world_params_of(loaded)
    if params is None:
        ap.error(f"{args.model} carries no world; pass a world model")
    embed = lambda t: text_embeddings(loaded.model, t, loaded.tokenizer)  # noqa: E731
    selection = [split(loaded, params, params.seed + SELECTION_SEED_OFFSET + i) for i in range(8)]
    report, fresh = split(loaded, params, params.seed), split(loaded, params, params.seed + FRESH_SEED_OFFSET)
    every_caption = sorted({c for s in (*selection, report, fresh) for c in s.probe.captions})
    cells = cell_queries(params)
    texts = {"queries": embed(neutral_queries(params)), "groups": embed(group_prompts(params)),
             "wordings": {w: embed(q) for w, q in query_wordings(params).items()},
             "caption_of": dict(zip(every_caption, caption_embeddings(loaded.model, every_caption, loaded.tokenizer))),
             "cells": embed([t for t, _ in cells]),
             "cell_labels": [(params.concepts.index(lab["concept"]), params.groups.index(lab["group"])) for _, lab in cells]}
    distinct = sorted({c for s in selection for c in s.probe.captions})
    captions = embed(distinct)
    more = [split(loaded, params, params.seed + FRESH_SEED_OFFSET + 100 + i) for i in range(args.fresh_draws)]
    for s in more:
        missing = sorted(set(s.probe.captions) - set(texts["caption_of"]))
        if missing:
            texts["caption_of"].update(zip(missing, caption_embeddings(loaded.model, missing, loaded.tokenizer)))
    draws = [Draw(s.images, s.probe.groups) for s in selection]
    base = {name: figures(None, s, texts, params) for name, s in (("report", report), ("fresh", fresh))}
    print(f"{args.model}: groups {', '.join(params.groups)}; unedited mean MaxSkew@{K} "
          f"{float(base['report']['per_query'].mean()):.3f} (report) / {float(base['fresh']['per_query'].mean()):.3f} (fresh)")
    print("\n| setting | split | mean cut | worst query | other wordings: mean / worst | concept acc | group acc | "
          "t2i@5 | i2t@5 | naming P@50 |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    default_fit = None
    spreads = {}
    for name, change in SETTINGS.items():
        change = dict(change)
        caption_weight, extra = change.pop("captions", None), change.pop("extra", False)
        options = BalanceOptions(k=K, **change)
        anchors = [texts["groups"]]
        if extra:
            anchors.append(embed([t.format(g) for g in params.groups for t in EXTRA_PHRASINGS]))
        anchors = torch.cat(anchors)
        pool = torch.cat([texts["queries"], captions, anchors])  # the class prompts are the queries here
        weights = torch.cat([torch.ones(len(texts["queries"])),
                             torch.full((len(captions),), caption_weight or options.anchor_weight),
                             torch.full((len(anchors),), options.anchor_weight)])
        fit = fit_balance(Texts(texts["queries"], pool, weights), draws, len(params.groups), options)
        if more:
            drops = [-cuts(figures(None, s, texts, params), figures(fit, s, texts, params))["t2i"] for s in more]
            mean = sum(drops) / len(drops)
            sd = (sum((x - mean) ** 2 for x in drops) / max(1, len(drops) - 1)) ** 0.5
            spreads[name] = (mean, sd, drops)
        default_fit = default_fit or fit
        for split_name, s in (("report", report), ("fresh", fresh)):
            c = cuts(base[split_name], figures(fit, s, texts, params))
            print(f"| {name} | {split_name} | {c['mean_cut']:.1%} | {c['worst_cut']:.1%} | {c['wordings_mean']:.1%} / "
                  f"{c['wordings_worst']:.1%} | {c['accuracy']:+.1f} | {c['group_accuracy']:+.1f} | {c['t2i']:+.1f} | "
                  f"{c['i2t']:+.1f} | {c['naming_precision']:+.1f} |", flush=True)
    if spreads:
        print(f"\ntext->image Recall@5 drop (points; negative = a gain) on {args.fresh_draws} more fresh draws:")
        print("| setting | mean | standard deviation | per draw |\n| --- | ---: | ---: | --- |")
        for name, (mean, sd, drops) in spreads.items():
            print(f"| {name} | {mean:+.2f} | {sd:.2f} | {', '.join(f'{x:+.1f}' for x in drops)} |")
    if args.noise:
        size = float(default_fit.map.matrix().norm())
        gen = torch.Generator().manual_seed(0)
        print(f"\ntext->image Recall@5 change (points) under 10 random maps of a tenth of the default map's size "
              f"(Frobenius {size:.3f}):")
        for split_name, s in (("report", report), ("fresh", fresh)):
            changes = []
            for _ in range(10):
                a = torch.randn(default_fit.map.u.shape[0], default_fit.map.u.shape[0], generator=gen, dtype=torch.float64)
                a = a / a.norm() * 0.1 * size
                captions = caption_embeddings_of(texts, s.probe.captions)
                moved = F.normalize(captions.double() + captions.double() @ a.T, dim=-1).float()
                recall = caption_recalls(F.normalize(s.images, dim=-1), moved, s.probe.captions)["t2i"]
                changes.append(100 * (recall - base[split_name]["t2i"]))
            mean = sum(changes) / len(changes)
            std = (sum((x - mean) ** 2 for x in changes) / (len(changes) - 1)) ** 0.5
            print(f"- {split_name}: {', '.join(f'{x:+.1f}' for x in changes)} (mean {mean:+.1f}, std {std:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
