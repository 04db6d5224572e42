"""World model: training runs and learns, unused token rows stay zero, checkpoints carry the world."""
from __future__ import annotations

import os

import pytest
import torch

import surgery
from surgery.model.loading import BUNDLED_WORLD_MODEL
from surgery.model.preprocess import tokenize
from surgery.world.checkpoint import save_world_model, world_params_of
from surgery.world.params import WorldParams
from surgery.world.train import (
    WORLD_MODEL_CONFIG,
    WORLD_TOKENIZER,
    WorldQuality,
    WorldTrainOptions,
    build_world_clip,
    evaluate_world_model,
    train_world_model,
    world_vocabulary,
)


@pytest.fixture(scope="module")
def trained():
    params = WorldParams(seed=1)
    torch.manual_seed(0)
    model, history = train_world_model(params, WorldTrainOptions(n_train=512, epochs=3, batch_size=128, warmup_steps=2))
    return params, model, history


def test_training_lowers_the_loss(trained):
    _, _, history = trained
    assert history["steps"] == 12
    assert history["loss_last_epoch_mean"] < history["loss_first"] - 0.1


def test_unused_token_rows_stay_exactly_zero(trained):
    params, model, _ = trained
    used = torch.unique(tokenize(world_vocabulary(params), WORLD_TOKENIZER))
    emb = model.token_embedding.weight
    unused = torch.ones(emb.shape[0], dtype=torch.bool)
    unused[used] = False
    assert emb[unused].abs().max() == 0
    assert emb[used].abs().sum(1).min() > 0


def test_checkpoint_round_trip_carries_the_world(trained, tmp_path, images=None):
    params, model, history = trained
    quality = WorldQuality(0.5, 0.9, 0.6)
    path = tmp_path / "w.safetensors"
    save_world_model(model, params, str(path), history=history, quality=quality)
    loaded = surgery.load(str(path))
    assert loaded.arch == "clipsurgery-world-v1" and loaded.config == WORLD_MODEL_CONFIG
    assert world_params_of(loaded) == params
    assert loaded.metadata["quality"]["group_accuracy"] == 0.9
    assert (tmp_path / "world_params.json").is_file()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(x), model.encode_image(x), atol=0, rtol=0)


def test_evaluate_world_model_shapes(trained):
    params, model, _ = trained
    quality = evaluate_world_model(model, params, n_eval=120, k=10)
    assert 0 <= quality.concept_accuracy <= 1 and 0 <= quality.group_accuracy <= 1
    assert len(quality.per_query_max_skew) == params.n_concepts
    assert 0 <= quality.max_skew_at_50 <= 0.6932


def test_fresh_world_clip_zeroes_rows_outside_vocabulary():
    model = build_world_clip(WorldParams())
    nonzero = (model.token_embedding.weight.abs().sum(1) > 0).sum().item()
    assert 10 < nonzero < 100


@pytest.mark.skipif(not os.path.isfile(BUNDLED_WORLD_MODEL), reason="bundled model not built")
def test_bundled_world_model_meets_the_quality_bar():
    """The committed model, re-measured: concept acc >= 0.90, group acc >= 0.95, MaxSkew@50 >= 0.5."""
    loaded = surgery.load("builtin:world")
    params = world_params_of(loaded)
    quality = evaluate_world_model(loaded.model, params, n_eval=1200, k=50)
    assert quality.concept_accuracy >= 0.90
    assert quality.group_accuracy >= 0.95
    assert quality.max_skew_at_50 >= 0.5
