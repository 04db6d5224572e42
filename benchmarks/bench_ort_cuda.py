"""ONNX Runtime's CUDA provider vs PyTorch eager for CLIP image towers (issue 17), with node placement.

    python benchmarks/bench_ort_cuda.py [--archs ViT-B-32 ViT-L-14] [--batches 1 64] [--markdown OUT.md]

Random weights (timing only). Per tower: the fp16 export (plain graph) and the fp32 export (fused
contrib-op graph) on the CUDA provider, against PyTorch eager fp16 and bf16 (model cast) and fp32.
Inputs and outputs stay on the GPU on both sides (ORT through IOBinding), so the times are the
encoders' alone. The placement line lists the nodes ONNX Runtime did not run on CUDA. Needs a CUDA
device and onnxruntime-gpu (pip install 'clipsurgery[gpu]'); refuses without them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, calls: int = 20) -> float:
    """Median ms per call (CUDA synchronised), after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def ort_runner(path: str, x: torch.Tensor, out_dim: int):
    """A no-copy ORT CUDA call on ``x`` (already on the GPU) through IOBinding."""
    import numpy as np

    from surgery.io.onnx import provider_session

    session = provider_session(path, "cuda", optimize="fp16" not in path)
    out = torch.empty(x.shape[0], out_dim, device="cuda", dtype=torch.float32)
    binding = session.io_binding()
    binding.bind_input(session.get_inputs()[0].name, "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
    binding.bind_output(session.get_outputs()[0].name, "cuda", 0, np.float32, tuple(out.shape), out.data_ptr())
    return lambda: session.run_with_iobinding(binding)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ort_cuda: no CUDA device found; this benchmark needs a GPU. Nothing was run.")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"bench_ort_cuda: onnxruntime {ort.__version__} has no CUDA provider; "
                         "pip install 'clipsurgery[gpu]'. Nothing was run.")
    from surgery.export.onnx import OnnxOptions, export_onnx
    from surgery.io.onnx import node_placement
    from surgery.model.arch import build_model, get_config
    from surgery.model.loading import LoadedModel
    from surgery.model.preprocess import default_preprocess, tokenizer_info

    header = (f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | onnxruntime-gpu {ort.__version__} | "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\nmedian ms per call, image tower, "
              "inputs and outputs on the GPU")
    print(header, flush=True)
    lines = ["| tower | batch | eager fp32 | eager fp16 | eager bf16 | ORT CUDA fp32 (fused) | ORT CUDA fp16 | "
             "eager fp16 / ORT fp16 |", "|" + "---|" * 8]
    placements = []
    for arch in args.archs:
        torch.manual_seed(0)
        cfg = get_config(arch)
        model = build_model(cfg).eval()
        loaded = LoadedModel(model=model, arch=arch, config=cfg, source="random", format="builtin", sha256=None,
                             preprocess=default_preprocess(cfg), tokenizer=tokenizer_info(cfg))
        size = cfg["vision_cfg"]["image_size"]
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for precision, graph in (("fp32", "ort"), ("fp16", "plain")):
                path = f"{tmp}/{arch}.{precision}.onnx"
                export_onnx(copy.deepcopy(loaded), path, None, OnnxOptions(tower="vision", precision=precision,
                                                                           graph=graph))
                files[precision] = path
                placement = node_placement(path, "cuda", optimize=precision == "fp32")
                placements.append(f"{arch} {precision} ({graph} graph): {placement.summary()}")
                print(placements[-1], flush=True)
            eager = {name: copy.deepcopy(model).cuda().to(dtype) for name, dtype in
                     (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16))}
            for batch in args.batches:
                x = torch.randn(batch, 3, size, size, device="cuda")
                row = {}
                with torch.no_grad():
                    for name, m in eager.items():
                        dtype = next(m.parameters()).dtype
                        row[f"eager {name}"] = timed(lambda m=m, dtype=dtype: m.encode_image(x.to(dtype)))
                out_dim = int(model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])
                for precision, path in files.items():
                    row[f"ort {precision}"] = timed(ort_runner(path, x, out_dim))
                lines.append(f"| {arch} | {batch} | {row['eager fp32']:.2f} | {row['eager fp16']:.2f} | "
                             f"{row['eager bf16']:.2f} | {row['ort fp32']:.2f} | {row['ort fp16']:.2f} | "
                             f"{row['eager fp16'] / row['ort fp16']:.2f}x |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    print("node placement (CUDA provider):\n  " + "\n  ".join(placements))
    if args.markdown:
        args.markdown.write_text(header.replace("\n", "  \n") + "\n\n" + table + "\n\nnode placement (CUDA provider):\n\n"
                                 + "\n".join(f"- {p}" for p in placements) + "\n")


if __name__ == "__main__":
    main()
