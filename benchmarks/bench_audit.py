"""Audit speed and memory (issue 4), ViT-B-32 with random weights (timing only).

    python benchmarks/bench_audit.py [--n 512] [--sweep-n 32] [--device cpu|cuda]

Prints, side by side from one run:
  1. time(audit with the cheap scores a, b, d) / time(one plain forward pass over the same images)  (target <= 3)
  2. the full ablation sweep over all 144 heads with activation reuse vs naive full forward passes
     (naive measured on 12 heads and scaled to 144)  (expect ~2x from reuse alone)
  3. peak resident memory of the cheap audit at two probe sizes (target: does not grow)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


class RandomImages:
    """Deterministic random 'images' generated per index: memory independent of the set's size."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return torch.stack([torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(i))
                            for i in range(*sl.indices(self.n))])


def setup(n: int, device: str):
    from surgery.audit.probe import ProbeSet
    from surgery.model.arch import build_model, get_config
    from surgery.model.preprocess import tokenizer_info

    torch.manual_seed(0)
    cfg = get_config("ViT-B-32")
    model = build_model(cfg).to(device)
    probe = ProbeSet(images=RandomImages(n, 224), groups=torch.arange(n) % 2, group_names=["a", "b"],
                     queries=[f"a photo of a {w}" for w in ("doctor", "nurse", "pilot", "chef", "teacher", "judge")],
                     group_prompts=["a photo of a man", "a photo of a woman"])
    return model, probe, tokenizer_info(cfg)


def cheap_audit(model, probe, tokenizer, batch_size):
    from surgery.audit.vision import AuditOptions, audit_vision

    return audit_vision(model, probe, tokenizer, AuditOptions(k=min(50, len(probe) // 2), sweep=False,
                                                            textspan_iterations=0, batch_size=batch_size))


def memory_child(n: int, device: str) -> None:
    model, probe, tokenizer = setup(n, device)
    cheap_audit(model, probe, tokenizer, 64)
    print(json.dumps({"n": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--sweep-n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-child", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: sweep,memory")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.device)
        return
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model, probe, tokenizer = setup(args.n, args.device)
    with torch.no_grad():
        model.encode_image(probe.images[0:2].to(args.device))  # warm-up
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for images, _ in probe.batches(args.batch_size):
            model.encode_image(images.to(args.device))
    sync()
    plain = time.perf_counter() - start
    warm = setup(2 * args.batch_size, args.device)[1]  # compiles Triton kernels (specialised on shapes) first
    cheap_audit(model, warm, tokenizer, args.batch_size)
    sync()
    start = time.perf_counter()
    result = cheap_audit(model, probe, tokenizer, args.batch_size)
    sync()
    audit = time.perf_counter() - start
    print(f"ViT-B-32 random weights, {args.n} images, batch {args.batch_size}, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"1. plain forward {plain:.2f} s | audit (a, b, d) {audit:.2f} s | ratio {audit / plain:.2f} (target <= 3)"
          f" | stages {json.dumps({k: round(v, 2) for k, v in result.timings.items()})}")

    if "sweep" not in args.skip:
        sweep_ratio(args, tokenizer, sync)
    if "memory" not in args.skip:
        memory_rows(args)


def sweep_ratio(args, tokenizer, sync) -> None:
    from surgery.audit.ablation import SweepOptions, ablation_sweep, evaluate_head_set, head_means
    from surgery.model.encode import text_embeddings

    small, small_probe, _ = setup(args.sweep_n, args.device)
    queries = text_embeddings(small, small_probe.queries, tokenizer)
    means = head_means(small, small_probe)
    sync()
    start = time.perf_counter()
    ablation_sweep(small, small_probe, queries, None, means, SweepOptions(batch_size=args.sweep_n, k=4))
    sync()
    sweep = time.perf_counter() - start
    start = time.perf_counter()
    for head in range(12):  # naive: one full forward pass per ablated head
        evaluate_head_set(small, small_probe, [(head % 12, head)], means, queries, k=4, batch_size=args.sweep_n)
    sync()
    naive = (time.perf_counter() - start) * 12
    print(f"2. sweep of 144 heads on {args.sweep_n} images: reuse {sweep:.1f} s | naive {naive:.1f} s "
          f"(12 heads measured x 12) | naive/reuse {naive / sweep:.2f}")


def memory_rows(args) -> None:
    rows = []
    for n in (args.n // 4, args.n):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--device", args.device],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print("3. peak RSS of the cheap audit: " + ", ".join(f"{r['n']} images {r['peak_rss_mb']:.0f} MB" for r in rows))


if __name__ == "__main__":
    main()
