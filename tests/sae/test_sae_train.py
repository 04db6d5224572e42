"""Activation cache, training, checkpoints and resume, evaluation."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from helpers import IdentityImageEncoder

from surgery.io.checkpoint import state_dict_hash
from surgery.sae import (
    CacheError,
    SAEConfig,
    SAEError,
    Site,
    TrainOptions,
    build_cache,
    evaluate_sae,
    load_sae,
    normalised_mse,
    open_cache,
    save_trained,
    train_sae,
)
from surgery.sae import train as train_mod


def _synthetic_cache(tmp_path, n=600, d=8, shard_rows=128, name="cache"):
    """A cache of sparse-dictionary data written through build_cache with an identity 'model'."""
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(24, d, generator=gen)
    codes = torch.rand(n, 24, generator=gen) * (torch.rand(n, 24, generator=gen) < 0.12)
    data = codes @ dictionary + 0.5

    return build_cache(IdentityImageEncoder(), Site("vision", "embedding"), data.split(100), str(tmp_path / name),
                       shard_rows=shard_rows), data


def _cfg(cache, kind="topk", **kw):
    return SAEConfig(d_in=cache.d, expansion=4, kind=kind, k=3, **{"dead_after": 400, **kw})


def test_cache_layout_shuffle_and_reading(tmp_path):
    cache, data = _synthetic_cache(tmp_path)
    assert cache.rows == 600 and cache.d == 8 and [s["rows"] for s in cache.shards] == [128] * 4 + [88]
    rows = torch.cat(list(cache.iter_rows(50)))
    ids = torch.cat([cache.read_samples(i) for i in range(len(cache.shards))])
    torch.testing.assert_close(rows, data[ids])  # every row traceable to its input
    assert not torch.equal(ids[:128], torch.arange(128))  # shuffled within the shard
    assert cache.read(1, 10, 20).shape == (10, 8)


def test_cache_of_tiny_model_both_towers_both_sites(tmp_path, tiny, images, tokens):
    model, _cfg_ = tiny
    res = build_cache(model, Site("vision", "residual"), [images], str(tmp_path / "vr"))
    assert (res.rows, res.d) == (3 * 17, 64)  # all tokens: 16 patches + class token
    emb = build_cache(model, Site("vision", "embedding"), [images], str(tmp_path / "ve"))
    assert (emb.rows, emb.d) == (3, 32)
    txt = build_cache(model, Site("text", "residual"), [tokens], str(tmp_path / "tr"))
    assert txt.rows == int((tokens.argmax(-1) + 1).sum()) and txt.d == 32  # tokens up to end-of-text
    assert res.model_hash == state_dict_hash(model)


def test_cache_of_another_model_is_refused(tmp_path):
    cache, _ = _synthetic_cache(tmp_path)
    with pytest.raises(CacheError, match="made from another model.*delete it or pass a new --cache"):
        train_sae(cache, _cfg(cache), TrainOptions(steps=1), model_hash="0" * 64)


def test_nan_activations_are_refused(tmp_path, tiny, images):
    model, _cfg_ = tiny
    with torch.no_grad():
        model.visual.proj[0, 0] = float("nan")
    with pytest.raises(CacheError, match="NaN or inf activations.*use fp32"):
        build_cache(model, Site("vision", "embedding"), [images], str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c" / "cache.json")
    # a cache whose shard was damaged later
    cache, _ = _synthetic_cache(tmp_path, name="ok")
    from safetensors.torch import load_file, save_file
    shard = os.path.join(cache.path, cache.shards[0]["file"])
    tensors = load_file(shard)
    tensors["acts"][3, 2] = float("nan")
    save_file(tensors, shard)
    with pytest.raises(CacheError, match="NaN or inf.*rebuild the cache"):
        train_sae(cache, _cfg(cache), TrainOptions(steps=10, batch_size=64))


def test_open_cache_errors(tmp_path):
    with pytest.raises(CacheError, match="not an activation cache"):
        open_cache(str(tmp_path))
    cache, _ = _synthetic_cache(tmp_path)
    os.unlink(os.path.join(cache.path, cache.shards[2]["file"]))
    with pytest.raises(CacheError, match="missing"):
        open_cache(cache.path)


@pytest.mark.parametrize("kind", ["batchtopk", "topk", "relu"])
def test_training_reduces_error(tmp_path, kind):
    cache, data = _synthetic_cache(tmp_path)
    sae, history = train_sae(cache, _cfg(cache, kind, l1_coeff=1e-3),
                             TrainOptions(steps=150, batch_size=64, lr=3e-3, warmup_steps=5))
    m = evaluate_sae(sae, cache)
    assert m.nmse < 0.5 and m.rows == 600 and 0 <= m.dead_fraction <= 1
    assert abs(m.explained_variance - (1 - m.nmse)) < 0.05
    assert abs(m.nmse - normalised_mse(data, sae(data).detach())) < 1e-4
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.width))
    if kind == "topk":
        assert m.l0 <= 3
    if kind == "batchtopk":
        assert history["threshold"] > 0 and m.l0 < 12  # inference threshold keeps it sparse
    assert history["loss_last"] < history["loss_first"]


def test_interrupt_and_resume_gives_the_same_weights(tmp_path):
    cache, _ = _synthetic_cache(tmp_path)
    opts = dict(steps=40, batch_size=64, lr=3e-3, warmup_steps=5, seed=3)
    cfg = _cfg(cache, "batchtopk", dead_after=100)
    reference, _ = train_sae(cache, cfg, TrainOptions(**opts))

    class Stop(Exception):
        pass

    def stop_at_17(step, total, loss):  # after the step-15 checkpoint, before the step-20 one
        if step == 17:
            raise Stop

    run_dir = str(tmp_path / "run")
    with pytest.raises(Stop):
        train_sae(cache, _cfg(cache, "batchtopk", dead_after=100),
                  TrainOptions(**opts, checkpoint_dir=run_dir, checkpoint_every=5), stop_at_17)
    steps_seen = []
    resumed, history = train_sae(cache, _cfg(cache, "batchtopk", dead_after=100),
                                 TrainOptions(**opts, checkpoint_dir=run_dir, checkpoint_every=5),
                                 lambda s, t, l: steps_seen.append(s))
    assert history["resumed_at"] == 15 and steps_seen[0] == 16
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    with pytest.raises(SAEError, match="other settings"):
        train_sae(cache, _cfg(cache, "batchtopk", dead_after=100),
                  TrainOptions(**{**opts, "lr": 1e-3}, checkpoint_dir=run_dir))


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    cache, _ = _synthetic_cache(tmp_path)
    run_dir = tmp_path / "run"
    opts = TrainOptions(steps=10, batch_size=64, checkpoint_dir=str(run_dir), checkpoint_every=5)
    train_sae(cache, _cfg(cache), opts)
    ckpt = run_dir / train_mod.CHECKPOINT_FILE
    before = ckpt.read_bytes()

    import safetensors.torch

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_sae(cache, _cfg(cache), TrainOptions(steps=20, batch_size=64, checkpoint_dir=str(run_dir / "b"),
                                                    checkpoint_every=5))
    assert ckpt.read_bytes() == before
    assert not [p for p in (run_dir / "b").iterdir()]  # the temporary file was removed


def test_save_trained_writes_weights_and_cfg(tmp_path):
    cache, _ = _synthetic_cache(tmp_path)
    sae, history = train_sae(cache, _cfg(cache), TrainOptions(steps=5, batch_size=64))
    save_trained(sae, str(tmp_path / "out"), history, evaluate_sae(sae, cache))
    record = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert set(record) >= {"schema", "config", "training", "metrics"}
    assert record["config"]["model_hash"] == cache.model_hash
    assert torch.equal(load_sae(str(tmp_path / "out")).W_dec, sae.W_dec)


def test_width_mismatch(tmp_path):
    cache, _ = _synthetic_cache(tmp_path)
    with pytest.raises(SAEError, match="d_in=16 but the cache rows have width 8"):
        train_sae(cache, SAEConfig(d_in=16, expansion=2, k=2), TrainOptions(steps=1))


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_sparse_training_step_equals_dense(kind):
    """The sparse path (gathered encoder columns + embedding_bag decode) gives the dense path's loss
    and gradients, with the auxiliary-k loss active."""
    torch.manual_seed(0)
    from surgery.sae import SparseAutoencoder
    from surgery.sae.train import training_step

    cfg = SAEConfig(d_in=16, expansion=4, kind=kind, k=3, aux_k=5, dead_after=1)
    sae = SparseAutoencoder(cfg).train()
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16) * 0.1)
        sae.b_enc.copy_(torch.randn(64) * 0.1)
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.long)
    dead[::3] = 5  # some latents dead -> aux-k loss on
    results = {}
    for sparse in (False, True):
        sae.zero_grad()
        res = training_step(sae, x, dead, sparse=sparse)
        res.loss.backward()
        results[sparse] = (res, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (dense, g_dense), (sparse_, g_sparse) = results[False], results[True]
    torch.testing.assert_close(sparse_.loss, dense.loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(sparse_.fired, dense.fired)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], atol=1e-5, rtol=1e-4, msg=name)
    if kind == "batchtopk":
        torch.testing.assert_close(sparse_.min_active, dense.min_active)


def test_epochs_set_the_length_from_the_data_and_a_plateau_stops_the_run(tmp_path):
    """--epochs: steps = epochs x batches per pass (at most ``steps``); the plateau rule stops at an
    epoch's end once the epoch's mean loss improves by less than the fraction, never before min_epochs."""
    cache, _ = _synthetic_cache(tmp_path)  # 600 rows in shards of 128: 9 batches of 64 per pass
    base = dict(batch_size=64, lr=3e-3, warmup_steps=5)
    _, history = train_sae(cache, _cfg(cache), TrainOptions(steps=1000, epochs=2.5, **base))
    assert history["steps"] == history["planned_steps"] == 23 and not history["stopped_on_plateau"]
    _, capped = train_sae(cache, _cfg(cache), TrainOptions(steps=10, epochs=2.5, **base))
    assert capped["steps"] == 10
    _, flat = train_sae(cache, _cfg(cache), TrainOptions(steps=1000, epochs=40, plateau=0.5, min_epochs=3, **base))
    assert flat["stopped_on_plateau"] and flat["steps"] % 9 == 0 and 27 <= flat["steps"] < 360
    assert flat["epochs"] == flat["steps"] / 9
    _, never = train_sae(cache, _cfg(cache), TrainOptions(steps=1000, epochs=4, plateau=0.0, **base))
    assert never["steps"] == 36 and not never["stopped_on_plateau"]
    with pytest.raises(SAEError, match="epochs must be > 0"):
        TrainOptions(epochs=0)


def test_the_plateau_rule_compares_each_epoch_with_the_best_before_it():
    rule = train_mod._Plateau(0.1, min_epochs=2)
    assert not rule.flat([10.0, 10.0])  # first epoch: nothing to compare
    assert not rule.flat([8.0])  # 20% better
    assert rule.flat([7.5])  # 6% better than the best (8.0): flat
    rule = train_mod._Plateau(0.1, min_epochs=5)
    assert not any(rule.flat([1.0]) for _ in range(4))  # flat from the start, but min_epochs not reached
    assert rule.flat([1.0])
    rule = train_mod._Plateau(0.1, min_epochs=2)
    assert not rule.flat([8.0])
    assert rule.flat([12.0])  # worse than the best: no improvement at all (not a 50% change)
    rule = train_mod._Plateau(0.1, min_epochs=3)
    assert not rule.flat([8.0]) and not rule.flat([12.0])  # (min_epochs not reached)
    assert rule.flat([7.9])  # 34% below the epoch before, but 1% below the best (8.0): flat


@pytest.mark.parametrize("loss", ["flat", "rising"])
def test_a_run_whose_loss_stops_improving_stops_once_min_epochs_have_run(tmp_path, monkeypatch, loss):
    """The loss stops improving from the first epoch on: with weights that barely move (lr 1e-7) each
    pass has the same loss ('flat'), or that loss times 1, 1.5, 2, ... by epoch ('rising': worse than
    the best is no improvement). Either way the plateau rule stops the run at the end of epoch
    min_epochs (27 of 72 steps), not later and not before."""
    cache, _ = _synthetic_cache(tmp_path)  # 9 batches of 64 per pass
    if loss == "rising":
        real, steps = train_mod.training_step, []

        def rising(sae, x, rows_since_fired):
            steps.append(None)
            result = real(sae, x, rows_since_fired)
            return dataclasses.replace(result, loss=result.loss * (1 + 0.5 * ((len(steps) - 1) // 9)))

        monkeypatch.setattr(train_mod, "training_step", rising)
    opts = TrainOptions(steps=1000, epochs=8, plateau=0.01, min_epochs=3, batch_size=64, lr=1e-7, warmup_steps=0)
    _, history = train_sae(cache, _cfg(cache), opts)
    assert history["stopped_on_plateau"] and history["steps"] == 27, history["steps"]
    if loss == "rising":
        assert len(steps) == 27 and history["loss_last"] > 1.9 * history["loss_first"]
