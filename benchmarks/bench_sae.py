"""The same TopK SAE trained by clipsurgery and by overcomplete (PyPI) on the same cached embeddings.

    python benchmarks/bench_sae.py                    # world-model image embeddings (D=64)
    python benchmarks/bench_sae.py --images 16384 --steps 600 --threads 2

Both: TopK, F = expansion x D latents, k active, same batch size, same number of Adam steps at the
same constant learning rate, unit-norm decoder rows, no gradient clipping, plain squared-error loss
(clipsurgery: aux_coeff=0, no warm-up or decay). Data: clipsurgery streams the activation cache
from disk (its normal path, memory bounded by the batch); overcomplete gets the same rows in memory
through a shuffling DataLoader, centred and scaled first (its dictionary has no bias; clipsurgery
centres with b_dec and scales itself). Normalised MSE = sum ||x - x_hat||^2 / sum ||x - mean x||^2 on
all cached rows, in the original units (it is invariant to the centring/scaling). steps/s times the
training loop only (no cache building, no initialisation); best of ``--repeats`` runs each,
interleaved, on ``--threads`` threads.

overcomplete 0.3.0 imports ``matplotlib.cm.get_cmap``, removed in matplotlib 3.9; this script adds
that alias before importing it (no other change to overcomplete).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def _import_overcomplete():
    import matplotlib.cm
    import matplotlib.pyplot as plt

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = plt.get_cmap  # overcomplete 0.3.0 vs matplotlib >= 3.9
    import overcomplete
    from overcomplete.sae import TopKSAE, train_sae

    return overcomplete, TopKSAE, train_sae


def build_embeddings(n_images: int, workdir: str):
    import surgery
    from surgery import sae as S
    from surgery.model.preprocess import images_to_tensor
    from surgery.world.checkpoint import world_params_of
    from surgery.world.generator import generate

    loaded = surgery.load("builtin:world")
    params = world_params_of(loaded)
    images = images_to_tensor(generate(params, "train", n_images).images, loaded.preprocess)
    return S.build_cache(loaded.model, S.Site("vision", "embedding"), images.split(512), os.path.join(workdir, "cache"))


def run_ours(cache, expansion: int, k: int, batch: int, steps: int, lr: float, seed: int):
    from surgery import sae as S

    cfg = S.SAEConfig(d_in=cache.d, expansion=expansion, kind="topk", k=k, aux_coeff=0.0, tower="vision",
                      site="embedding")
    opts = S.TrainOptions(steps=steps, batch_size=batch, lr=lr, warmup_steps=0, decay_fraction=0.0, seed=seed)
    sae, history = S.train_sae(cache, cfg, opts)
    return steps / history["seconds"], S.evaluate_sae(sae, cache).nmse


def run_theirs(x: torch.Tensor, expansion: int, k: int, batch: int, steps: int, lr: float, seed: int, oc):
    _mod, TopKSAE, train_sae = oc
    torch.manual_seed(seed)
    mean = x.mean(0)
    scale = (x - mean).pow(2).sum(1).mean().sqrt() / x.shape[1] ** 0.5
    xs = (x - mean) / scale
    model = TopKSAE(x.shape[1], nb_concepts=expansion * x.shape[1], top_k=k, encoder_module="linear")
    data = torch.utils.data.TensorDataset(xs)
    per_epoch = len(xs) // batch
    epochs = -(-steps // per_epoch)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)

    def criterion(x, x_hat, pre_codes, codes, dictionary):
        return (x - x_hat).square().sum(-1).mean()

    start = time.perf_counter()
    train_sae(model, loader, criterion, optimiser, nb_epochs=epochs, clip_grad=None, monitoring=0)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        _pre, _z, x_hat = model(xs)
    err = (xs - x_hat).double().pow(2).sum()
    nmse = float(err / (xs.double() - xs.double().mean(0)).pow(2).sum())
    return epochs * per_epoch / seconds, nmse, epochs * per_epoch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8192, help="world images embedded into the cache")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    oc = _import_overcomplete()
    work = tempfile.mkdtemp(prefix="bench_sae_")
    cache = build_embeddings(args.images, work)
    x = torch.cat(list(cache.iter_rows()))
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_ours(cache, args.expansion, args.k, args.batch, args.steps, args.lr, args.seed))
        theirs.append(run_theirs(x, args.expansion, args.k, args.batch, args.steps, args.lr, args.seed, oc))
    o_sps, o_nmse = max(ours, key=lambda r: r[0])
    t_sps, t_nmse, t_steps = max(theirs, key=lambda r: r[0])
    print(f"TopK SAE on {cache.rows} world image embeddings: D={cache.d}, F={args.expansion * cache.d}, "
          f"k={args.k}, batch {args.batch}, {args.steps} steps (overcomplete: {t_steps}), Adam lr {args.lr}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, overcomplete {oc[0].__version__}, "
          f"best of {args.repeats}")
    print(f"{'':<16}{'steps/s':>10}{'NMSE':>10}")
    print(f"{'clipsurgery':<16}{o_sps:>10.1f}{o_nmse:>10.4f}")
    print(f"{'overcomplete':<16}{t_sps:>10.1f}{t_nmse:>10.4f}")
    print(f"{'ratio':<16}{o_sps / t_sps:>9.2f}x{'':>10}  (target >= 1.5x with NMSE <= theirs: "
          f"{'met' if o_sps >= 1.5 * t_sps and o_nmse <= t_nmse else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
