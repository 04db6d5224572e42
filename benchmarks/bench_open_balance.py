"""What the open balance costs at serving time (issue 28): text encoding through ONNX Runtime with it
and without it, side by side in one run (the ratio is what to read; absolute times move with the machine).

    python benchmarks/bench_open_balance.py                  # the bundled world model and ViT-B-32
    python benchmarks/bench_open_balance.py --arch ViT-L-14  # another open_clip architecture

Two models: the bundled world model with the open balance ``clipsurgery debias`` fits for it (its
bank: the first selection draw's images, 512 per group), and an open_clip architecture with random
weights (no weights can be downloaded here; the cost does not depend on them) with a bank of
``--bank-per-group`` random unit vectors for each of ``--groups`` groups, the largest bank a plan
may carry being 8,192 images. Batch 1 and 32, the ``plain`` and ``ort`` graphs; medians of
interleaved rounds (bench_onnx.timed_rounds).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_onnx import cpu_name, timed_rounds  # noqa: E402

import surgery  # noqa: E402
from surgery.audit.probe import world_probe_set  # noqa: E402
from surgery.debias.balance import Draw  # noqa: E402
from surgery.debias.open_balance import OpenBalanceOptions, fit_open_balance  # noqa: E402
from surgery.debias.probes import SELECTION_SEED_OFFSET  # noqa: E402
from surgery.edit.bake import bake  # noqa: E402
from surgery.edit.plan import SurgeryPlan  # noqa: E402
from surgery.export.onnx import OnnxOptions, export_onnx  # noqa: E402
from surgery.io.onnx import ort_session  # noqa: E402
from surgery.model.arch import build_model, get_config  # noqa: E402
from surgery.model.encode import text_embeddings  # noqa: E402
from surgery.model.loading import LoadedModel  # noqa: E402
from surgery.model.preprocess import default_preprocess, tokenize, tokenizer_info  # noqa: E402
from surgery.world.checkpoint import world_params_of  # noqa: E402
from surgery.world.prompts import group_prompts, neutral_queries  # noqa: E402


def world_plan(loaded: LoadedModel) -> SurgeryPlan:
    """The open balance of the bundled world as debias fits it (first selection draw as the bank)."""
    params = world_params_of(loaded)
    probe = world_probe_set(dataclasses.replace(params, seed=params.seed + SELECTION_SEED_OFFSET), loaded.preprocess)
    with torch.no_grad():
        images = loaded.model.encode_image(probe.images[0:len(probe)])
    texts = lambda xs: text_embeddings(loaded.model, xs, loaded.tokenizer)  # noqa: E731
    fit = fit_open_balance(texts(neutral_queries(params)), texts(group_prompts(params)),
                           [Draw(images, probe.groups)], params.n_groups, OpenBalanceOptions())
    return SurgeryPlan(open_balance=[fit.edit({})])


def random_plan(width: int, groups: int, per_group: int, seed: int = 0) -> SurgeryPlan:
    """An open balance of the given size with random bank and prompts (the cost does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(groups * per_group, width, generator=gen)
    labels = torch.arange(groups).repeat_interleave(per_group)
    prompts, queries = torch.randn(groups, width, generator=gen), torch.randn(8, width, generator=gen)
    fit = fit_open_balance(queries, prompts, [Draw(images, labels)], groups,
                           OpenBalanceOptions(bank_per_group=per_group))
    return SurgeryPlan(open_balance=[fit.edit({})])


def random_loaded(arch: str) -> LoadedModel:
    torch.manual_seed(0)
    cfg = get_config(arch)
    return LoadedModel(model=build_model(cfg).eval(), arch=arch, config=cfg, source="random", format="builtin",
                       sha256=None, preprocess=default_preprocess(cfg), tokenizer=tokenizer_info(cfg))


def rows_for(name: str, loaded: LoadedModel, plan: SurgeryPlan, root: str, batches: list[int], rounds: int,
             per_block: int) -> list[str]:
    patched = dataclasses.replace(loaded, model=bake(copy.deepcopy(loaded.model), plan))
    files = {}
    for graph in ("plain", "ort"):  # like against like: each graph kind with and without the open balance
        for label, model, the_plan in (("without", loaded, SurgeryPlan()), ("with", patched, plan)):
            out = os.path.join(root, f"{name}-{label}-{graph}.onnx")
            export_onnx(model, out, the_plan, OnnxOptions(tower="text", graph=graph))
            files[(graph, label)] = out
    sessions = {key: ort_session(path) for key, path in files.items()}
    texts = [f"a photo of a {w}" for w in ("circle", "square", "nurse", "doctor", "star", "ring", "cat", "dog")]
    edit = plan.open_balance[0]
    lines = []
    for batch in batches:
        ids = tokenize((texts * (batch // len(texts) + 1))[:batch], loaded.tokenizer).numpy().astype(np.int64)
        fns = {key: (lambda s=s: s.run(None, {"input_ids": ids})) for key, s in sessions.items()}
        times = timed_rounds(fns, rounds, per_block)
        for graph in ("plain", "ort"):
            without, with_ = times[(graph, "without")], times[(graph, "with")]
            lines.append(f"| {name} | {len(edit.bank)} ({len(edit.group_counts)} groups) | {batch} | {graph} | "
                         f"{1e3 * without:.2f} | {1e3 * with_:.2f} | {with_ / without:.2f}x |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture with random weights (or 'none')")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--bank-per-group", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-block", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (ORT uses its defaults)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# open balance cost: ONNX Runtime text tower, {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| model | bank images | batch | graph | without ms | with ms | with / without |")
    print("|---|---|---|---|---|---|---|")
    root = tempfile.mkdtemp(prefix="bench-open-")
    try:
        world = surgery.load("builtin:world")
        for line in rows_for("bundled world", world, world_plan(world), root, args.batches, args.rounds,
                             args.per_block):
            print(line, flush=True)
        if args.arch != "none":
            loaded = random_loaded(args.arch)
            width = int(loaded.config["embed_dim"])
            plan = random_plan(width, args.groups, args.bank_per_group)
            for line in rows_for(f"{args.arch} (random weights)", loaded, plan, root, args.batches, args.rounds,
                                 args.per_block):
                print(line, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
