"""Scale-out costs (issue 15), side by side in one run on this machine.

    python benchmarks/bench_scale.py                        # everything below (about 10 min on 2 cores)
    python benchmarks/bench_scale.py --only extract --images 2000 --rss-images 8000
    python benchmarks/bench_scale.py --only sae

extract: ``clipsurgery embed`` of ViT-B/32 (random weights) over N random 224 px JPEGs in
    WebDataset shards at the embedding site: 1 process x 2 threads vs ``--nproc 2`` (2 processes x
    1 thread, gloo). Wall time of the whole command (model load and launch included), images/s of
    the embedding itself (from the command's summary: rank 0's time from its start to the manifest),
    their ratio, and the peak RSS of the largest process of each run; then the 2-rank run again
    on ``--rss-images`` images, to show the peak RSS does not grow with the number of images.
sae: data-parallel SAE training on a synthetic cache of ViT-B-width rows (D = 768, F = 8 D,
    BatchTopK k = 32, global batch 4096): steps/s of 2 ranks x 1 thread vs 1 process x 2 threads
    (the training loop only, from the run's history), and the two runs' weights compared.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB of the largest process, stdout) of ``cmd`` in a fresh wrapper
    process (RUSAGE_CHILDREN is per wrapper, so runs do not mix)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "dt = time.perf_counter() - t; "
               "print(r.stdout); print(r.stderr[-2000:], file=sys.stderr); "
               "print('__BENCH__', dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("__BENCH__")][-1].split()
    if int(line[3]) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return float(line[1]), int(line[2]) / 1024, out.stdout


def _rate(stdout: str) -> float:
    """images/s of the embedding itself (model load excluded), from ``clipsurgery embed``'s summary line."""
    line = [ln for ln in stdout.splitlines() if ln.startswith("embedded ")][-1]
    return float(line.rsplit(",", 1)[1].split()[0])


def _vit_b32(workdir: str) -> str:
    import open_clip
    from safetensors.torch import save_file

    path = os.path.join(workdir, "vit_b32_random.safetensors")
    if not os.path.exists(path):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _shards(workdir: str, n: int, per_shard: int = 100) -> str:
    """n random 224 px JPEGs in img2dataset's layout (written with webdataset's TarWriter)."""
    import webdataset as wds
    from PIL import Image

    folder = os.path.join(workdir, f"shards{n}")
    if os.path.isdir(folder):
        return folder
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for s in range(0, n, per_shard):
        with wds.TarWriter(os.path.join(folder, f"{s // per_shard:05d}.tar")) as tar:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, format="JPEG")
                tar.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "txt": f"image {i}"})
    return folder


def bench_extract(workdir: str, n: int, rss_n: int) -> list[str]:
    model = _vit_b32(workdir)
    shards = _shards(workdir, n)
    base = [sys.executable, "-m", "surgery", "embed", model, "--images", shards, "--site", "embedding",
            "--batch-size", "32"]
    one_t, one_rss, one_out = _run(base + ["--out", os.path.join(workdir, "c_one")], threads=2)
    two_t, two_rss, two_out = _run(base + ["--out", os.path.join(workdir, "c_two"), "--nproc", "2"], threads=1)
    one_rate, two_rate = _rate(one_out), _rate(two_out)
    rows = [
        f"| extraction, {n} images | 1 process x 2 threads | {one_t:.1f} s | {one_rate:.1f} img/s | "
        f"{one_rss:.0f} MiB |",
        f"| extraction, {n} images | 2 processes x 1 thread | {two_t:.1f} s | {two_rate:.1f} img/s | "
        f"{two_rss:.0f} MiB |",
        f"| **ratio** 2 x 1 / 1 x 2 | throughput | | **{two_rate / one_rate:.2f}x** | |",
    ]
    if rss_n:
        big = _shards(workdir, rss_n)
        big_cmd = [a if a != shards else big for a in base]
        big_t, big_rss, big_out = _run(big_cmd + ["--out", os.path.join(workdir, "c_big"), "--nproc", "2"],
                                       threads=1)
        rows.append(f"| extraction, {rss_n} images | 2 processes x 1 thread | {big_t:.1f} s | "
                    f"{_rate(big_out):.1f} img/s | {big_rss:.0f} MiB |")
        rows.append(f"| **peak RSS** {rss_n} / {n} images | 2 processes | | | **{big_rss / two_rss:.2f}x** |")
    return rows


# ------------------------------------------------------------------------------------------- sae
def _sae_worker(cache_dir: str, out: str, steps: int) -> None:
    from safetensors.torch import save_file

    from surgery.runtime.distributed import init_ranks
    from surgery.sae import SAEConfig, TrainOptions, open_cache, train_sae

    ranks = init_ranks()
    cache = open_cache(cache_dir)
    cfg = SAEConfig(d_in=cache.d, expansion=8, kind="batchtopk", k=32)
    sae, history = train_sae(cache, cfg, TrainOptions(steps=steps, batch_size=4096, warmup_steps=5), ranks=ranks)
    if ranks.main:
        save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out)
        with open(out + ".json", "w") as fh:
            json.dump(history, fh)
    ranks.close()


def bench_sae(workdir: str, steps: int) -> list[str]:
    from surgery.sae import Site, build_cache

    cache_dir = os.path.join(workdir, "sae_cache")
    if not os.path.exists(os.path.join(cache_dir, "cache.json")):
        gen = torch.Generator().manual_seed(0)
        d, n = 768, 65536
        dictionary = torch.randn(4 * d, d, generator=gen) / d ** 0.5

        class Identity(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(1))

            def encode_image(self, x):
                return x

        batches = ((torch.rand(8192, 4 * d, generator=gen) * (torch.rand(8192, 4 * d, generator=gen) < 0.01))
                   @ dictionary for _ in range(n // 8192))
        build_cache(Identity(), Site("vision", "embedding"), batches, cache_dir, shard_rows=16384)
    me = os.path.abspath(__file__)
    one = os.path.join(workdir, "sae_one.safetensors")
    two = os.path.join(workdir, "sae_two.safetensors")
    _run([sys.executable, me, "--sae-worker", cache_dir, one, str(steps)], threads=2)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", me,
          "--sae-worker", cache_dir, two, str(steps)], threads=1)
    h1, h2 = (json.load(open(p + ".json")) for p in (one, two))
    from safetensors.torch import load_file

    a, b = load_file(one), load_file(two)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return [
        f"| SAE D=768 F=6144 k=32 B=4096, {steps} steps | 1 process x 2 threads | {h1['steps_per_second']} steps/s | |",
        f"| SAE D=768 F=6144 k=32 B=4096, {steps} steps | 2 ranks x 1 thread | {h2['steps_per_second']} steps/s | |",
        f"| **ratio** 2 ranks / 1 process | steps/s | **{h2['steps_per_second'] / h1['steps_per_second']:.2f}x** | "
        f"max weight difference {diff:.1e} |",
    ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sae-worker":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        return _sae_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["extract", "sae"], default=None)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rss-images", type=int, default=8000, help="0: skip the RSS-growth run")
    ap.add_argument("--sae-steps", type=int, default=40)
    ap.add_argument("--workdir", default=None, help="keep models, shards and caches here (default: a temp folder)")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; workdir {workdir}")
    print("| what | how | time | throughput | peak RSS |\n| --- | --- | --- | --- | --- |")
    if args.only in (None, "extract"):
        for row in bench_extract(workdir, args.images, args.rss_images):
            print(row, flush=True)
    if args.only in (None, "sae"):
        for row in bench_sae(workdir, args.sae_steps):
            print(row, flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
