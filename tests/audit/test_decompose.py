"""Decomposition: the parts add back up to the embedding, and each part is the right head's."""
from __future__ import annotations

import pytest
import torch

from surgery.audit.decompose import decompose
from surgery.edit.bake import bake
from surgery.edit.plan import HeadEdit, SurgeryPlan
from surgery.model.tiny import build_tiny_clip


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("overrides", [
    {},  # the plain tiny CLIP
    {"custom_text": True},  # text tower under model.text
    {"vision_cfg": {"ls_init_value": 0.5}, "text_cfg": {"ls_init_value": 0.5}},  # LayerScale blocks
    {"vision_cfg": {"scale_heads": True}, "text_cfg": {"scale_heads": True}},  # open_clip's own Attention
])
def test_parts_add_up_to_the_embedding(overrides, images, tokens):
    model, _ = build_tiny_clip(seed=3, **overrides)
    for tower, x, encode in (("vision", images, model.encode_image), ("text", tokens, model.encode_text)):
        dec = decompose(model, tower, x)
        with torch.no_grad():
            want = encode(x)
        assert _rel_err(dec.total(), want) <= 1e-5, tower
        assert _rel_err(dec.embedding, want) <= 1e-6, tower
        assert dec.heads.shape[1:3] == (2, 4 if tower == "vision" else 2)


def test_model_left_unswapped_after_decomposition(tiny, images):
    model, _ = tiny
    decompose(model, "vision", images)
    assert type(model.visual.transformer.resblocks[0].attn).__name__ == "MultiheadAttention"


def test_pruned_heads_contribute_exactly_nothing(images):
    model, _ = build_tiny_clip(seed=4)
    bake(model, SurgeryPlan(heads=[HeadEdit("vision", 1, 3, 0.0), HeadEdit("vision", 0, 0, 0.0)]))
    dec = decompose(model, "vision", images)
    assert dec.heads[:, 1, 3].abs().max() == 0 and dec.heads[:, 0, 0].abs().max() == 0
    assert dec.heads[:, 1, 2].abs().max() > 1e-3
    with torch.no_grad():
        assert _rel_err(dec.total(), model.encode_image(images)) <= 1e-5


def test_head_part_scales_with_the_head(images):
    """Halving one head's out_proj columns halves its pre-norm part; in embedding space the part
    of a head in the LAST layer (no later layer sees it) changes by exactly 1/2 * sigma_old/sigma_new."""
    model, _ = build_tiny_clip(seed=5)
    before = decompose(model, "vision", images)
    bake(model, SurgeryPlan(heads=[HeadEdit("vision", 1, 2, 0.5)]))
    after = decompose(model, "vision", images)
    ratio = after.heads[:, 1, 2].norm(dim=-1) / before.heads[:, 1, 2].norm(dim=-1)  # (B,)
    # sigma changes with the residual; recover it from an untouched part of the same layer
    sigma_ratio = after.heads[:, 1, 1].norm(dim=-1) / before.heads[:, 1, 1].norm(dim=-1)
    torch.testing.assert_close(ratio, 0.5 * sigma_ratio, atol=1e-5, rtol=1e-5)


def test_head_sums_equal_head_means_from_a_plain_pass(images):
    from surgery.audit.ablation import head_means
    from surgery.audit.probe import ProbeSet

    model, _ = build_tiny_clip(seed=6)
    dec = decompose(model, "vision", images)
    probe = ProbeSet(images=images, groups=torch.tensor([0, 1, 0]), group_names=["a", "b"], queries=["q"],
                     group_prompts=["a", "b"])
    n_tokens = model.visual.positional_embedding.shape[0]
    torch.testing.assert_close(dec.head_sums / (images.shape[0] * n_tokens), head_means(model, probe, batch_size=2),
                               atol=1e-5, rtol=1e-5)


def test_nonlinear_attention_output_norm_is_refused(images):
    from surgery.errors import UnsupportedTowerError

    model, _ = build_tiny_clip(seed=0, vision_cfg={"scale_attn": True})
    with pytest.raises(UnsupportedTowerError, match="scale_attn"):
        decompose(model, "vision", images)


@pytest.mark.parametrize("overrides", [
    {},  # the plain tiny CLIP: the last block's pooled-query shortcut
    {"vision_cfg": {"ls_init_value": 0.5}, "text_cfg": {"ls_init_value": 0.5}},  # LayerScale blocks
    {"vision_cfg": {"scale_heads": True}, "text_cfg": {"scale_heads": True}},  # learned head_scale in the shortcut
])
def test_pooled_forward_equals_the_full_forward(overrides, images, tokens):
    """The pooled-token forward (last block on the pooled row only) gives the tower's embedding, the
    pooled head outputs the full forward's, and head sums decompose()'s."""
    from surgery.audit.decompose import (
        final_linear_parts,
        head_contributions,
        pooled_embedding,
        pooled_forward,
        project,
        tower_inputs,
    )
    from surgery.model.attention import head_masked
    from surgery.model.towers import get_towers

    model, _ = build_tiny_clip(seed=3, **overrides)
    for tower, x, encode in (("vision", images, model.encode_image), ("text", tokens, model.encode_text)):
        view = get_towers(model)[tower]
        dec = decompose(model, tower, x)
        with torch.no_grad(), head_masked(model, towers=(tower,), backend="math"):
            inputs, mask, index = tower_inputs(model, tower, x)
            residual, pooled, sums = pooled_forward(view, inputs, mask, index, capture=True, head_sums=True)
            emb = pooled_embedding(view, residual)
            sigma, gamma, matrix, _ = final_linear_parts(view, residual)
            heads = project(head_contributions(view, pooled), sigma, gamma, matrix)
            plain, _, none = pooled_forward(view, inputs, mask, index)
            plain = pooled_embedding(view, plain)
        assert none is None
        assert _rel_err(emb, encode(x).detach()) <= 1e-6, tower
        assert _rel_err(plain, emb) <= 1e-6, tower
        assert _rel_err(heads, dec.heads) <= 1e-5, tower
        torch.testing.assert_close(sums, dec.head_sums, atol=1e-5, rtol=1e-5)
