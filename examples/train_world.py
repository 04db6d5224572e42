"""Train the planted-bias world model on the CPU and write it as safetensors.

    python examples/train_world.py                      # reproduces the bundled model
    python examples/train_world.py --out my_world.safetensors --bias-strength 0.8 --epochs 12
    python examples/train_world.py --out w3.safetensors --groups red,blue,green --concepts circle,square,star,ring,cross

Every argument is checked before training starts (a world with one group, a duplicated concept or an
--n-eval that is not a multiple of concepts x groups is refused at once).

The default output is the model bundled with clipsurgery (surgery/data/world_model.safetensors,
loaded as ``builtin:world``); its world parameters, training options and quality figures are
stored in the file's metadata and world_params.json beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from surgery.errors import SurgeryError
from surgery.io.fs import check_output_path
from surgery.model.loading import BUNDLED_WORLD_MODEL
from surgery.world.checkpoint import save_world_model
from surgery.world.generator import balanced_size, check_eval_size
from surgery.world.params import WorldParams
from surgery.world.train import WorldTrainOptions, evaluate_world_model, train_world_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=BUNDLED_WORLD_MODEL, help="output .safetensors (default: the bundled model)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    ap.add_argument("--seed", type=int, default=0, help="world seed (images) and training seed")
    ap.add_argument("--bias-strength", type=float, default=WorldParams.bias_strength)
    ap.add_argument("--attribute-kind", choices=["color", "texture"], default="color")
    ap.add_argument("--groups", default=None, help="comma-separated colours or textures (2-4; default red,blue or "
                    "stripes,dots)")
    ap.add_argument("--concepts", default=None, help="comma-separated shapes (4-8; default the six of the bundled world)")
    ap.add_argument("--n-eval", type=int, default=None, help="balanced evaluation images for the quality figures "
                    "(a multiple of concepts x groups; default: the nearest to 1200)")
    ap.add_argument("--epochs", type=int, default=WorldTrainOptions.epochs)
    ap.add_argument("--n-train", type=int, default=WorldTrainOptions.n_train)
    ap.add_argument("--lr", type=float, default=WorldTrainOptions.lr)
    args = ap.parse_args(argv)

    force = args.force or os.path.abspath(args.out) == os.path.abspath(BUNDLED_WORLD_MODEL)
    try:  # every argument is checked before the minutes of training
        params = WorldParams(seed=args.seed, bias_strength=args.bias_strength, attribute_kind=args.attribute_kind,
                             groups=_names(args.groups), concepts=_names(args.concepts) or WorldParams.concepts)
        n_eval = balanced_size(params) if args.n_eval is None else check_eval_size(params, args.n_eval, "--n-eval")
        options = WorldTrainOptions(epochs=args.epochs, n_train=args.n_train, lr=args.lr, seed=args.seed, n_eval=n_eval)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        check_output_path(args.out, force=force)
    except (SurgeryError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 25 == 0 or step == total:
            print(f"step {step}/{total}  loss {loss:.3f}  {time.perf_counter() - start:.0f}s", flush=True)

    model, history = train_world_model(params, options, progress)
    quality = evaluate_world_model(model, params, n_eval=options.n_eval)
    save_world_model(model, params, args.out, history=history, quality=quality)
    print(f"trained in {history['seconds']} s on {history['threads']} threads")
    print(f"zero-shot concept accuracy {quality.concept_accuracy:.3f}")
    print(f"zero-shot group accuracy   {quality.group_accuracy:.3f}")
    print(f"mean MaxSkew@50 (neutral)  {quality.max_skew_at_50:.3f}  per query {quality.per_query_max_skew}")
    print(f"wrote {args.out}")
    return 0


def _names(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",")) if value else None


if __name__ == "__main__":
    sys.exit(main())
