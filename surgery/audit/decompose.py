"""Residual-stream decomposition of a tower's embedding into per-(layer, head) direct contributions.

For a tower with blocks ``x_{l+1} = x_l + A_l(x_l) + M_l(x_l + A_l(x_l))`` the pooled residual is

    r = x_0[p] + sum_l (sum_h W_O^{l,h} z^{l,h}[p] + b_O^l) + sum_l M_l[p]

(``p`` the pooled token: class token, or end-of-text; layer-scale factors included). The final
LayerNorm is made linear by taking its mean-centring per part and its scale ``sigma`` from the full
residual (the TextSpan convention): ``ln(r) = sum_j gamma * (x_j - mean(x_j)) / sigma + beta``,
so with the projection ``P`` every part's contribution ``c_j = (gamma * (x_j - mean(x_j)) / sigma) P``
and the constant ``beta P (+ projection bias)`` add up exactly to the embedding. The identity is
checked by :meth:`Decomposition.total` in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import UnsupportedTowerError
from surgery.model.attention import HeadMaskedAttention, head_masked, math_attention, resolve_backend, sdpa_attention
from surgery.model.towers import TowerView, get_towers


@dataclass
class Decomposition:
    heads: torch.Tensor  # (B, L, H, D) direct contribution of each head to the embedding
    attn_bias: torch.Tensor  # (B, L, D) out_proj bias of each attention layer
    mlps: torch.Tensor  # (B, L, D) each MLP
    embed: torch.Tensor  # (B, D) the residual stream before the first block
    constant: torch.Tensor  # (D,) final-norm bias (and projection bias) through the projection
    embedding: torch.Tensor  # (B, D) the model's own (unnormalised) embedding
    head_sums: torch.Tensor | None = None  # (L, H, d) each head's output z summed over batch and tokens

    def total(self) -> torch.Tensor:
        """(B, D): the sum of all parts; equals ``embedding`` up to float rounding."""
        return (self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlps.sum(1) + self.embed
                + self.constant)


def tower_inputs(model: nn.Module, tower: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(residual before block 0 (B, N, C), attention mask or None, pooled index (B,))."""
    view = get_towers(model)[tower]
    if tower == "vision":
        visual = model.visual
        if view.pooling != "cls":
            raise UnsupportedTowerError(f"decomposition needs class-token pooling; this vision tower pools by {view.pooling!r}")
        x = visual._embeds(inputs)  # (B, N, C), ln_pre applied
        return x, None, torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
    owner = model.text if hasattr(model, "text") else model
    if hasattr(model, "text"):
        x, mask = owner._embeds(inputs)
    else:
        cast = owner.transformer.get_cast_dtype()
        x = owner.token_embedding(inputs).to(cast) + owner.positional_embedding.to(cast)
        mask = owner.attn_mask
    pool = {"argmax": lambda: inputs.argmax(dim=-1),
            "first": lambda: torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device),
            "last": lambda: torch.full((inputs.shape[0],), inputs.shape[1] - 1, device=inputs.device)}
    if hasattr(owner, "pool_type") and owner.pool_type == "eos":
        index = (inputs == owner.eos_id).int().argmax(dim=-1)
    elif view.pooling in pool:
        index = pool[view.pooling]()
    else:
        raise UnsupportedTowerError(f"decomposition does not support text pooling {view.pooling!r}")
    return x, mask, index


def final_linear_parts(view: TowerView, residual: torch.Tensor):
    """(sigma (B, 1), gamma (C,), projection (C, D), constant (D,)) of the linearised final norm."""
    norm = view.final_norm
    if not isinstance(norm, nn.LayerNorm):
        raise UnsupportedTowerError(f"decomposition needs a LayerNorm before the projection, found {type(norm).__name__}")
    sigma = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)  # (B, 1)
    gamma = norm.weight if norm.weight is not None else torch.ones(residual.shape[-1], device=residual.device)
    beta = norm.bias if norm.bias is not None else torch.zeros_like(gamma)
    proj = view.projection
    if proj is None:
        matrix, proj_bias = torch.eye(residual.shape[-1], device=residual.device), None
    elif isinstance(proj, nn.Linear):
        matrix, proj_bias = proj.weight.T, proj.bias
    else:
        matrix, proj_bias = proj, None
    constant = beta @ matrix
    if proj_bias is not None:
        constant = constant + proj_bias
    return sigma, gamma, matrix, constant


