"""Where a world model's retrieval bias comes from, and what removing the group subspace would buy.

    python benchmarks/world_bias_anatomy.py builtin:world
    python benchmarks/world_bias_anatomy.py ~/.cache/clipsurgery/world-suite/col3.safetensors

On one balanced draw of the model's own world (seed + 9000, never used by the tool):
  1. per neutral query ("a photo of a circle"): the query's score on that concept's images, mean
     and std per group, the per-group zero-shot accuracy on them, and the group shares of its top
     50. A gap in the mean score between groups (the model recognises the concept better in its
     majority group) decides the top 50 even when every image is classified right.
  2. oracle edits that remove the group subspace, an upper bound for any edit that only removes
     a linear group direction (they use the group labels, which the tool's edits do not): the
     span of the group-mean image embeddings (image side) or of the group-prompt text embeddings
     (text side), projected out of the images, out of the neutral queries only, or out of every
     text. Printed: mean MaxSkew@50 cut, worst query cut, and the change of concept accuracy and
     of both Recall@5 (captions that name the group).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F

from surgery import metrics
from surgery.audit.ablation import head_edited_embeddings
from surgery.audit.probe import caption_recalls, world_probe_set
from surgery.model.encode import caption_embeddings, text_embeddings
from surgery.model.loading import load
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import balanced_size

ANATOMY_SEED_OFFSET = 9000
K = 50


def figures(images: torch.Tensor, probe, queries: torch.Tensor, classes: torch.Tensor, captions: torch.Tensor) -> dict:
    """Per-query MaxSkew@50 (Q,), concept accuracy and both Recall@5 for normalised (N, D) images."""
    per_query = metrics.max_skew_at_k(queries @ images.T, probe.groups, K, len(probe.group_names))
    accuracy = float(((classes @ images.T).argmax(0) == probe.concepts).double().mean())
    recall = caption_recalls(images, captions, probe.captions)
    return {"per_query": per_query, "accuracy": accuracy, **recall}


def without(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x (n, D) with the span of the orthonormal rows of ``basis`` (k, D) removed, renormalised."""
    return F.normalize(x - (x @ basis.T) @ basis, dim=-1)


def span(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (G-1, D) of the differences between G vectors (G, D)."""
    q, _ = torch.linalg.qr((vectors - vectors.mean(0)).T)
    return q.T[: vectors.shape[0] - 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a world model (builtin:world or a file trained by train_world / world_suite)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    loaded = load(args.model)
    params = world_params_of(loaded)
    if params is None:
        ap.error(f"{args.model} carries no world; pass a world model")
    probe = world_probe_set(dataclasses.replace(params, seed=params.seed + ANATOMY_SEED_OFFSET), loaded.preprocess,
                            balanced_size(params))
    model, tok = loaded.model, loaded.tokenizer
    queries = text_embeddings(model, probe.queries, tok)  # (Q, D): one query per concept, in concept order
    classes = text_embeddings(model, probe.class_prompts, tok)
    captions = caption_embeddings(model, probe.captions, tok)
    images = F.normalize(head_edited_embeddings(model, probe, {}, None), dim=-1)  # (N, D)
    names = probe.group_names
    print(f"{args.model}: {len(probe)} images, groups {', '.join(names)} (draw seed {params.seed + ANATOMY_SEED_OFFSET})")
    print("\n| query | " + " | ".join(f"{g}: score mean ± std, acc" for g in names) + " | top-50 shares |")
    print("| --- |" + " ---: |" * len(names) + " --- |")
    scores = queries @ images.T
    for c, text in enumerate(probe.queries):
        cells = []
        for g in range(len(names)):
            rows = (probe.concepts == c) & (probe.groups == g)
            s = scores[c, rows]
            acc = float(((classes @ images[rows].T).argmax(0) == c).double().mean())
            cells.append(f"{s.mean():.3f} ± {s.std():.3f}, {acc:.2f}")
        top = torch.bincount(probe.groups[scores[c].topk(K).indices], minlength=len(names))
        print(f"| {text} | " + " | ".join(cells) + " | " + " / ".join(str(int(t)) for t in top) + " |")
    base = figures(images, probe, queries, classes, captions)
    image_basis = span(torch.stack([images[probe.groups == g].mean(0) for g in range(len(names))]))
    text_basis = span(text_embeddings(model, probe.group_prompts, tok))
    print(f"\nunedited: mean MaxSkew@50 {base['per_query'].mean():.3f}; oracle removal of the group subspace:")
    print("| removed | from | mean cut | worst query cut | accuracy | t2i@5 | i2t@5 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for basis_name, basis in (("group-mean image directions", image_basis), ("group-prompt text directions", text_basis)):
        for where in ("images", "queries only", "every text"):
            imgs = without(images, basis) if where == "images" else images
            q = without(queries, basis) if where != "images" else queries
            c = without(classes, basis) if where == "every text" else classes
            cap = without(captions, basis) if where == "every text" else captions
            f = figures(imgs, probe, q, c, cap)
            cut = 1 - f["per_query"] / base["per_query"].clamp_min(1e-12)
            print(f"| {basis_name} | {where} | {1 - f['per_query'].mean() / base['per_query'].mean():.0%} | "
                  f"{float(cut.min()):.0%} | {100 * (f['accuracy'] - base['accuracy']):+.1f} | "
                  f"{100 * (f['t2i'] - base['t2i']):+.1f} | {100 * (f['i2t'] - base['i2t']):+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
