"""StaticShapeGraph: eager off CUDA (equal results, nothing captured); on a GPU, graph replay with new
inputs and head masks copied into static buffers equals the eager masked forward."""
from __future__ import annotations

import copy

import pytest
import torch

import surgery
from surgery.model.graphs import StaticShapeGraph
from surgery.model.tiny import build_tiny_clip

CUDA = torch.cuda.is_available()


def _masked_encoder(model):
    """fn(images (B, 3, H, W), masks (B, L, H)) -> image embeddings (B, D) under per-row head masks."""
    def fn(images, masks):
        surgery.set_head_masks(model, "vision", masks)
        try:
            return model.encode_image(images)
        finally:
            surgery.set_head_masks(model, "vision", None)
    return fn


def _inputs(seed, device):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=gen)  # (B, 3, H, W)
    masks = torch.rand(3, 2, 4, generator=gen)  # (B, L, H)
    return images.to(device), masks.to(device)


@pytest.mark.parametrize("backend", ["math", "triton"])
def test_off_cuda_the_wrapper_is_the_eager_call(backend):
    pytest.importorskip("triton") if backend == "triton" else None
    model, _ = build_tiny_clip(seed=0)
    surgery.swap_attention(model, backend=backend)
    reference = copy.deepcopy(model)
    surgery.swap_attention(reference, backend="math")
    graphed = StaticShapeGraph(_masked_encoder(model))
    with torch.no_grad():
        for seed in range(3):  # new images and masks each call
            images, masks = _inputs(seed, "cpu")
            assert not graphed.uses_graphs(images, masks)
            got = graphed(images, masks)
            want = _masked_encoder(reference)(images, masks)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert graphed.captured == 0


def test_disabled_wrapper_never_captures():
    calls = []
    graphed = StaticShapeGraph(lambda x: calls.append(1) or x * 2, enabled=False)
    x = torch.arange(4.0)
    assert torch.equal(graphed(x), x * 2) and calls == [1] and graphed.captured == 0
    with pytest.raises(ValueError, match="warmup"):
        StaticShapeGraph(lambda x: x, warmup=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_graph_replay_equals_eager_on_gpu(backend):
    model, _ = build_tiny_clip(seed=0)
    model = model.cuda()
    surgery.swap_attention(model, backend=backend)
    eager_model = copy.deepcopy(model)
    graphed = StaticShapeGraph(_masked_encoder(model))
    with torch.no_grad():
        for seed in range(4):  # capture on the first call, replays after
            images, masks = _inputs(seed, "cuda")
            assert graphed.uses_graphs(images, masks)
            got = graphed(images, masks)
            want = _masked_encoder(eager_model)(images, masks)
            torch.testing.assert_close(got, want)
    assert graphed.captured == 1
