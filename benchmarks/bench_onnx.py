"""Exported ONNX (ONNX Runtime, CPU) vs the same model in PyTorch eager; baked vs unbaked ONNX; ours vs
Hugging Face optimum's export of a transformers CLIP vision model of the same size.

    python benchmarks/bench_onnx.py [--arch ViT-B-32] [--rounds 3] [--per-block 3] [--batches 1 32] [--no-opset23]

Issue 6 targets: ONNX Runtime <= 0.8x PyTorch eager time at batch 1 and 32; a baked model (4 heads
soft-pruned) <= 1.02x the unbaked model's ONNX time, <= 1.05x with an SAE neuron module as well;
ours at least as fast as optimum's export run through ONNX Runtime's transformer optimizer.
Random weights (timing only). Contenders take turns in rounds (a warm-up call, then a few timed
calls each), so a load that comes and goes on a shared machine hits all of them alike; medians.

Rows (vision tower, every ONNX file on ONNX Runtime's CPU provider with default session options):
  eager       open_clip's model.encode_image under torch.no_grad (no L2 normalisation)
  plain       graph="plain": standard ONNX ops, TorchScript exporter, opset 17
  ours        graph="ort" (the default): transformer blocks as com.microsoft contrib ops
  +heads      ours, 4 heads of the last block soft-pruned and baked
  +neurons    +heads and a residual-site SAE deactivation (paper form, 768 x 8 latents, 32 ids)
  opset23     dynamo exporter, opset 23, ONNX Attention nodes
  optimum     optimum's ONNX export of transformers' CLIPVisionModel (ViT-B/32 config; outputs
              last_hidden_state and pooler_output, no projection, no normalisation), then
              onnxruntime.transformers.optimizer (model_type "clip"); "sdpa" is transformers'
              default attention, "eager-attn" the one ORT's optimizer fuses into Attention nodes.
              Skipped with a message when optimum / transformers are not installed
              (pip install 'clipsurgery[bench]').
"""
from __future__ import annotations

import argparse
import atexit
import copy
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings

import torch

from surgery.edit.bake import bake
from surgery.edit.plan import HeadEdit, NeuronEdit, SurgeryPlan
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.io.onnx import ort_session
from surgery.model.arch import build_model, get_config
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import default_preprocess, tokenizer_info


