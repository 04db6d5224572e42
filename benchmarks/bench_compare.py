"""compare's overhead over the bare forward passes, cold and warm embedding cache.

    python benchmarks/bench_compare.py [--model builtin:world] [--n 1200]

Targets (issue 3): time(compare) / time(the two models' forward passes alone over the same data)
<= 1.2 with a cold cache and <= 0.1 with a warm cache. Both ratios come from one run, side by side
(absolute times on these machines are noisy and not comparable across runs).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

import surgery
from surgery.eval.compare import compare
from surgery.eval.embedding import EmbedOptions
from surgery.eval.encoders import TorchEncoder
from surgery.eval.evaluate import spec_from_folder
from surgery.model.preprocess import image_transform, tokenize
from surgery.world.generator import generate, write_split
from surgery.world.params import WorldParams


def forward_only(encoder: TorchEncoder, split, spec, batch_size: int) -> float:
    """Seconds for the image and text forward passes compare needs (images pre-decoded, texts
    pre-tokenised): the eval images, the captions, the neutral queries and the class prompts."""
    from PIL import Image

    transform = image_transform(encoder.preprocess)
    pixels = torch.stack([transform(Image.fromarray(img)) for img in split.images])
    texts = [c for caps in spec.captions.values() for c in caps] + spec.queries + spec.class_prompts
    tokens = tokenize(texts, encoder.tokenizer)
    start = time.perf_counter()
    for chunk in pixels.split(batch_size):
        encoder.encode_images(chunk)
    for chunk in tokens.split(batch_size):
        encoder.encode_texts(chunk)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:world")
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="bench-compare-")
    try:
        split = generate(WorldParams(), "eval", args.n)
        write_split(split, f"{root}/eval")
        spec = spec_from_folder(f"{root}/eval/images", f"{root}/eval/labels.csv")
        before = TorchEncoder(surgery.load(args.model))
        after = TorchEncoder(surgery.load(args.model))
        with torch.no_grad():
            after.model.visual.transformer.resblocks[-1].attn.out_proj.weight[:, :16] = 0
        options = EmbedOptions(batch_size=args.batch_size, cache_dir=f"{root}/cache")
        bare = forward_only(before, split, spec, args.batch_size) + forward_only(after, split, spec, args.batch_size)
        start = time.perf_counter()
        compare(before, after, spec, options)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        compare(before, after, spec, options)
        warm = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"model {args.model}, {args.n} images, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'':24}{'seconds':>10}{'ratio':>10}{'target':>10}")
    print(f"{'forward passes alone':24}{bare:10.2f}{1.0:10.2f}{'':>10}")
    print(f"{'compare, cold cache':24}{cold:10.2f}{cold / bare:10.2f}{'<= 1.2':>10}")
    print(f"{'compare, warm cache':24}{warm:10.2f}{warm / bare:10.2f}{'<= 0.1':>10}")


if __name__ == "__main__":
    main()
