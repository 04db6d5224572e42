"""The audit on a GPU (issue 17): time of each stage / one forward pass over the same images,
the triton and sdpa attention backends side by side. Random weights (timing only).

    python benchmarks/bench_gpu_audit.py [--arch ViT-L-14] [--n 2048] [--batch-size 64] [--markdown OUT.md]

Stages, as `clipsurgery audit --device cuda` runs them: (a, b) the decomposition pass, (d) the
gradient pass (both fp32), (c) the full ablation sweep over every head (bf16 autocast, CUDA graphs
for full batches). The forward pass it is divided by is `encode_image` over the same images in fp32
with the same backend. Needs a CUDA device; refuses without one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_audit import RandomImages  # noqa: E402


def setup(arch: str, n: int):
    from surgery.audit.probe import ProbeSet
    from surgery.model.arch import build_model, get_config
    from surgery.model.preprocess import tokenizer_info

    torch.manual_seed(0)
    cfg = get_config(arch)
    model = build_model(cfg).cuda().eval()
    size = cfg["vision_cfg"]["image_size"]
    probe = ProbeSet(images=RandomImages(n, size), groups=torch.arange(n) % 2, group_names=["a", "b"],
                     queries=[f"a photo of a {w}" for w in ("doctor", "nurse", "pilot", "chef", "teacher", "judge")],
                     group_prompts=["a photo of a man", "a photo of a woman"])
    return model, probe, tokenizer_info(cfg)


def forward_time(model, probe, batch_size: int, backend: str) -> float:
    from surgery.model.attention import head_masked

    with torch.no_grad(), head_masked(model, towers=("vision",), backend=backend):
        model.encode_image(probe.images[0:batch_size].cuda())  # warm-up (compiles, tunes)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for images, _ in probe.batches(batch_size):
            model.encode_image(images.cuda())
        torch.cuda.synchronize()
    return time.perf_counter() - start


def audit_times(model, probe, tokenizer, batch_size: int, backend: str) -> dict:
    from surgery.audit.vision import AuditOptions, audit_vision

    options = AuditOptions(k=50, batch_size=batch_size, backend=backend, sweep=True, propose=False,
                           sweep_autocast=torch.bfloat16, textspan_iterations=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = audit_vision(model, probe, tokenizer, options)
    torch.cuda.synchronize()
    return {**result.timings, "total": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backends", default="triton,sdpa")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_audit: no CUDA device found; this benchmark needs a GPU. Nothing was run.")
    model, probe, tokenizer = setup(args.arch, args.n)
    _, warm, _ = setup(args.arch, 2 * args.batch_size)  # compiles kernels, captures graphs' shapes once
    header = (f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
              f"{args.arch} random weights, {args.n} images at {probe.images.size} px, batch {args.batch_size}; "
              "(a, b), (d) fp32; sweep (c) bf16 autocast + CUDA graphs")
    print(header, flush=True)
    rows = []
    for backend in args.backends.split(","):
        plain = forward_time(model, probe, args.batch_size, backend)
        audit_times(model, warm, tokenizer, args.batch_size, backend)
        t = audit_times(model, probe, tokenizer, args.batch_size, backend)
        rows.append((backend, plain, t))
        print(f"{backend}: forward {plain:.2f} s | {json.dumps({k: round(v, 2) for k, v in t.items()})}", flush=True)
    lines = ["| backend | forward s | (a, b) / fwd | (d) / fwd | sweep (c) / fwd | total / fwd |", "|---|---|---|---|---|---|"]
    for backend, plain, t in rows:
        lines.append(f"| {backend} | {plain:.2f} | {t['decomposition_a_b'] / plain:.2f} | {t['gradient_d'] / plain:.2f} "
                     f"| {t['ablation_sweep_c'] / plain:.2f} | {t['total'] / plain:.2f} |")
    if len(rows) == 2:
        (b0, _, t0), (b1, _, t1) = rows
        lines.append(f"\n{b1} / {b0} total audit time: {t1['total'] / t0['total']:.2f}x")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(header.replace("\n", "  \n") + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