def project(parts: torch.Tensor, sigma: torch.Tensor, gamma: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Parts (B, ..., C) -> contributions (B, ..., D) through the linearised norm and projection."""
    centred = parts - parts.mean(dim=-1, keepdim=True)
    shape = (sigma.shape[0],) + (1,) * (parts.dim() - 2) + (1,)
    return (gamma * centred / sigma.view(shape)) @ matrix


@torch.no_grad()
def decompose(model: nn.Module, tower: str, inputs: torch.Tensor) -> Decomposition:
    """Per-head, per-MLP and embedding contributions to ``tower``'s embedding of ``inputs``.

    ``inputs``: images (B, 3, H, W) for ``vision``, token ids (B, ctx) for ``text``.
    """
    view = get_towers(model)[tower]
    with head_masked(model, towers=(tower,), backend="sdpa"):
        x, mask, index = tower_inputs(model, tower, inputs)
        rows = torch.arange(x.shape[0], device=x.device)
        embed = x[rows, index]  # (B, C)
        heads, biases, mlps, sums = [], [], [], []
        for block in view.blocks:
            if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
                raise UnsupportedTowerError("decomposition needs linear blocks; this tower normalises the attention "
                                            "output before the residual (open_clip scale_attn)")
            attn: HeadMaskedAttention = block.attn
            attn.capture = True
            try:
                out = attn(block.ln_1(x), attn_mask=mask)
                out = out[0] if isinstance(out, tuple) else out
                z = attn.captured[rows, :, index]  # (B, H, d)
                sums.append(attn.captured.sum((0, 2)))  # (H, d)
            finally:
                attn.capture, attn.captured = False, None
            w_o = attn.out_proj.weight.view(view.width, view.n_heads, view.head_dim)  # (C, H, d)
            per_head = torch.einsum("bhd,chd->bhc", z, w_o)  # (B, H, C)
            bias = attn.out_proj.bias.expand(x.shape[0], -1) if attn.out_proj.bias is not None \
                else torch.zeros_like(embed)
            per_head, bias = _layer_scale(block.ls_1, per_head), _layer_scale(block.ls_1, bias)
            x = x + block.ls_1(out)
            mlp = block.ls_2(block.mlp(block.ln_2(x)))  # (B, N, C)
            x = x + mlp
            heads.append(per_head)
            biases.append(bias)
            mlps.append(mlp[rows, index])
        residual = x[rows, index]  # (B, C)
        sigma, gamma, matrix, constant = final_linear_parts(view, residual)
        embedding = view.final_norm(residual) @ matrix + (constant - view.final_norm.bias @ matrix
                                                         if view.final_norm.bias is not None else constant)
        return Decomposition(
            heads=project(torch.stack(heads, 1), sigma, gamma, matrix),  # (B, L, H, D)
            attn_bias=project(torch.stack(biases, 1), sigma, gamma, matrix),  # (B, L, D)
            mlps=project(torch.stack(mlps, 1), sigma, gamma, matrix),  # (B, L, D)
            embed=project(embed, sigma, gamma, matrix),  # (B, D)
            constant=constant,
            embedding=embedding,
            head_sums=torch.stack(sums),  # (L, H, d)
        )


def _layer_scale(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a LayerScale (elementwise gamma) or Identity to a part of shape (..., C)."""
    return module(x)


def _pooled_attention(attn: HeadMaskedAttention, xn: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
    """Per-head outputs (B, H, 1, d) of the pooled query row only (keys and values from every token),
    with the head mask and mean fill applied exactly as :meth:`HeadMaskedAttention.forward_heads`
    does; None where that module has features this shortcut does not replicate (query/key norms,
    scaled-cosine attention), so the caller runs the full module. xn (B, N, C): the normalised
    block input."""

    if hasattr(attn, "ln_q") or attn.logit_scale is not None:
        return None
    batch, n_tok, width = xn.shape
    heads, dim = attn.num_heads, attn.head_dim
    w, b = attn.in_proj_weight, attn.in_proj_bias
    rows = torch.arange(batch, device=xn.device)
    q = F.linear(xn[rows, index].unsqueeze(1), w[:width], None if b is None else b[:width])  # (B, 1, C)
    kv = F.linear(xn, w[width:], None if b is None else b[width:])  # (B, N, 2C)
    q = q.view(batch, 1, heads, dim).transpose(1, 2)  # (B, H, 1, d)
    k, v = kv.view(batch, n_tok, 2, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
    fn = math_attention if resolve_backend(attn.backend, q) == "math" else sdpa_attention
    z = fn(q, k, v, None, None, 0.0)  # (B, H, 1, d)
    scale = attn._scale(batch, q)  # (H,) | (B, H) | None
    if scale is not None:
        z = z * scale.view(-1, heads, 1, 1)
    if attn.head_fill is not None and attn.head_mask is not None:
        keep = attn.head_mask.to(z.dtype).view(-1, heads, 1, 1)
        z = z + (1 - keep) * attn.head_fill.to(device=z.device, dtype=z.dtype).view(1, heads, 1, dim)
    return z


def pooled_forward(view: TowerView, x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor,
                   capture: bool = False, head_sums: bool = False):
    """Run a swapped tower's blocks on x (B, N, C) and return what the pooled token needs.

    Returns ``(residual (B, C), pooled (B, L, H, d) or None, sums (L, H, d) or None)``: the pooled
    token's residual before the final norm; with ``capture``, every head's output at the pooled token
    (mask and fill applied); with ``head_sums``, every head's output summed over batch and tokens.
    The last block is run for the pooled token only (its other rows cannot reach the embedding):
    its queries, out_proj and MLP see one row, its keys and values every token, unless it needs all
    its rows for ``head_sums`` or has an attention mask (text), where only out_proj and the MLP are
    cut. Equal to the full forward up to float rounding; gradients flow through it as usual.
    """
    rows = torch.arange(x.shape[0], device=x.device)
    pooled, sums = [], []
    last = len(view.blocks) - 1
    for layer, block in enumerate(view.blocks):
        attn: HeadMaskedAttention = block.attn
        if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
            raise UnsupportedTowerError("this tower normalises the attention output before the residual "
                                        "(open_clip scale_attn); not supported")
        if layer < last:
            if capture or head_sums:
                attn.capture = True
                try:
                    x = block(x, attn_mask=mask)
                    z = attn.captured  # (B, H, N, d)
                finally:
                    attn.capture, attn.captured = False, None
                if capture:
                    pooled.append(z[rows, :, index])  # (B, H, d)
                if head_sums:
                    sums.append(z.detach().sum((0, 2)))  # (H, d)
            else:
                x = block(x, attn_mask=mask)
            continue
        xn = block.ln_1(x)
        z = None
        if not head_sums and mask is None:
            z = _pooled_attention(attn, xn, index)  # (B, H, 1, d)
        if z is None:
            z_all = attn.forward_heads(xn, attn_mask=_as_additive(mask, x))  # (B, H, N, d)
            if head_sums:
                sums.append(z_all.detach().sum((0, 2)))
            z = z_all[rows, :, index].unsqueeze(2)  # (B, H, 1, d)
        if capture:
            pooled.append(z[:, :, 0])
        out = z.transpose(1, 2).reshape(x.shape[0], 1, view.width)  # (B, 1, C)
        if hasattr(attn, "ln_inner"):
            out = attn.ln_inner(out)
        out = attn.out_proj(out)
        h = x[rows, index].unsqueeze(1) + block.ls_1(out)  # (B, 1, C)
        h = h + block.ls_2(block.mlp(block.ln_2(h)))
        x = h
    residual = x[:, 0]  # (B, C)
    return (residual, torch.stack(pooled, 1) if capture else None, torch.stack(sums) if head_sums else None)


def _as_additive(mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """open_clip's block mask as its block hands it to the attention module (float masks in the
    activations' dtype; boolean ones as they are)."""
    return mask.to(ref.dtype) if mask is not None and mask.dtype != torch.bool else mask


def head_contributions(view: TowerView, pooled: torch.Tensor) -> torch.Tensor:
    """Pooled head outputs (B, L, H, d) -> their residual-stream parts (B, L, H, C): each head's
    slice of its layer's out_proj, then the block's layer scale."""
    parts = []
    for layer, block in enumerate(view.blocks):
        w_o = block.attn.out_proj.weight.view(view.width, view.n_heads, view.head_dim)  # (C, H, d)
        parts.append(_layer_scale(block.ls_1, torch.einsum("bhd,chd->bhc", pooled[:, layer], w_o)))
    return torch.stack(parts, 1)


def pooled_embedding(view: TowerView, residual: torch.Tensor) -> torch.Tensor:
    """(B, D) unnormalised embedding from the pooled residual (B, C): final norm, projection."""
    _, _, matrix, constant = final_linear_parts(view, residual)
    norm = view.final_norm
    bias_part = norm.bias @ matrix if norm.bias is not None else 0
    return norm(residual) @ matrix + constant - bias_part
