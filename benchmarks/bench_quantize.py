"""int8 ONNX (ONNX Runtime quantization) vs the fp32 export, CPU, and the fairness gate's figures.

    python benchmarks/bench_quantize.py [--arch ViT-B-32] [--batches 1 32] [--rounds 3] [--per-block 3]
                                        [--debiased OUT.onnx] [--skip-static]

Issue 16 targets: int8 / fp32 ONNX Runtime time <= 0.6x at batch 32 (ViT-B/32 vision tower, random
weights: timing only). Rows: fp32 (the default ORT-fused export), int8 dynamic (weights per
channel, activations scaled per batch at run time), int8 static (QDQ, activation ranges calibrated
on 64 random inputs: timing only, random weights have no real ranges). Contenders take turns in
rounds (bench_onnx.timed_rounds); medians.

Then the gate's figures (cosine to the fp32 embeddings, zero-shot accuracy, mean MaxSkew@50 on the
world's 1200-image eval split) for the bundled world model and, with --debiased, for a debiased
pair of it (e.g. OUT.onnx from `clipsurgery debias builtin:world OUT.onnx`), dynamic and static.
Static calibration never sees the gate's images: the world model calibrates on its own train split
(checked against the eval split by content); the debiased pair, gated on a written eval split, on
256 train-split images written to their own folder (--calibration-images; refused if any equals a
gate image).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from bench_onnx import cpu_name, timed_rounds

import surgery
from surgery.export.gate import GateData, GateOptions, check_gate, format_gate
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.export.quantize import QuantizeOptions, calibration_feeds, export_quantized, quantize_file, quantize_pair
from surgery.io.onnx import ort_session
from surgery.model.arch import build_model, get_config
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import default_preprocess, tokenizer_info
from surgery.world.checkpoint import world_params_of


def speed(args, root: str) -> None:
    torch.manual_seed(0)
    cfg = get_config(args.arch)
    loaded = LoadedModel(model=build_model(cfg).eval(), arch=args.arch, config=cfg, source="random", format="builtin",
                         sha256=None, preprocess=default_preprocess(cfg), tokenizer=tokenizer_info(cfg))
    fp32 = os.path.join(root, "fp32.onnx")
    start = time.perf_counter()
    export_onnx(loaded, fp32, options=OnnxOptions(tower="vision"))
    print(f"exported {args.arch} vision tower (fp32, ort graph) in {time.perf_counter() - start:.0f} s")
    size = cfg["vision_cfg"]["image_size"]
    rng = np.random.default_rng(0)
    files = {"fp32": fp32}
    for calibration in ("dynamic",) if args.skip_static else ("dynamic", "static"):
        path = os.path.join(root, f"int8-{calibration}.onnx")
        feeds = [{"pixel_values": rng.standard_normal((16, 3, size, size)).astype(np.float32)} for _ in range(4)]
        start = time.perf_counter()
        quantize_file(fp32, path, QuantizeOptions(calibration=calibration), feeds if calibration == "static" else None)
        print(f"quantized int8 {calibration} in {time.perf_counter() - start:.0f} s "
              f"({os.path.getsize(path) / 2**20:.0f} MiB vs {os.path.getsize(fp32) / 2**20:.0f} MiB)")
        files[f"int8-{calibration}"] = path
    sessions = {name: ort_session(path) for name, path in files.items()}
    import onnxruntime

    print(f"\n{args.arch} vision tower, random weights; {cpu_name()}, {os.cpu_count()} CPUs; onnxruntime "
          f"{onnxruntime.__version__}; load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"medians of {args.rounds} rounds x {args.per_block} calls")
    names = list(sessions)
    print(f"{'batch':>5} " + " ".join(f"{n:>14}" for n in names))
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        fns = {n: (lambda s=s: s.run(None, {"pixel_values": x})) for n, s in sessions.items()}
        t = timed_rounds(fns, args.rounds, args.per_block)
        print(f"{batch:>5} " + " ".join(f"{t[n]:>13.4f}s" for n in names))
        print(f"{'':>5} " + " ".join(f"{t[n] / t['fp32']:>13.2f}x" for n in names) + "   (/ fp32; target int8 <= 0.6 "
              "at batch 32)")
        want = sessions["fp32"].run(None, {"pixel_values": x})[0]
        for n in names[1:]:
            got = sessions[n].run(None, {"pixel_values": x})[0]
            print(f"{'':>5} {n}: mean cosine to fp32 on these random inputs {float((want * got).sum(1).mean()):.4f}")


def gate_rows(args, root: str) -> None:
    world = surgery.load("builtin:world")
    gate_data = GateData.for_model(world)
    print(f"\nfairness gate (int8 vs its fp32 export, world eval split; limits: cosine >= 0.99, accuracy within 1 "
          f"point, mean MaxSkew@50 within 0.02; weights {8 - QuantizeOptions().reduce_range}-bit)")
    calibrations = ("dynamic",) if args.skip_static else ("dynamic", "static")
    for calibration in calibrations:
        opt = QuantizeOptions(calibration=calibration)
        result = export_quantized(world, os.path.join(root, f"world-{calibration}.onnx"), None, gate_data,
                                  options=opt, gate=GateOptions(min_cosine=-1, max_accuracy_change=1,
                                                                max_skew_change=1e9),  # report, never refuse
                                  calibration=calibration_feeds(gate_data, world.preprocess, world.tokenizer)
                                  if calibration == "static" else None)
        verdict = check_gate(result.figures, GateOptions()) or ["passes"]
        print(f"  builtin:world, {calibration}: {format_gate(result.figures)} -> {'; '.join(verdict)}")
    if args.debiased:
        folder = os.path.join(root, "gate")
        from surgery.world.generator import balanced_size, generate, write_split

        params = world_params_of(world)
        split = write_split(generate(params, "eval", balanced_size(params)), folder)
        data = GateData(images_dir=str(split / "images"), labels_path=str(split / "labels.csv"))
        calibration_dir = write_split(generate(params, "train", 256), os.path.join(root, "calibration")) / "images"
        for calibration in calibrations:
            feeds = calibration_feeds(data, world.preprocess, world.tokenizer, images_dir=str(calibration_dir)) \
                if calibration == "static" else None
            result = quantize_pair(args.debiased, os.path.join(root, f"debiased-{calibration}.onnx"), data,
                                   options=QuantizeOptions(calibration=calibration),
                                   gate=GateOptions(min_cosine=-1, max_accuracy_change=1, max_skew_change=1e9),
                                   calibration=feeds)
            verdict = check_gate(result.figures, GateOptions()) or ["passes"]
            print(f"  {args.debiased} (debiased), {calibration}: {format_gate(result.figures)} -> {'; '.join(verdict)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-block", type=int, default=3, help="timed calls per contender and round")
    ap.add_argument("--debiased", default=None, help="an exported fp32 pair of a debiased world model")
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-quantize-")
    try:
        if not args.skip_speed:
            speed(args, root)
        gate_rows(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
