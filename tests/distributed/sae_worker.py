"""One rank of a data-parallel SAE training job, for tests/distributed/test_sae_ranks.py.

    torchrun --standalone --nproc-per-node 2 sae_worker.py CACHE OUT SPEC_JSON

SPEC_JSON: a list of {"name", "cfg": SAEConfig kwargs, "options": TrainOptions kwargs, "stop_at", "cache"}
("cache": that run's cache folder instead of CACHE, so one job trains on caches of several widths).
Rank 0 saves each run's state dict as OUT/NAME.safetensors; ``stop_at`` interrupts a run (on every
rank) after that step, as a kill would, leaving its checkpoints.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from surgery.runtime.distributed import init_ranks
from surgery.sae import SAEConfig, TrainOptions, open_cache, train_sae


class Interrupted(Exception):
    pass


def main() -> None:
    cache_dir, out_dir, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    ranks = init_ranks()
    for run in spec:
        cache = open_cache(run.get("cache", cache_dir))
        cfg = SAEConfig(d_in=cache.d, **run["cfg"])
        options = TrainOptions(**run["options"])

        def stop(step, _total, _loss, at=run.get("stop_at")):
            if at is not None and step >= at:
                raise Interrupted

        try:
            sae, history = train_sae(cache, cfg, options, stop, ranks=ranks)
        except Interrupted:
            continue
        if ranks.main:
            state = {k: v.contiguous() for k, v in sae.state_dict().items()}
            save_file(state, os.path.join(out_dir, run["name"] + ".safetensors"),
                      metadata={"ranks": str(history["ranks"])})
    ranks.close()


if __name__ == "__main__":
    main()
