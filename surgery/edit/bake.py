"""Bake a SurgeryPlan into a CLIP's weights, exactly (no new op at run time).

For head ``h`` of a block, with ``sl = h*d:(h+1)*d`` the head's columns of ``out_proj.weight``
(W_O, shape (C, C)) and ``s`` the edit's scale:

* zero ablation:  ``W_O[:, sl] *= s``
* mean ablation:  ``out_proj.bias += (1 - s) * W_O[:, sl] @ mean_h`` (with the original W_O), then
  ``W_O[:, sl] *= s``

The baked model equals the runtime-masked model (:func:`apply_runtime`) to float rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from surgery.edit.plan import SurgeryPlan
from surgery.errors import UnsupportedTowerError
from surgery.model.attention import set_head_edits, swap_attention
from surgery.model.neurons import attach
from surgery.model.towers import get_towers
from surgery.sae import deactivation, load_sae


@torch.no_grad()
def bake(model: nn.Module, plan: SurgeryPlan) -> nn.Module:
    """Apply ``plan``'s head edits to ``model``'s weights in place; returns the model."""
    towers = get_towers(model)
    for edit in plan.heads:
        view = towers[edit.tower]
        attn = view.attention(edit.layer)
        _check_bakeable(attn, edit.tower)
        weight, bias = attn.out_proj.weight, attn.out_proj.bias  # (C, C), (C,)
        cols = slice(edit.head * view.head_dim, (edit.head + 1) * view.head_dim)
        if edit.ablation == "mean":
            mean = torch.tensor(edit.mean, dtype=torch.float64, device=weight.device)  # (d,)
            shift = (1.0 - edit.scale) * (weight[:, cols].double() @ mean)  # (C,)
            bias.copy_((bias.double() + shift).to(bias.dtype))
        weight[:, cols] *= edit.scale
    if plan.neurons:
        bake_neurons(model, plan)
    return model


def _check_bakeable(attn: nn.Module, tower: str) -> None:
    """Head edits bake exactly only when nothing sits between the heads and out_proj."""
    inner = getattr(attn, "ln_inner", None)
    if inner is not None and not isinstance(inner, nn.Identity):
        raise UnsupportedTowerError(
            f"{tower} attention normalises the concatenated heads before out_proj (open_clip scale_attn_inner); "
            "head edits cannot be baked exactly into out_proj there"
        )


def apply_runtime(model: nn.Module, plan: SurgeryPlan, backend: str = "math") -> nn.Module:
    """The same edits as head masks on swapped attention (weights untouched): the reference for bake."""
    swap_attention(model, backend=backend)
    device = next(model.parameters()).device
    for tower, view in get_towers(model).items():
        scales = plan.head_scales(tower, view.n_layers, view.n_heads).to(device)  # (L, H)
        fills = None
        mean_edits = [e for e in plan.heads if e.tower == tower and e.ablation == "mean"]
        if mean_edits:
            fills = torch.zeros(view.n_layers, view.n_heads, view.head_dim, device=device)  # (L, H, d)
            for e in mean_edits:
                fills[e.layer, e.head] = torch.tensor(e.mean, device=device)
        set_head_edits(model, tower, scales, fills)
    return model


def bake_neurons(model: nn.Module, plan: SurgeryPlan) -> nn.Module:
    """Attach every neuron edit of ``plan`` (loading each SAE from its folder); records each SAE's
    kind and k in the edit so the baked checkpoint can be rebuilt without the SAE files."""

    for i, edit in enumerate(plan.neurons):
        sae = load_sae(edit.sae)
        edit.check_sae(sae.cfg.to_dict(), f"neurons[{i}]")  # trained where the edit acts (tower, site)
        edit.kind, edit.k = sae.cfg.kind, int(sae.cfg.k)
        attach(model, edit.tower, edit.site, deactivation(sae, edit.ids, edit.alpha, edit.form))
    return model
