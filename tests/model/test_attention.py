"""HeadMaskedAttention: exact drop-in for open_clip's attention, with per-head masks."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_embeddings, embeddings
from torch import nn

import surgery
from surgery.errors import HeadMaskError
from surgery.model.attention import HeadMaskedAttention, masked_modules
from surgery.model.tiny import build_tiny_clip

BACKENDS = ["math", "sdpa"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_equals_original_on_both_towers(tiny, images, tokens, backend):
    model, _ = tiny
    original = copy.deepcopy(model)
    surgery.swap_attention(model, backend=backend)
    assert all(isinstance(b.attn, HeadMaskedAttention) for v in surgery.get_towers(model).values() for b in v.blocks)
    assert_same_embeddings(original, model, images, tokens, atol=1e-6)
    for tower, view in surgery.get_towers(model).items():
        surgery.set_head_masks(model, tower, torch.ones(view.n_layers, view.n_heads))
    assert_same_embeddings(original, model, images, tokens, atol=1e-6)


def test_state_dict_unchanged_and_parameters_shared(tiny):
    model, _ = tiny
    before = model.state_dict(keep_vars=True)
    surgery.swap_attention(model)
    after = model.state_dict(keep_vars=True)
    assert list(before) == list(after)
    assert all(before[k] is after[k] for k in before)  # the very same Parameter objects


def test_restore_puts_back_the_original_modules(tiny, images, tokens):
    model, _ = tiny
    originals = [b.attn for v in surgery.get_towers(model).values() for b in v.blocks]
    surgery.swap_attention(model)
    surgery.set_head_masks(model, "vision", torch.zeros(2, 4))
    surgery.restore_attention(model)
    restored = [b.attn for v in surgery.get_towers(model).values() for b in v.blocks]
    assert all(a is b for a, b in zip(originals, restored))
    assert_same_embeddings(build_tiny_clip(seed=0)[0], model, images, tokens, atol=0)


def _zero_slice_reference(model, tower, layer, head, head_dim, images, tokens):
    """Original (unswapped) model with the head's input slice of out_proj removed.

    out_proj(x) = W x + b, so zeroing x[h*d:(h+1)*d] is the same as zeroing W[:, h*d:(h+1)*d].
    (nn.MultiheadAttention reads out_proj.weight directly, so a forward hook would not fire.)
    """
    ref = copy.deepcopy(model)
    attn = surgery.get_towers(ref)[tower].attention(layer)
    with torch.no_grad():
        attn.out_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    return embeddings(ref, images, tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tower, layer, head", [("vision", 1, 2), ("text", 0, 1)])
def test_zero_scale_equals_zeroing_the_head_slice(tiny, images, tokens, backend, tower, layer, head):
    model, _ = tiny
    view = surgery.get_towers(model)[tower]
    want_img, want_txt = _zero_slice_reference(model, tower, layer, head, view.head_dim, images, tokens)
    surgery.swap_attention(model, backend=backend)
    mask = torch.ones(view.n_layers, view.n_heads)
    mask[layer, head] = 0
    surgery.set_head_masks(model, tower, mask)
    got_img, got_txt = embeddings(model, images, tokens)
    torch.testing.assert_close(got_img, want_img, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-6, rtol=1e-6)
    # and the edit is visible: the embedding of the edited tower changed
    plain_img, plain_txt = embeddings(build_tiny_clip(seed=0)[0], images, tokens)
    changed = got_img if tower == "vision" else got_txt
    plain = plain_img if tower == "vision" else plain_txt
    assert (changed - plain).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_mask_rows_equal_separate_runs(tiny, images, backend):
    model, _ = tiny
    surgery.swap_attention(model, backend=backend)
    gen = torch.Generator().manual_seed(3)
    masks = torch.rand(images.shape[0], 2, 4, generator=gen)  # (B, L, H): a configuration per row
    surgery.set_head_masks(model, "vision", masks)
    with torch.no_grad():
        together = model.encode_image(images)
    for row in range(images.shape[0]):
        surgery.set_head_masks(model, "vision", masks[row])
        with torch.no_grad():
            alone = model.encode_image(images[row:row + 1])
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-6, rtol=0)


def test_captured_head_outputs_add_up_to_attention_output(tiny, images):
    model, _ = tiny
    surgery.swap_attention(model, backend="math")
    attn = masked_modules(model, "vision")[1]
    attn.capture = True
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        out, _ = attn(x, x, x, need_weights=False)
    z = attn.captured  # (B, H, N, d)
    assert z.shape == (2, 4, 17, 16)
    w_o = attn.out_proj.weight.view(64, 4, 16)  # (C, H, d)
    per_head = torch.einsum("bhnd,chd->bhnc", z, w_o)  # (B, H, N, C)
    torch.testing.assert_close(per_head.sum(1) + attn.out_proj.bias, out, atol=1e-5, rtol=0)


def test_mask_gradients_match_between_backends(tiny, images):
    grads = {}
    for backend in BACKENDS:
        model, _ = build_tiny_clip(seed=0)
        surgery.swap_attention(model, backend=backend)
        mask = torch.full((2, 4), 0.5, requires_grad=True)
        surgery.set_head_masks(model, "vision", mask)
        model.encode_image(images).pow(2).sum().backward()
        grads[backend] = mask.grad
    assert grads["math"].abs().sum() > 0
    torch.testing.assert_close(grads["math"], grads["sdpa"], atol=1e-5, rtol=1e-4)


def test_bad_masks_are_refused(tiny, images):
    model, _ = tiny
    surgery.swap_attention(model)
    with pytest.raises(HeadMaskError, match=r"\(4,\) or \(batch, 4\)"):
        masked_modules(model, "vision")[0].set_head_mask(torch.ones(5))
    with pytest.raises(HeadMaskError, match="do not fit 2 layers"):
        surgery.set_head_masks(model, "vision", torch.ones(3, 4))
    with pytest.raises(HeadMaskError, match="floating-point"):
        surgery.set_head_masks(model, "vision", torch.ones(2, 4, dtype=torch.long))
    surgery.set_head_masks(model, "vision", torch.ones(7, 2, 4))
    with pytest.raises(HeadMaskError, match="7 rows but the batch has 3"):
        model.encode_image(images)


def test_unknown_backend_and_unswapped_tower(tiny):
    model, _ = tiny
    with pytest.raises(surgery.SurgeryError, match="unknown attention backend"):
        surgery.swap_attention(model, backend="cuda-magic")
    with pytest.raises(surgery.SurgeryError, match="not swapped"):
        surgery.set_head_masks(model, "text", torch.ones(2, 2))


def test_head_masked_context_manager_restores(tiny, images, tokens):
    model, _ = tiny
    with surgery.head_masked(model, towers=("vision",)) as m:
        surgery.set_head_masks(m, "vision", torch.zeros(2, 4))
        assert isinstance(surgery.get_towers(m)["vision"].attention(0), HeadMaskedAttention)
    assert isinstance(surgery.get_towers(model)["vision"].attention(0), nn.MultiheadAttention)
    assert_same_embeddings(build_tiny_clip(seed=0)[0], model, images, tokens, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_custom_attention_with_learned_head_scale(images, tokens, backend):
    # scale_heads=True builds open_clip's own Attention class (the 4.x layout) with a head_scale parameter
    model, _ = build_tiny_clip(seed=4, vision_cfg={"scale_heads": True}, text_cfg={"scale_heads": True})
    attn = surgery.get_towers(model)["vision"].attention(0)
    assert type(attn).__name__ == "Attention" and attn.head_scale is not None
    with torch.no_grad():
        attn.head_scale.copy_(torch.tensor([0.5, 1.5, 1.0, 2.0]).view(4, 1, 1))
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    surgery.swap_attention(model, backend=backend)
    assert list(model.state_dict()) == keys
    assert_same_embeddings(original, model, images, tokens, atol=1e-5)


def test_batch_first_false_multihead_attention():
    mha = nn.MultiheadAttention(32, 4, batch_first=False).eval()
    wrapped = HeadMaskedAttention(mha, backend="math")
    x = torch.randn(9, 2, 32)  # (N, B, C)
    with torch.no_grad():
        want, _ = mha(x, x, x, need_weights=False)
        got, _ = wrapped(x, x, x, need_weights=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_set_head_edits_masks_edited_layers_only_and_mean_fills(tiny, images, tokens):
    from surgery.model.attention import clear_head_edits, set_head_edits

    model, _ = tiny
    reference = copy.deepcopy(model)
    surgery.swap_attention(model, backend="math")
    scales = torch.ones(2, 4)
    scales[1, 2] = 0.25  # (L, H): layer 1, head 2 keeps a quarter
    fills = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3))  # (L, H, d)
    set_head_edits(model, "vision", scales, fills)
    mods = masked_modules(model, "vision")
    assert mods[0].head_mask is None and mods[0].head_fill is None  # an untouched layer runs unmasked
    assert torch.equal(mods[1].head_mask, scales[1]) and torch.equal(mods[1].head_fill, fills[1])
    # the same edit through the per-layer API it stands for
    surgery.swap_attention(reference, backend="math")
    ref_mods = masked_modules(reference, "vision")
    ref_mods[1].set_head_mask(scales[1])
    ref_mods[1].set_head_fill(fills[1])
    assert_same_embeddings(reference, model, images, tokens, atol=0)
    clear_head_edits(model, "vision")
    assert all(m.head_mask is None and m.head_fill is None for m in mods)
    with pytest.raises(HeadMaskError, match=r"must be \(2, 4\)"):
        set_head_edits(model, "vision", torch.ones(3, 4))
