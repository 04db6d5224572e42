"""TowerView: one description of both towers, for CLIP and CustomTextCLIP layouts."""
from __future__ import annotations

import pytest
import torch

import surgery
from surgery.model.tiny import build_tiny_clip


def test_tiny_towers(tiny):
    model, _ = tiny
    towers = surgery.get_towers(model)
    vision, text = towers["vision"], towers["text"]
    assert (vision.n_layers, vision.n_heads, vision.head_dim, vision.width) == (2, 4, 16, 64)
    assert (text.n_layers, text.n_heads, text.head_dim, text.width) == (2, 2, 16, 32)
    assert not vision.causal and text.causal
    assert vision.pooling == "cls" and text.pooling == "argmax"
    assert vision.final_norm is model.visual.ln_post and text.final_norm is model.ln_final
    assert vision.projection is model.visual.proj and text.projection is model.text_projection
    assert vision.block_prefix == "visual.transformer.resblocks" and text.block_prefix == "transformer.resblocks"
    sd = model.state_dict()
    assert f"{vision.block_prefix}.1.attn.out_proj.weight" in sd
    assert f"{text.block_prefix}.0.attn.in_proj_weight" in sd


def test_view_reproduces_the_embedding(tiny, images, tokens):
    """Running the blocks, final norm, pooling and projection the view names gives encode_image/text."""
    model, _ = tiny
    vision = surgery.get_towers(model)["vision"]
    with torch.no_grad():
        x = model.visual._embeds(images)
        for block in vision.blocks:
            x = block(x)
        manual = vision.final_norm(x)[:, 0] @ vision.projection
        torch.testing.assert_close(manual, model.encode_image(images), atol=1e-6, rtol=1e-6)


def test_custom_text_layout_and_avg_pool():
    model, _ = build_tiny_clip(custom_text=True, vision_cfg={"pool_type": "avg"})
    towers = surgery.get_towers(model)
    assert towers["text"].block_prefix == "text.transformer.resblocks"
    assert towers["text"].final_norm is model.text.ln_final
    assert towers["vision"].pooling == "avg"


def test_non_causal_text_tower():
    model, _ = build_tiny_clip(custom_text=True, text_cfg={"no_causal_mask": True, "pool_type": "last"})
    text = surgery.get_towers(model)["text"]
    assert not text.causal and text.pooling == "last"


def test_summary_is_json_friendly(tiny):
    import json

    model, _ = tiny
    summary = surgery.get_towers(model)["vision"].summary()
    assert json.loads(json.dumps(summary))["projection"] == [64, 32]


def test_unsupported_pooling():
    model, _ = build_tiny_clip(vision_cfg={"pool_type": "none"})
    with pytest.raises(surgery.UnsupportedTowerError, match="pooling"):
        surgery.get_towers(model)
