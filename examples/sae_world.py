"""Issue 5's acceptance on the planted-bias world: an SAE trained without labels, its social
neurons, and what deactivating them does to bias and accuracy.

    python examples/sae_world.py          # best setting found: embedding site, Matryoshka BatchTopK k=4
    python examples/sae_world.py --site residual --k 20 --matryoshka "" --steps 1500 --top-n 3 --select top   # seed 001's

Steps: (1) cache the vision tower's activations of unlabelled train-split images; (2) train the
SAE; (3) find social neurons on a labelled, balanced search set (candidates: seed 001's rule, top
40 per group), and choose among them greedily on eight other draws of the world, as
``clipsurgery debias`` does (``--select top`` deactivates every candidate); (4) on a held-out
balanced evaluation set, deactivate them (a = 0.6 and 1.0, both forms) and measure:
* the colour accuracy of two linear probes on the image embeddings (chance = 1/groups): a fixed
  probe, trained on the unedited embeddings of the search half and applied to the edited ones
  (what a group classifier built on the shipped model's features sees), and a probe retrained on
  the edited embeddings (2-fold cross-validation: is colour still linearly present at all?);
* mean MaxSkew@50 of the neutral concept queries (uniform target, empty groups smoothed to 1/50);
* zero-shot concept and group accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import surgery
from surgery import metrics
from surgery import sae as S
from surgery.metrics.linear_probe import cross_validated_accuracy, fit_linear_probe, probe_accuracy
from surgery.model.preprocess import images_to_tensor, tokenize
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import generate
from surgery.world.prompts import group_prompts, neutral_queries
from surgery.world.train import WORLD_TOKENIZER


def figures(img: torch.Tensor, concepts: torch.Tensor, groups: torch.Tensor, concept_txt: torch.Tensor,
            group_txt: torch.Tensor, n_groups: int, fixed_probe) -> dict:
    img_n = F.normalize(img, dim=-1)
    scores = F.normalize(concept_txt, dim=-1) @ img_n.T  # (C, n)
    return {
        "probe_group_accuracy": cross_validated_accuracy(img, groups, n_groups),
        "fixed_probe_group_accuracy": probe_accuracy(fixed_probe, img, groups),
        "max_skew_at_50": metrics.max_skew_at_k(scores, groups, 50, n_groups, "uniform", reduce="mean"),
        "concept_accuracy": metrics.zero_shot_accuracy(img, concept_txt, concepts),
        "zero_shot_group_accuracy": metrics.zero_shot_accuracy(img, group_txt, groups),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:world")
    ap.add_argument("--site", choices=["residual", "embedding"], default="embedding")
    ap.add_argument("--kind", choices=list(S.KINDS), default="batchtopk")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--matryoshka", default="2,8,32", help="nested prefix sizes ('' for none)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 1024 residual, 256 embedding")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=4000, help="unlabelled train-split images for the SAE")
    ap.add_argument("--n-search", type=int, default=1200, help="labelled balanced images for the neuron search")
    ap.add_argument("--n-eval", type=int, default=1200, help="held-out balanced images for the figures")
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--top-n", type=int, default=40, help="candidates per group (top by consistency x specificity)")
    ap.add_argument("--select", choices=["greedy", "top"], default="greedy",
                    help="greedy: the fewest candidates that meet the targets on 8 other draws of the world (what "
                         "clipsurgery debias does); top: deactivate every candidate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write all figures to this JSON file")
    args = ap.parse_args(argv)
    if args.select == "greedy" and args.site != "embedding":
        ap.error("--select greedy edits embeddings; with --site residual use --select top")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    loaded = surgery.load(args.model)
    model, params = loaded.model.eval(), world_params_of(loaded)
    pre = loaded.preprocess
    site = S.Site("vision", args.site)
    work = tempfile.mkdtemp(prefix="sae_world_")

    # 1-2: unlabelled activations -> SAE
    train_images = images_to_tensor(generate(params, "train", args.n_train).images, pre)
    cache = S.build_cache(model, site, train_images.split(256), os.path.join(work, "cache"), seed=args.seed)
    batch = args.batch_size or (1024 if args.site == "residual" else 256)
    prefixes = tuple(int(m) for m in args.matryoshka.split(",")) if args.matryoshka else ()
    cfg = S.SAEConfig(d_in=cache.d, expansion=args.expansion, kind=args.kind, k=args.k, site=site.site,
                      tower=site.tower, dead_after=max(20 * batch, 20_000), matryoshka=prefixes)
    sae, history = S.train_sae(cache, cfg, S.TrainOptions(steps=args.steps, batch_size=batch, lr=args.lr,
                                                          seed=args.seed))
    rec = S.evaluate_sae(sae, cache)
    print(f"SAE {args.kind} x{args.expansion} k={args.k} matryoshka={list(prefixes)} on vision/{args.site}: {cache.rows} rows, "
          f"{history['steps']} steps in {history['seconds']} s")
    print(f"  NMSE {rec.nmse:.4f}  explained variance {rec.explained_variance:.4f}  L0 {rec.l0:.1f}  "
          f"dead {rec.dead_fraction:.3f}")

    # 3: neuron search on a labelled balanced set (a different seed's world images than the eval set)
    search = generate(params, "eval", args.n_search + args.n_eval)
    idx_search = torch.arange(0, len(search), 2)
    idx_eval = torch.arange(1, len(search), 2)
    all_images = images_to_tensor(search.images, pre)
    groups_all = torch.from_numpy(search.groups)
    concepts_all = torch.from_numpy(search.concepts)
    latents = S.sample_latents(model, sae, all_images[idx_search].split(256))
    report = S.find_neurons(latents, groups_all[idx_search], list(params.groups), S.NeuronOptions(tau=args.tau,
                            top_n=args.top_n), attribute="colour")
    # Rule check on the held-out set: do the selected latents fire for one group only there too?
    held = S.sample_latents(model, sae, all_images[idx_eval].split(256))
    rule_rows = []
    for gi, name in enumerate(params.groups):
        for lid in report.selected[name]:
            freq = [float((held[groups_all[idx_eval] == h, lid] > 0).float().mean()) for h in range(params.n_groups)]
            rule_rows.append({"group": name, "latent": lid, "held_out_freq_per_group": [round(f, 3) for f in freq]})
    print(f"social neurons (tau={args.tau}): rule {report.rule}")
    print(f"  selected top-{args.top_n}: {report.selected}")
    for row in rule_rows:
        print(f"  latent {row['latent']:4d} ({row['group']}): held-out firing rate per group "
              f"{dict(zip(params.groups, row['held_out_freq_per_group']))}")

    # 4: figures on the held-out balanced half
    images, groups, concepts = all_images[idx_eval], groups_all[idx_eval], concepts_all[idx_eval]
    with torch.no_grad():
        concept_txt = model.encode_text(tokenize(neutral_queries(params), WORLD_TOKENIZER)).float()
        group_txt = model.encode_text(tokenize(group_prompts(params), WORLD_TOKENIZER)).float()
    zs = S.zero_shot_with_replacement(model, sae, site, images, concepts, tokenize(neutral_queries(params), WORLD_TOKENIZER))
    print(f"zero-shot concept accuracy with the representation replaced by its reconstruction: "
          f"{zs['zero_shot_accuracy']:.4f} -> {zs['zero_shot_accuracy_replaced']:.4f}")
    # The fixed probe is what a group classifier trained on the unedited model's features sees after
    # the edit: fitted on the search half's unedited embeddings, applied to the edited held-out ones.
    fixed_probe = fit_linear_probe(S.encode_images_replaced(model, all_images[idx_search]), groups_all[idx_search],
                                   params.n_groups)
    base = figures(S.encode_images_replaced(model, images), concepts, groups, concept_txt, group_txt, params.n_groups,
                   fixed_probe)
    rows = [("original", None, None, base)]
    if args.select == "greedy":  # selection draws: other seeds of the world than the search/eval images
        from surgery.audit.probe import world_probe_set
        from surgery.debias.budget import Budget
        from surgery.debias.neurons import NeuronStageOptions, greedy_neurons

        draws = [world_probe_set(dataclasses.replace(params, seed=params.seed + 1000 + i), pre, args.n_search)
                 for i in range(8)]
        with torch.no_grad():
            draw_embs = [S.encode_images_replaced(model, d.images) for d in draws]
        queries = torch.nn.functional.normalize(concept_txt, dim=-1)
    chosen_ids = {}
    for form in S.FORMS:
        for alpha in (0.6, 1.0):
            ids = report.selected_ids
            if args.select == "greedy":
                ids = greedy_neurons(sae, ids, draw_embs, draws, queries, queries,
                                     Budget(max_bias_ratio=0.45, max_accuracy_drop=0.015), 50,
                                     NeuronStageOptions(alpha=alpha, form=form))[0]  # debias's margins
            chosen_ids[f"{form} a={alpha}"] = ids
            print(f"  {form} a={alpha}: deactivating {len(ids)} latents {ids}")
            fix = S.deactivation(sae, ids, alpha, form)
            img = S.encode_images_replaced(model, images, fix, site)
            rows.append((form, alpha, fix, figures(img, concepts, groups, concept_txt, group_txt, params.n_groups,
                                                      fixed_probe)))

    chance = 1 / params.n_groups
    print(f"\nheld-out balanced set: {len(images)} images; linear-probe chance = {chance:.2f}; "
          f"MaxSkew@50 mean over {params.n_concepts} neutral queries, uniform target")
    print("probe grp acc: group accuracy of a linear probe; 'fixed' was trained on the unedited embeddings of the\n"
          "search half, 'retrained' is refitted on the edited embeddings (2-fold CV); chance = 1/groups")
    head = f"{'edit':<24}{'fixed':>8}{'retrained':>11}{'MaxSkew@50':>12}{'skew cut':>10}{'concept acc':>13}{'drop (pts)':>11}{'zs grp acc':>11}"
    print(head)
    print("-" * len(head))
    results = []
    for form, alpha, _fix, f in rows:
        label = "original" if form == "original" else f"{form} a={alpha}"
        cut = 1 - f["max_skew_at_50"] / base["max_skew_at_50"]
        drop = 100 * (base["concept_accuracy"] - f["concept_accuracy"])
        print(f"{label:<24}{f['fixed_probe_group_accuracy']:>8.4f}{f['probe_group_accuracy']:>11.4f}{f['max_skew_at_50']:>12.4f}{cut:>10.1%}"
              f"{f['concept_accuracy']:>13.4f}{drop:>11.2f}{f['zero_shot_group_accuracy']:>11.4f}")
        results.append({"form": form, "alpha": alpha, **f, "skew_cut": cut, "concept_drop_points": drop})
    passed = {f"{r['form']} a={r['alpha']}": bool(r["skew_cut"] >= 0.5 and r["concept_drop_points"] <= 2.0)
              for r in results if r["alpha"] is not None}
    print(f"\nacceptance (skew cut >= 50% and concept drop <= 2 points): {passed}")
    print(f"total {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "sae_metrics": vars(rec), "history": history, "neurons": report.to_dict(),
                       "held_out_rule_check": rule_rows, "chosen_ids": chosen_ids, "reconstruction_zero_shot": zs, "results": results,
                       "acceptance": passed}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
