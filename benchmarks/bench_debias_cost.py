"""What ``clipsurgery debias`` costs at real model size (issues 15, 25): each stage's time and peak
RSS, and the whole job / one forward pass over the probe images.

    python benchmarks/bench_debias_cost.py --arch ViT-B-32 --images 2004     # the issue-25 figure (2,000 rounded up to a multiple of 12)
    python benchmarks/bench_debias_cost.py --arch ViT-B-16 --images 96 --budget default

The model has random weights (no bias to find). ``--budget any`` (the default): the bias target is
out of reach (a ratio of 1e-6) and the accuracy, recall and group-accuracy budgets accept any edit,
so the balance edit alone never meets the target, every kind of edit is searched (the head audit
with its shortlisted sweep, the SAE, the joint search up to its trial budget) and every later stage
runs: the job's worst case. ``--budget default``: the tool's default targets, the path a user runs.
Probe: a planted-bias world split drawn at 224 px (labels, captions and queries of the world),
half for the edits and half for the report (--holdout 0.5). Stages are timed by wrapping the
pipeline's named steps (surgery.debias.pipeline); peak RSS per stage comes from a sampler thread
(every 50 ms). The forward pass is the image tower over the same probe images at the same batch
size, timed alone after the job. The RSS ceiling printed is issue 25's: 3x the fp32 model plus one
batch of activations (64 images: the input and every layer's residual stream).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import torch


class Sampler:
    """Peak RSS (MiB) of this process, per stage, sampled from /proc/self/statm."""

    def __init__(self) -> None:
        self.stage, self.peaks, self.stop = "start", {}, False
        self.page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page / 2 ** 20

    def _run(self) -> None:
        while not self.stop:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), self.rss())
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=2000, help="probe images (a multiple of concepts x groups: 12)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--budget", choices=("any", "default"), default="any",
                    help="any: targets out of reach and budgets that accept any edit (every stage runs); "
                         "default: the tool's default targets")
    args = ap.parse_args()
    import open_clip
    from safetensors.torch import save_file

    from surgery.debias import pipeline
    from surgery.debias.budget import Budget
    from surgery.debias.pipeline import DebiasOptions, run_debias
    from surgery.errors import SurgeryError
    from surgery.io.images import ImageFolderDataset
    from surgery.model.loading import load
    from surgery.model.towers import get_towers
    from surgery.model.preprocess import image_transform
    from surgery.world.generator import generate, write_split
    from surgery.world.params import WorldParams

    work = args.workdir or tempfile.mkdtemp(prefix="bench-debias-")
    os.makedirs(work, exist_ok=True)
    model_path = os.path.join(work, f"{args.arch}.safetensors")
    if not os.path.exists(model_path):
        torch.manual_seed(0)
        model = open_clip.create_model(args.arch, pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_path)
    split = os.path.join(work, f"probe{args.images}")
    if not os.path.isdir(split):
        write_split(generate(WorldParams(image_size=224), "eval", args.images), split)

    sampler = Sampler()
    baseline = sampler.rss()  # torch, open_clip, onnxruntime and clipsurgery imported; no model loaded yet
    times: dict[str, float] = {}
    # the pipeline's steps, none inside another (choose_edits is audit_vision + train_neurons + run_search)
    steps = ["build_probes", "embed_prompts", "audit_vision", "train_neurons", "run_search", "make_plan",
             "bake_and_export", "compare_before_after"]
    for name in steps:
        original = getattr(pipeline, name)

        def timed(*a, _name=name, _fn=original, **kw):
            sampler.stage = _name
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                times[_name] = times.get(_name, 0.0) + time.perf_counter() - t
                sampler.stage = "other"
                # as each stage ends, so that a run stopped early still tells where its time went
                print(f"[stage] {_name}: {time.perf_counter() - t:.1f} s, peak RSS {sampler.peaks.get(_name, 0):.0f} MiB",
                      file=sys.stderr, flush=True)

        setattr(pipeline, name, timed)
    # a bias target out of reach and budgets that accept any edit: every kind is searched, up to the
    # search's trial budget, and every stage after it runs, whatever random weights do to bias
    budget = Budget(max_bias_ratio=1e-6, max_accuracy_drop=1.0, max_recall_drop=1.0, max_group_accuracy_drop=1.0) \
        if args.budget == "any" else Budget()
    options = DebiasOptions(budget=budget, force=True, k=min(50, args.images // 4))
    start = time.perf_counter()
    failed = None
    try:
        run_debias(model_path, os.path.join(work, "out.onnx"), options, images_dir=split,
                   labels_path=os.path.join(split, "labels.csv"), attribute="group",
                   progress=lambda msg: print(f"[{time.perf_counter() - start:7.0f} s] {msg}", file=sys.stderr, flush=True))
    except SurgeryError as exc:  # report the stages that ran
        failed = str(exc)
    total = time.perf_counter() - start

    sampler.stage = "forward"
    loaded = load(model_path)
    data = ImageFolderDataset(os.path.join(split, "images"), None, image_transform(loaded.preprocess))
    t = time.perf_counter()
    with torch.inference_mode():
        for images, _ in data.batches(64):
            loaded.model.encode_image(images)
    forward = time.perf_counter() - t
    sampler.stop = True
    params = sum(p.numel() for p in loaded.model.parameters())
    view = get_towers(loaded.model)["vision"]
    tokens = int(loaded.model.visual.positional_embedding.shape[0])
    batch_mib = 64 * (3 * 224 * 224 + tokens * view.width * view.n_layers) * 4 / 2 ** 20
    ceiling = 3 * params * 4 / 2 ** 20 + batch_mib
    print(f"{args.arch} (random weights), {args.images} probe images at 224 px, {torch.get_num_threads()} threads, "
          f"budget: {args.budget}")
    print("| stage | time | / one forward pass | peak RSS |\n| --- | --- | --- | --- |")
    for name in steps:
        if name in times:
            print(f"| {name} | {times[name]:.1f} s | {times[name] / forward:.1f}x | {sampler.peaks.get(name, 0):.0f} MiB |")
    if failed:
        print(f"| (the job stopped: {failed}) | | | |")
    job_peak = max(v for k, v in sampler.peaks.items() if k != "forward")  # not the benchmark's own forward pass
    print(f"| **whole job** | {total:.1f} s | **{total / forward:.1f}x** | {job_peak:.0f} MiB |")
    print(f"| one forward pass (image tower, batch 64) | {forward:.1f} s | 1.0x | |")
    print(f"\npeak RSS ceiling (issue 25): 3 x the fp32 model ({params * 4 / 2 ** 20:.0f} MiB) + one batch of "
          f"activations ({batch_mib:.0f} MiB) = {ceiling:.0f} MiB; the job's peak {job_peak:.0f} MiB, of which "
          f"{job_peak - baseline:.0f} MiB above the process before any model was loaded ({baseline:.0f} MiB: "
          f"the libraries)")


if __name__ == "__main__":
    main()
