"""The `triton` backend of HeadMaskedAttention on whole models equals the `math` backend.

On the CPU this runs the kernels through Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import surgery
from surgery.model.tiny import build_tiny_clip

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _masked_pair(model, masks_by_tower):
    math_model, triton_model = copy.deepcopy(model).to(DEVICE), copy.deepcopy(model).to(DEVICE)
    surgery.swap_attention(math_model, backend="math")
    surgery.swap_attention(triton_model, backend="triton")
    for tower, masks in masks_by_tower.items():
        surgery.set_head_masks(math_model, tower, masks.to(DEVICE))
        surgery.set_head_masks(triton_model, tower, masks.to(DEVICE))
    return math_model, triton_model


def test_tiny_model_triton_equals_math_both_towers(images, tokens, caplog):
    model, _ = build_tiny_clip(seed=0)
    gen = torch.Generator().manual_seed(0)
    masks = {"vision": torch.rand(images.shape[0], 2, 4, generator=gen),  # (B, L, H): a config per image
             "text": torch.rand(2, 2, generator=gen)}  # (L, H) shared by the batch
    math_model, triton_model = _masked_pair(model, masks)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        for fn in ("encode_image", "encode_text"):
            x = (images if fn == "encode_image" else tokens).to(DEVICE)
            want, got = getattr(math_model, fn)(x), getattr(triton_model, fn)(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "using sdpa" not in caplog.text  # the causal text mask ran fused, no fallback


def test_world_model_triton_equals_math():
    loaded = surgery.load("builtin:world") if _has_world() else None
    if loaded is None:
        pytest.skip("bundled world model not present")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    masks = {"vision": torch.ones(4, 4)}
    masks["vision"][3, 1] = 0.0
    math_model, triton_model = _masked_pair(loaded.model, masks)
    with torch.no_grad():
        torch.testing.assert_close(triton_model.encode_image(images.to(DEVICE)),
                                   math_model.encode_image(images.to(DEVICE)), atol=1e-5, rtol=1e-5)


def test_mask_gradients_through_the_kernel_match_math(images):
    model, _ = build_tiny_clip(seed=1)
    grads = {}
    for backend in ("math", "triton"):
        m = copy.deepcopy(model).to(DEVICE)
        surgery.swap_attention(m, backend=backend)
        mask = torch.full((2, 4), 0.7, device=DEVICE, requires_grad=True)
        surgery.set_head_masks(m, "vision", mask)
        m.encode_image(images.to(DEVICE)).pow(2).sum().backward()
        grads[backend] = mask.grad
    torch.testing.assert_close(grads["triton"], grads["math"], atol=1e-4, rtol=1e-4)


def test_unsupported_call_falls_back_to_sdpa_with_a_warning(images, caplog):
    # head width 8 is not a kernel head dim: the module logs and uses sdpa, and stays exact
    model, _ = build_tiny_clip(seed=0, vision_cfg={"head_width": 8})
    math_model, triton_model = _masked_pair(model, {"vision": torch.rand(2, 8)})
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        got = triton_model.encode_image(images.to(DEVICE))
    assert "head dim 8 is not supported" in caplog.text and "using sdpa" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(got, math_model.encode_image(images.to(DEVICE)), atol=1e-5, rtol=1e-5)


def _has_world() -> bool:
    import os

    from surgery.model.loading import BUNDLED_WORLD_MODEL

    return os.path.isfile(BUNDLED_WORLD_MODEL)
