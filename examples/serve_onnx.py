"""Serve exported clipsurgery encoders with ONNX Runtime, using only what the files carry.

    python examples/serve_onnx.py out.onnx --image cat.png --text "a photo of a cat" [--provider cuda]

Preprocessing (size, mean, std, interpolation, resize mode) and tokenisation (tokenizer name,
context length) are read from each file's ``clipsurgery.*`` metadata_props; nothing else about
the model is needed. This script shows the pieces with nothing but onnx, onnxruntime and PIL; for
serving use ``clipsurgery serve out.onnx`` (HTTP, dynamic batching, limits, metrics), and for
fleets ``clipsurgery serve out.onnx --triton-repo DIR`` (an NVIDIA Triton Inference Server
repository with dynamic batching).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def metadata(path: str) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def pair(out: str) -> dict[str, str]:
    """{"vision": file, "text": file} for OUT.onnx exported with --tower both (or a single file)."""
    stem = out[:-5] if out.endswith(".onnx") else out
    found = {t: f"{stem}.{s}.onnx" for t, s in (("vision", "visual"), ("text", "text")) if os.path.isfile(f"{stem}.{s}.onnx")}
    if not found and os.path.isfile(out):
        found[metadata(out)["clipsurgery.tower"]] = out
    if not found:
        sys.exit(f"error: no exported encoder at {out} (nor {stem}.visual.onnx / {stem}.text.onnx)")
    return found


def preprocess(image: Image.Image, cfg: dict) -> np.ndarray:
    """open_clip's eval transform from metadata alone: resize (shortest side), centre crop, normalise."""
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    image = image.convert("RGB")
    resample = _RESAMPLE.get(cfg.get("interpolation", "bicubic"), Image.BICUBIC)
    if cfg.get("resize_mode", "shortest") == "squash":
        image = image.resize((size, size), resample)
    else:
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), resample)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.array(cfg["mean"], dtype=np.float32)) / np.array(cfg["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)[None]  # (1, 3, H, W)


def tokenize(texts: list[str], cfg: dict) -> np.ndarray:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    name, ctx = cfg["name"], int(cfg["context_length"])
    tokenizer = SimpleTokenizer(context_length=ctx) if name == "openai-clip-bpe" else HFTokenizer(name, context_length=ctx)
    return tokenizer(texts).numpy().astype(np.int64)


def session(path: str, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if metadata(path).get("clipsurgery.precision") == "fp16" and provider == "cpu":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT 1.32 CPU fp16 crash
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def embed(files: dict[str, str], images: list[str], texts: list[str], provider: str = "cpu") -> dict[str, np.ndarray]:
    out = {}
    if images:
        path = files["vision"]
        cfg = json.loads(metadata(path)["clipsurgery.preprocess"])
        batch = np.concatenate([preprocess(Image.open(p), cfg) for p in images])
        out["image"] = session(path, provider).run(None, {"pixel_values": batch})[0]
    if texts:
        path = files["text"]
        cfg = json.loads(metadata(path)["clipsurgery.tokenizer"])
        out["text"] = session(path, provider).run(None, {"input_ids": tokenize(texts, cfg)})[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="OUT.onnx as given to clipsurgery export/debias")
    ap.add_argument("--image", action="append", default=[])
    ap.add_argument("--text", action="append", default=[])
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    files = pair(args.model)
    result = embed(files, args.image, args.text, args.provider)
    if "image" in result and "text" in result:
        sims = result["image"] @ result["text"].T
        for i, name in enumerate(args.image):
            best = int(sims[i].argmax())
            print(f"{name}: best text {args.text[best]!r} (cosine {sims[i, best]:.3f})")
    else:
        for key, value in result.items():
            print(key, value.shape)


if __name__ == "__main__":
    main()
