"""Data-parallel SAE training on 2 gloo ranks (torchrun) equals one process with the same global
batch, and a 2-rank run resumed from its checkpoint equals an unbroken one.

Every batch is split unevenly: 63 rows (31 + 32 over two ranks), and a short last shard of 37 rows
(18 + 19). So each rank's loss must be weighted by its share of the batch: with equal weights (or
none: Adam hides a common factor, not a different mix) the two runs part. Checked by mutation:
``weight = 1.0 / ranks.world`` and ``weight = 1.0`` in surgery/sae/train.py::_distributed_step
each fail test_two_ranks_train_the_same_sae_as_one_process.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_jobs import ENV
from helpers import IdentityImageEncoder
from safetensors.torch import load_file

from surgery.sae import SAEConfig, Site, TrainOptions, build_cache, train_sae

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("sae_worker.py"))
STEPS = 50
RUNS = [  # dense BatchTopK (narrow), the sparse path (d >= 256), TopK, ReLU + L1, Matryoshka
    {"name": "batchtopk_dense", "d": 16, "cfg": {"kind": "batchtopk", "k": 4, "expansion": 4, "dead_after": 300}},
    {"name": "batchtopk_sparse", "d": 256, "cfg": {"kind": "batchtopk", "k": 6, "expansion": 2, "dead_after": 300}},
    {"name": "topk", "d": 16, "cfg": {"kind": "topk", "k": 3, "expansion": 4}},
    {"name": "relu", "d": 16, "cfg": {"kind": "relu", "l1_coeff": 1e-3, "expansion": 4}},
    {"name": "matryoshka", "d": 16, "cfg": {"kind": "batchtopk", "k": 4, "expansion": 4, "matryoshka": [16, 32]}},
]


BATCH = 63  # odd: every batch splits 31 / 32 over two ranks


def _cache(path, d: int, n: int = 1537, shard_rows: int = 250):
    """Sparse-dictionary rows through build_cache (an identity 'model'): six shards of 250 rows and a
    last one of 37, smaller than a batch (its batch splits 18 / 19)."""
    gen = torch.Generator().manual_seed(d)
    dictionary = torch.randn(3 * d, d, generator=gen)
    codes = torch.rand(n, 3 * d, generator=gen) * (torch.rand(n, 3 * d, generator=gen) < 0.05)

    return build_cache(IdentityImageEncoder(), Site("vision", "embedding"), (codes @ dictionary + 0.3).split(100), str(path),
                       shard_rows=shard_rows)


def _torchrun(cache, out, spec) -> None:
    out.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             WORKER, str(cache.path), str(out), json.dumps(spec)],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _options(**kw) -> dict:
    return {"steps": STEPS, "batch_size": BATCH, "lr": 3e-3, "warmup_steps": 5, "init_rows": 512, **kw}


def _batch_sizes(cache) -> list[int]:
    """The rows of every batch an epoch visits (full batches of each shard; a shard smaller than a
    batch is one batch; remainders are dropped), as surgery.sae.train cuts them."""
    return [BATCH] * sum(s["rows"] // BATCH for s in cache.shards if s["rows"] >= BATCH) + \
        [s["rows"] for s in cache.shards if s["rows"] < BATCH]


def test_two_ranks_train_the_same_sae_as_one_process(tmp_path):
    caches = {d: _cache(tmp_path / f"cache{d}", d) for d in sorted({run["d"] for run in RUNS})}
    for cache in caches.values():
        sizes = _batch_sizes(cache)
        assert sorted(set(sizes)) == [37, BATCH] and STEPS > len(sizes)  # every batch is visited, the short one too
        assert all(n // 2 != n - n // 2 for n in sizes)  # two ranks' shares differ on every step
    # one torchrun job for every run (each on its width's cache): one launch instead of one per width
    spec = [{"name": r["name"], "cfg": r["cfg"], "options": _options(), "cache": str(caches[r["d"]].path)}
            for r in RUNS]
    _torchrun(caches[RUNS[0]["d"]], tmp_path / "ranks", spec)
    torch.set_num_threads(1)
    for run in RUNS:
        one, _ = train_sae(caches[run["d"]], SAEConfig(d_in=run["d"], **run["cfg"]), TrainOptions(**_options()))
        two = load_file(str(tmp_path / "ranks" / f"{run['name']}.safetensors"))
        for key, value in one.state_dict().items():
            torch.testing.assert_close(two[key], value, atol=2e-5, rtol=2e-5, msg=f"{run['name']}: {key}")
        if run["cfg"]["kind"] == "batchtopk":
            assert float(one.threshold) > 0  # the threshold was learned, and equals across runs


def test_a_two_rank_run_resumed_from_its_checkpoint_equals_an_unbroken_one(tmp_path):
    cache = _cache(tmp_path / "cache", 16)
    cfg = {"kind": "batchtopk", "k": 4, "expansion": 4, "dead_after": 300}
    spec = [
        {"name": "unbroken", "cfg": cfg, "options": _options(checkpoint_dir=str(tmp_path / "a"), checkpoint_every=20)},
        {"name": "never", "cfg": cfg, "options": _options(checkpoint_dir=str(tmp_path / "b"), checkpoint_every=20),
         "stop_at": 33},
    ]
    _torchrun(cache, tmp_path / "out", spec)
    assert not (tmp_path / "out" / "never.safetensors").exists()  # interrupted after step 33
    ckpt_meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "b" / "checkpoint.safetensors"),
                                                               "pt").metadata()["step"])
    assert ckpt_meta == 20
    spec_resume = [{"name": "resumed", "cfg": cfg,
                    "options": _options(checkpoint_dir=str(tmp_path / "b"), checkpoint_every=20)}]
    _torchrun(cache, tmp_path / "out", spec_resume)
    unbroken = load_file(str(tmp_path / "out" / "unbroken.safetensors"))
    resumed = load_file(str(tmp_path / "out" / "resumed.safetensors"))
    for key in unbroken:
        assert torch.equal(unbroken[key], resumed[key]), key
