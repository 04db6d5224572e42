"""Bake a SurgeryPlan into a CLIP's weights, exactly (no new op at run time).

For head ``h`` of a block, with ``sl = h*d:(h+1)*d`` the head's columns of ``out_proj.weight``
(W_O, shape (C, C)) and ``s`` the edit's scale:

* zero ablation:  ``W_O[:, sl] *= s``
* mean ablation:  ``out_proj.bias += (1 - s) * W_O[:, sl] @ mean_h`` (with the original W_O), then
  ``W_O[:, sl] *= s``

An open balance (per-text correction from a bank of images, :mod:`surgery.model.open_balance`) is
no weight change: its module is attached to the text tower's output, after the projection.

A balance edit ``e -> e + U (V^T e)`` of a tower's output embedding folds into its projection:

* a matrix ``P`` (width, D) with ``e = x @ P``:  ``P += (P @ V) @ U^T``
* a Linear (``e = W x + b``, W (D, width)):       ``W += U @ (V^T W)``, ``b += U @ (V^T b)``

The baked model equals the runtime-masked model (:func:`apply_runtime`) to float rounding.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from surgery.edit.plan import BalanceEdit, OpenBalanceEdit, SurgeryPlan
from surgery.errors import PlanError, UnsupportedTowerError
from surgery.model.attention import set_head_edits, swap_attention
from surgery.model.neurons import attach
from surgery.model.open_balance import OpenBalance, attach_open_balance
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
    for edit in plan.balance:
        bake_balance(model, edit)
    for edit in plan.open_balance:
        attach_open_balance(model, open_balance_module(edit, next(model.parameters()).device))
    if plan.neurons:
        bake_neurons(model, plan)
    return model


def open_balance_module(edit: OpenBalanceEdit, device: torch.device | str = "cpu") -> OpenBalance:
    """The text tower's open-balance module of a plan entry (float32 buffers from the plan's numbers)."""
    return OpenBalance(torch.tensor(edit.bank, dtype=torch.float32, device=device),
                       torch.tensor(edit.contrast, dtype=torch.float32, device=device),
                       **edit.module_values()).eval()


def bake_copy(model: nn.Module, plan: SurgeryPlan) -> nn.Module:
    """A baked copy of ``model`` that shares every tensor the plan leaves alone with it (only the
    tensors an edit writes are copied), so a ViT-B plan of one projection costs one matrix, not a
    second model. ``model`` is not changed; the copy's modules are its own (neuron modules attach
    to the copy only)."""
    touched = {id(t) for t in touched_tensors(model, plan)}
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in touched}
    return bake(copy.deepcopy(model, memo), plan)


def touched_tensors(model: nn.Module, plan: SurgeryPlan) -> list[torch.Tensor]:
    """The parameters :func:`bake` writes in place for ``plan``: edited heads' out_proj weight and
    bias, balanced towers' projection."""
    towers = get_towers(model)
    out: list[torch.Tensor] = []
    for edit in plan.heads:
        proj = towers[edit.tower].attention(edit.layer).out_proj
        out += [proj.weight, proj.bias]
    for edit in plan.balance:
        proj = towers[edit.tower].projection
        out += [proj.weight, proj.bias] if isinstance(proj, nn.Linear) else [proj]
    return [t for t in out if t is not None]


def _factors(edit: BalanceEdit) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) of a balance edit as float64 (D, r) tensors."""
    return torch.tensor(edit.u, dtype=torch.float64), torch.tensor(edit.v, dtype=torch.float64)


@torch.no_grad()
def bake_balance(model: nn.Module, edit: BalanceEdit) -> nn.Module:
    """Fold ``e -> e + U (V^T e)`` into the tower's output projection, in place."""
    fold_balance(get_towers(model)[edit.tower].projection, edit)
    return model