def timed_rounds(fns: dict, rounds: int, per_block: int) -> dict[str, float]:
    """Median seconds per call of each function. Each round runs every function in turn: one
    untimed call (ONNX Runtime's and OpenMP's worker threads keep spinning for a moment after a
    run and would slow whichever contender came next), then ``per_block`` timed calls."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def neuron_sae_folder(root: str, width: int) -> str:
    from surgery.sae import SAEConfig, SparseAutoencoder, save_sae

    sae = SparseAutoencoder(SAEConfig(d_in=width, expansion=8, kind="relu", k=32, site="residual")).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    folder = os.path.join(root, "sae")
    save_sae(sae, folder)
    return folder


def optimum_sessions(root: str, cfg: dict) -> dict:
    """{name: session} for optimum's export of transformers' CLIPVisionModel, optimised with ORT's
    transformer optimizer; {} (with a message) when optimum is not installed."""
    try:
        from onnxruntime.transformers import optimizer
        from optimum.exporters.onnx import onnx_export_from_model
        from transformers import CLIPVisionConfig, CLIPVisionModel
    except ImportError as exc:
        print(f"optimum rows skipped: {exc.name} is not installed (pip install 'clipsurgery[bench]')")
        return {}
    vc = cfg["vision_cfg"]
    hf_cfg = CLIPVisionConfig(hidden_size=vc["width"], intermediate_size=int(vc["width"] * vc.get("mlp_ratio", 4.0)),
                              num_hidden_layers=vc["layers"], num_attention_heads=vc["width"] // vc.get("head_width", 64),
                              image_size=vc["image_size"], patch_size=vc["patch_size"], projection_dim=cfg["embed_dim"],
                              hidden_act="gelu")
    sessions = {}
    for impl in ("sdpa", "eager"):
        model = CLIPVisionModel._from_config(hf_cfg, attn_implementation=impl).eval()
        out = os.path.join(root, f"optimum_{impl}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_export_from_model(model, out, task="feature-extraction")
        opt = optimizer.optimize_model(os.path.join(out, "model.onnx"), model_type="clip",
                                       num_heads=hf_cfg.num_attention_heads, hidden_size=hf_cfg.hidden_size)
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(os.path.join(out, "model_opt.onnx"))
        name = "optimum " + ("sdpa" if impl == "sdpa" else "eager-attn")
        print(f"{name}: ORT transformer optimizer fused {fused}")
        sessions[name] = ort_session(os.path.join(out, "model_opt.onnx"))
    return sessions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-block", type=int, default=3, help="timed calls per contender and round")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--no-opset23", action="store_true", help="skip the (slow to export) opset-23 row")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = get_config(args.arch)
    model = build_model(cfg).eval()
    loaded = LoadedModel(model=model, arch=args.arch, config=cfg, source="random", format="builtin", sha256=None,
                         preprocess=default_preprocess(cfg), tokenizer=tokenizer_info(cfg))
    root = tempfile.mkdtemp(prefix="bench-onnx-")  # ~2.7 GB of ONNX files for ViT-B-32
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    last = cfg["vision_cfg"]["layers"] - 1
    heads = SurgeryPlan(heads=[HeadEdit("vision", last, h, 0.0) for h in range(4)])
    width = cfg["vision_cfg"]["width"]
    neurons = SurgeryPlan(heads=list(heads.heads), neurons=[
        NeuronEdit("vision", neuron_sae_folder(root, width), list(range(0, 256, 8)), 0.6, "paper", "residual")])
    files = {
        "plain": (loaded, None, OnnxOptions(tower="vision", graph="plain")),
        "ours": (loaded, None, OnnxOptions(tower="vision", graph="ort")),
        "+heads": (_baked(loaded, heads), heads, OnnxOptions(tower="vision", graph="ort")),
        "+neurons": (_baked(loaded, neurons), neurons, OnnxOptions(tower="vision", graph="ort")),
    }
    if not args.no_opset23:
        files["opset23"] = (loaded, None, OnnxOptions(tower="vision", graph="plain", opset=23))
    sessions = {}
    for name, (src, plan, opt) in files.items():
        path = os.path.join(root, name.strip("+") + ".onnx")
        result = export_onnx(src, path, plan, opt)["vision"]
        print(f"{name}: exported ({result['graph']} graph), max abs error vs PyTorch {result['max_abs_error']:.2g}")
        sessions[name] = ort_session(path)
    sessions.update(optimum_sessions(root, cfg))

    import onnxruntime

    size = cfg["vision_cfg"]["image_size"]
    print(f"\n{args.arch} vision tower, random weights; {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; medians of {args.rounds} rounds x {args.per_block} calls")
    names = ["eager", *sessions]
    print(f"{'batch':>5} " + " ".join(f"{n:>12}" for n in names))
    ratios = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size)
        feed = {"pixel_values": x.numpy()}
        fns = {"eager": lambda: model.encode_image(x)}
        fns.update({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()})
        with torch.no_grad():
            t = timed_rounds(fns, args.rounds, args.per_block)
        ratios[batch] = t
        print(f"{batch:>5} " + " ".join(f"{t[n]:>11.4f}s" for n in names))
        print(f"{'':>5} " + " ".join(f"{t[n] / t['eager']:>11.2f}x" for n in names) + "   (/ eager)")
    print("\nratios (targets):")
    for batch, t in ratios.items():
        line = (f"batch {batch:>3}: ours/eager {t['ours'] / t['eager']:.2f} (<= 0.8), plain/eager {t['plain'] / t['eager']:.2f}, "
                f"+heads/ours {t['+heads'] / t['ours']:.3f} (<= 1.02), +neurons/ours {t['+neurons'] / t['ours']:.3f} (<= 1.05)")
        best = min((n for n in t if n.startswith("optimum")), key=t.get, default=None)
        if best:
            line += f", ours/{best} {t['ours'] / t[best]:.2f} (<= 1.0)"
        print(line)


def _baked(loaded: LoadedModel, plan: SurgeryPlan) -> LoadedModel:
    baked = copy.copy(loaded)
    baked.model = bake(copy.deepcopy(loaded.model), copy.deepcopy(plan))
    return baked


if __name__ == "__main__":
    main()
