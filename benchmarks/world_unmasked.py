"""The world model trained without false-negative masking: does the co-occurrence still become bias?

    python benchmarks/world_unmasked.py                  # the bundled world's parameters and options, seed 0
    python benchmarks/world_unmasked.py --seeds 0,1 --threads 2

examples/train_world.py trains the bundled model with CLIP's loss minus the false negatives (a
caption true of another image in the batch is left out of that image's softmax; see
surgery/world/train.py::_contrastive_step). This script trains the same world, with the same
options, under the plain CLIP loss (every other pair in the batch pushed apart), and prints the
quality figures evaluate_world_model gives the bundled model (README: "The planted-bias world").
It changes nothing in clipsurgery: the truth matrix the loss masks with is replaced by the
identity for the run.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (world and model)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import surgery.world.train as world_train
    from surgery.world.params import WorldParams

    def no_false_negatives(concepts, caption_groups, groups):  # only the diagonal is a true pair: plain CLIP loss
        return torch.eye(len(concepts), dtype=torch.bool)

    world_train.caption_truth = no_false_negatives
    print(f"world model, plain CLIP loss (no false-negative masking), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for seed in (int(s) for s in args.seeds.split(",")):
        params = WorldParams(seed=seed)
        options = world_train.WorldTrainOptions(seed=seed)
        start = time.perf_counter()
        model, _ = world_train.train_world_model(params, options)
        q = world_train.evaluate_world_model(model, params, n_eval=options.n_eval)
        per_query = ", ".join(f"{v:.3f}" for v in q.per_query_max_skew)
        print(f"seed {seed}: concept accuracy {q.concept_accuracy:.3f}, group accuracy {q.group_accuracy:.3f}, "
              f"mean MaxSkew@50 {q.max_skew_at_50:.3f} (per query {per_query}; range "
              f"{min(q.per_query_max_skew):.3f}-{max(q.per_query_max_skew):.3f}), "
              f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