@torch.no_grad()
def fold_balance(proj: torch.Tensor | nn.Linear | None, edit: BalanceEdit) -> None:
    """Fold the edit into a projection, in place (float64 arithmetic): a matrix ``P`` (width, D)
    with ``e = x @ P``, or a Linear with ``e = W x + b``."""
    u, v = _factors(edit)
    if isinstance(proj, nn.Linear):
        weight = proj.weight  # (D, width)
        _check_width(edit, weight.shape[0])
        u, v = u.to(weight.device), v.to(weight.device)
        weight.copy_((weight.double() + u @ (v.T @ weight.double())).to(weight.dtype))
        if proj.bias is not None:
            bias = proj.bias.double()
            proj.bias.copy_((bias + u @ (v.T @ bias)).to(proj.bias.dtype))
    elif isinstance(proj, torch.Tensor):  # (width, D)
        _check_width(edit, proj.shape[1])
        p64 = proj.double()
        proj.copy_((p64 + (p64 @ v.to(p64.device)) @ u.T.to(p64.device)).to(proj.dtype))
    else:
        raise UnsupportedTowerError(f"the {edit.tower} tower has no output projection to fold a balance edit into")


def _check_width(edit: BalanceEdit, width: int) -> None:
    if edit.dim != width:
        raise PlanError(f"the balance edit is {edit.dim}-dimensional but the {edit.tower} embedding has {width}")


def balance_map(edit: BalanceEdit):
    """The edit as a function on embeddings ``(..., D) -> (..., D)`` (the runtime reference)."""
    u, v = _factors(edit)

    def apply(e: torch.Tensor) -> torch.Tensor:
        return (e.double() + (e.double() @ v.to(e.device)) @ u.T.to(e.device)).to(e.dtype)
    return apply


def _check_bakeable(attn: nn.Module, tower: str) -> None:
    """Head edits bake exactly only when nothing sits between the heads and out_proj."""
    inner = getattr(attn, "ln_inner", None)
    if inner is not None and not isinstance(inner, nn.Identity):
        raise UnsupportedTowerError(
            f"{tower} attention normalises the concatenated heads before out_proj (open_clip scale_attn_inner); "
            "head edits cannot be baked exactly into out_proj there"
        )


def apply_runtime(model: nn.Module, plan: SurgeryPlan, backend: str = "math") -> nn.Module:
    """The same edits as head masks on swapped attention and balance maps applied to the towers'
    outputs (weights untouched): the reference for bake. Neuron edits are not applied here."""
    if any(n.site == "embedding" and n.tower == b.tower for n in plan.neurons for b in plan.balance):
        raise PlanError("apply_runtime applies balance edits on the tower's output, after any neuron module at the "
                        "embedding site; bake the plan instead")
    for edit in plan.balance:
        _wrap_output(model, edit.tower, balance_map(edit))
    for edit in plan.open_balance:  # after the fixed map, as bake orders them
        _wrap_output(model, "text", open_balance_module(edit, next(model.parameters()).device))
    swap_attention(model, backend=backend)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for tower, view in get_towers(model).items():
        scales = plan.head_scales(tower, view.n_layers, view.n_heads, dtype).to(device)  # (L, H), the model's dtype
        fills = None
        mean_edits = [e for e in plan.heads if e.tower == tower and e.ablation == "mean"]
        if mean_edits:
            fills = torch.zeros(view.n_layers, view.n_heads, view.head_dim, device=device, dtype=dtype)  # (L, H, d)
            for e in mean_edits:
                fills[e.layer, e.head] = torch.tensor(e.mean, device=device, dtype=dtype)
        set_head_edits(model, tower, scales, fills)
    return model


def _wrap_output(model: nn.Module, tower: str, fn) -> None:
    """Apply ``fn`` to the output embedding of ``tower`` (a forward hook on the vision tower; CLIP's
    text embedding is a method of the model itself, so its encode_text is wrapped)."""
    if tower == "vision":
        model.visual.register_forward_hook(lambda _m, _a, out: fn(out))
        return
    encode_text = model.encode_text

    def wrapped(text, normalize: bool = False):
        out = fn(encode_text(text, normalize=False))
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out
    model.encode_text = wrapped


def bake_neurons(model: nn.Module, plan: SurgeryPlan) -> nn.Module:
    """Attach every neuron edit of ``plan`` (loading each SAE from its folder); records each SAE's
    kind and k in the edit so the baked checkpoint can be rebuilt without the SAE files."""

    for i, edit in enumerate(plan.neurons):
        sae = load_sae(edit.sae)
        edit.check_sae(sae.cfg.to_dict(), f"neurons[{i}]")  # trained where the edit acts (tower, site)
        edit.kind, edit.k = sae.cfg.kind, int(sae.cfg.k)
        attach(model, edit.tower, edit.site, deactivation(sae, edit.ids, edit.alpha, edit.form))
    return model
