"""Dense vs sparse SAE training steps, side by side in one run (the ratio is what to read).

    python benchmarks/bench_sae_sparse.py [--widths 64 512] [--batch 1024] [--k 8]

One training step (forward, loss, backward) of surgery.sae.train.training_step on random inputs,
dense and sparse, F = 8 D, BatchTopK; medians of interleaved rounds. surgery.sae.train's
SPARSE_MIN_WIDTH (inputs at least this wide train on the sparse path) is set from this table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from surgery.sae import SAEConfig, SparseAutoencoder
from surgery.sae.train import training_step


def step_seconds(sae, x, dead, sparse: bool) -> float:
    sae.zero_grad()
    start = time.perf_counter()
    training_step(sae, x, dead, sparse=sparse).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"# dense vs sparse SAE training step: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, B = {args.batch}, k = {args.k}, F = 8 D")
    print("| D | dense ms | sparse ms | sparse / dense |")
    print("|---|---|---|---|")
    for width in args.widths:
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=width, expansion=8, kind="batchtopk", k=args.k)).train()
        x = torch.randn(args.batch, width)
        dead = torch.zeros(8 * width, dtype=torch.long)
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for sparse in (False, True):
                step_seconds(sae, x, dead, sparse)  # untimed: warm
                times[sparse].append(step_seconds(sae, x, dead, sparse))
        dense, sparse = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {width} | {1e3 * dense:.1f} | {1e3 * sparse:.1f} | {sparse / dense:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
