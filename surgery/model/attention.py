"""Head-maskable attention: a drop-in for the attention of open_clip's transformer blocks.

:class:`HeadMaskedAttention` replaces an ``nn.MultiheadAttention`` (open_clip 3.x) or open_clip's
own ``Attention`` (custom blocks, open_clip 4.x) and owns *the same parameter objects under the
same names* (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``, plus
``ln_q``/``ln_k``/``ln_inner``/``head_scale``/``logit_scale`` where the original has them), so
state dicts are unchanged and swapping back restores the original module.

Per head ``h`` of a block with input ``x`` (B, N, C)::

    z_h   = softmax(q_h k_h^T * d**-0.5 + mask) v_h        # (B, N, d), the head's value mix
    out   = out_proj(concat_h(s_h * z_h))                   # (B, N, C)

where ``s`` is the head mask: shape ``(H,)`` (one configuration for the whole batch) or ``(B, H)``
(row ``b`` of the batch under its own configuration). ``s_h = 0`` equals zeroing that head's slice
``h*d:(h+1)*d`` of the out_proj input. Backends compute ``z``: ``math`` (explicit softmax, the
reference), ``sdpa`` (``F.scaled_dot_product_attention``) and ``triton`` (the fused kernel of
``triton_kernels``, which applies ``s`` inside the kernel).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import HeadMaskError, SurgeryError, UnsupportedTowerError
from surgery.model.towers import TOWERS, TowerView, get_towers

log = logging.getLogger(__name__)

BACKENDS = ("auto", "math", "sdpa", "triton")
_OPTIONAL_SUBMODULES = ("ln_q", "ln_k", "ln_inner", "out_drop", "attn_drop")


class HeadMaskedAttention(nn.Module):
    """Self-attention with a per-head output scale; same parameters as the module it replaces."""

    def __init__(self, original: nn.Module, *, causal: bool = False, backend: str = "auto"):
        super().__init__()
        _check_swappable(original)
        self.num_heads = int(original.num_heads)
        self.embed_dim = int(original.in_proj_weight.shape[1])
        self.head_dim = self.embed_dim // self.num_heads
        self.causal = causal  # the tower's mask is causal (text): lets the triton backend skip the mask tensor
        self.batch_first = bool(getattr(original, "batch_first", True))
        self.returns_tuple = isinstance(original, nn.MultiheadAttention)
        self.dropout = float(getattr(original, "dropout", 0.0) or getattr(getattr(original, "attn_drop", None), "p", 0.0))
        self.in_proj_weight = original.in_proj_weight  # (3C, C), shared Parameter
        self.in_proj_bias = original.in_proj_bias  # (3C,) or None, shared
        self.out_proj = original.out_proj  # Linear(C, C), the same module
        for name in _OPTIONAL_SUBMODULES:
            sub = getattr(original, name, None)
            if isinstance(sub, nn.Module):
                setattr(self, name, sub)
        self.head_scale = getattr(original, "head_scale", None)  # open_clip's learnable (H, 1, 1), if any
        self.logit_scale = getattr(original, "logit_scale", None)  # scaled-cosine attention, if any
        self.logit_scale_max = float(getattr(original, "logit_scale_max", math.log(100.0)))
        self.backend = validate_backend(backend)
        self.head_mask: torch.Tensor | None = None  # (H,) or (B, H); None = all ones
        self.head_fill: torch.Tensor | None = None  # (H, d): mean-ablation value, z_h -> s z_h + (1 - s) fill_h
        self.capture = False  # when True, forward keeps the per-head outputs in .captured
        self.captured: torch.Tensor | None = None  # (B, H, N, d), scaled by the mask
        object.__setattr__(self, "original", original)  # not a submodule: stays out of state_dict

    # ----------------------------------------------------------------------------------- masks
    def set_head_mask(self, mask: torch.Tensor | None) -> None:
        """Per-head scale, (H,) or (B, H); ``None`` removes it. May require grad."""
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
                raise HeadMaskError(f"head mask must be a floating-point tensor, got {type(mask).__name__}")
            if mask.ndim not in (1, 2) or mask.shape[-1] != self.num_heads:
                raise HeadMaskError(
                    f"head mask of shape {tuple(mask.shape)} does not fit {self.num_heads} heads; "
                    f"use ({self.num_heads},) or (batch, {self.num_heads})"
                )
        self.head_mask = mask

    def set_head_fill(self, fill: torch.Tensor | None) -> None:
        """Mean-ablation values (H, d): a head scaled by s outputs ``s * z_h + (1 - s) * fill_h``."""
        if fill is not None and tuple(fill.shape) != (self.num_heads, self.head_dim):
            raise HeadMaskError(f"head fill of shape {tuple(fill.shape)} must be ({self.num_heads}, {self.head_dim})")
        self.head_fill = fill

    def _scale(self, batch: int, ref: torch.Tensor) -> torch.Tensor | None:
        """Effective per-head scale (H,) or (B, H): surgery mask times open_clip's head_scale."""
        scale = self.head_mask
        if scale is not None:
            if scale.ndim == 2 and scale.shape[0] != batch:
                raise HeadMaskError(
                    f"head mask has {scale.shape[0]} rows but the batch has {batch}; "
                    "give one row per batch element or a (heads,) mask"
                )
            if scale.device != ref.device:
                raise HeadMaskError(f"head mask is on {scale.device} but activations are on {ref.device}; move it")
            scale = scale.to(ref.dtype)
        if self.head_scale is not None:
            learned = self.head_scale.reshape(self.num_heads).to(ref.dtype)
            scale = learned if scale is None else scale * learned
        return scale

    # --------------------------------------------------------------------------------- forward
    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise SurgeryError("HeadMaskedAttention supports self-attention only (key and value must be the query)")
        x = query if self.batch_first else query.transpose(0, 1)  # (B, N, C)
        z = self.forward_heads(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)  # (B, H, N, d)
        batch, n_tok = x.shape[:2]
        out = z.transpose(1, 2).reshape(batch, n_tok, self.embed_dim)  # (B, N, C)
        if hasattr(self, "ln_inner"):
            out = self.ln_inner(out)
        out = self.out_proj(out)
        if hasattr(self, "out_drop"):
            out = self.out_drop(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, None) if self.returns_tuple else out

    def forward_heads(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head outputs ``s_h * z_h`` before out_proj: x (B, N, C) -> (B, H, N, d)."""
        batch, n_tok, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3C)
        qkv = qkv.view(batch, n_tok, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        sm_scale = None
        if self.logit_scale is not None:  # scaled cosine attention (Swin v2)
            q = F.normalize(q, dim=-1) * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            k = F.normalize(k, dim=-1)
            sm_scale = 1.0
        bias = _additive_mask(attn_mask, key_padding_mask, batch, self.num_heads, n_tok, q.dtype)
        scale = self._scale(batch, q)  # (H,) | (B, H) | None
        backend = resolve_backend(self.backend, q)
        z = None
        if backend == "triton":
            z = self._triton(q, k, v, scale, bias, sm_scale)
        if z is None:
            dropout = self.dropout if self.training else 0.0
            fn = math_attention if backend == "math" else sdpa_attention
            z = fn(q, k, v, bias, sm_scale, dropout)  # (B, H, N, d)
            if scale is not None:
                z = z * (scale.view(-1, self.num_heads, 1, 1))
        if self.head_fill is not None and self.head_mask is not None:
            # the removed fraction is the surgery mask's alone (open_clip's learned head_scale is
            # part of the head's output, and so of the mean that fills in for it)
            keep = self.head_mask.to(z.dtype).view(-1, self.num_heads, 1, 1)
            z = z + (1 - keep) * self.head_fill.to(device=z.device, dtype=z.dtype).view(1, self.num_heads, 1, self.head_dim)
        if self.capture:
            self.captured = z
        return z

    def _triton(self, q, k, v, scale, bias, sm_scale) -> torch.Tensor | None:
        """Fused kernel, or None (with a logged warning) when it cannot run this call exactly."""
        from triton_kernels import TritonAttentionUnsupported, masked_attention

        causal = False
        if bias is not None:
            if not (self.causal and _is_causal(bias)):
                _warn_once("triton backend: arbitrary attention masks are not fused; using sdpa")
                return None
            causal = True
        if self.training and self.dropout > 0:
            _warn_once("triton backend: attention dropout is not fused; using sdpa")
            return None
        if scale is None:
            scale = torch.ones(self.num_heads, device=q.device, dtype=torch.float32)
        try:
            return masked_attention(q, k, v, scale, causal=causal, sm_scale=sm_scale)
        except TritonAttentionUnsupported as exc:
            _warn_once(f"triton backend unavailable for this call ({exc}); using sdpa")
            return None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, causal={self.causal}, backend={self.backend}"


# ------------------------------------------------------------------------------------ backends
def math_attention(q, k, v, bias, sm_scale, dropout):
    """Reference: explicit softmax. q, k, v (B, H, N, d); bias (B|1, H|1, N, N) additive or None."""
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias
    weights = logits.softmax(dim=-1)
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v)  # (B, H, N, d)


def sdpa_attention(q, k, v, bias, sm_scale, dropout):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=sm_scale)


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise SurgeryError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, ref: torch.Tensor) -> str:
    """``auto`` is ``triton`` on CUDA when Triton is importable, else ``sdpa``."""
    if backend != "auto":
        return backend
    if ref.is_cuda and triton_importable():
        return "triton"
    return "sdpa"


def triton_importable() -> bool:
    """The Triton kernels (triton_kernels) import here; they run on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1``."""
    try:
        import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _additive_mask(attn_mask, key_padding_mask, batch, heads, n_tok, dtype):
    """Combine open_clip's masks into one additive (B|1, H|1, N, N) tensor, or None."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
        attn_mask = attn_mask.to(dtype)
        if attn_mask.ndim == 2:
            bias = attn_mask[:n_tok, :n_tok].view(1, 1, n_tok, n_tok)
        else:  # (B*H, N, N) as nn.MultiheadAttention takes it
            bias = attn_mask.view(batch, heads, n_tok, n_tok)
    if key_padding_mask is not None:
        pad = key_padding_mask
        if pad.dtype == torch.bool:
            pad = torch.zeros_like(pad, dtype=dtype).masked_fill_(pad, float("-inf"))
        pad = pad.to(dtype).view(batch, 1, 1, n_tok)
        bias = pad if bias is None else bias + pad
    return bias


def _is_causal(bias: torch.Tensor) -> bool:
    if bias.shape[0] != 1 or bias.shape[1] != 1:
        return False
    n_tok = bias.shape[-1]
    upper = torch.ones(n_tok, n_tok, dtype=torch.bool, device=bias.device).triu_(1)
    plane = bias[0, 0]
    return bool(torch.isneginf(plane[upper]).all()) and bool((plane[~upper] == 0).all())


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _check_swappable(module: nn.Module) -> None:
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise UnsupportedTowerError(
                "nn.MultiheadAttention with separate k/v dims, bias_kv or zero-attention is not supported"
            )
        return
    if getattr(module, "in_proj_weight", None) is None or not hasattr(module, "out_proj"):
        raise UnsupportedTowerError(
            f"attention module {type(module).__name__} has no packed in_proj_weight/out_proj; not supported"
        )


# ------------------------------------------------------------------------- model-level helpers
def swap_attention(model: nn.Module, towers=TOWERS, backend: str = "auto") -> dict[str, list[HeadMaskedAttention]]:
    """Replace every block's attention in ``towers`` by :class:`HeadMaskedAttention` (idempotent)."""
    validate_backend(backend)
    views = get_towers(model)
    swapped: dict[str, list[HeadMaskedAttention]] = {}
    for name in towers:
        view = views[name]
        mods = []
        for block in view.blocks:
            if not isinstance(block.attn, HeadMaskedAttention):
                block.attn = HeadMaskedAttention(block.attn, causal=view.causal, backend=backend)
            else:
                block.attn.backend = backend
            mods.append(block.attn)
        swapped[name] = mods
    return swapped


def restore_attention(model: nn.Module) -> None:
    """Put the original attention modules back (parameters are shared, so edits carry over)."""
    for view in get_towers(model).values():
        for block in view.blocks:
            if isinstance(block.attn, HeadMaskedAttention):
                block.attn = block.attn.original


def masked_modules(model: nn.Module, tower: str) -> list[HeadMaskedAttention]:
    """The swapped attention modules of one tower, by layer; raises if not swapped."""
    view: TowerView = get_towers(model)[tower]
    mods = [block.attn for block in view.blocks]
    if not all(isinstance(m, HeadMaskedAttention) for m in mods):
        raise SurgeryError(f"{tower} tower attention is not swapped; call swap_attention(model) first")
    return mods


def set_head_masks(model: nn.Module, tower: str, masks: torch.Tensor | None) -> None:
    """Set every layer's head mask of a tower: ``masks`` (L, H) or (B, L, H); None clears them."""
    mods = masked_modules(model, tower)
    if masks is None:
        for mod in mods:
            mod.set_head_mask(None)
        return
    if masks.ndim not in (2, 3) or masks.shape[-2] != len(mods):
        raise HeadMaskError(
            f"{tower} masks of shape {tuple(masks.shape)} do not fit {len(mods)} layers; "
            f"use ({len(mods)}, heads) or (batch, {len(mods)}, heads)"
        )
    for layer, mod in enumerate(mods):
        mod.set_head_mask(masks[..., layer, :])


def set_head_edits(model: nn.Module, tower: str, scales: torch.Tensor, fills: torch.Tensor | None = None) -> None:
    """Runtime head edits of a tower, the one path every caller applies them through.

    ``scales (L, H)``: kept fraction of each head (1 = untouched, 0 = removed); ``fills (L, H, d)``:
    what a scaled head's output moves toward (its mean output, for mean ablation) or None (zero
    ablation). Layers whose heads are all 1 run without a mask.
    """
    mods = masked_modules(model, tower)
    if scales.ndim != 2 or tuple(scales.shape) != (len(mods), mods[0].num_heads):
        raise HeadMaskError(f"{tower} head scales of shape {tuple(scales.shape)} must be "
                            f"({len(mods)}, {mods[0].num_heads})")
    for layer, mod in enumerate(mods):
        edited = bool((scales[layer] != 1).any())
        mod.set_head_mask(scales[layer] if edited else None)
        mod.set_head_fill(fills[layer] if (edited and fills is not None) else None)


def clear_head_edits(model: nn.Module, tower: str) -> None:
    """Remove every head mask and fill of a tower."""
    for mod in masked_modules(model, tower):
        mod.set_head_mask(None)
        mod.set_head_fill(None)


def set_backend(model: nn.Module, backend: str) -> None:
    validate_backend(backend)
    for tower in TOWERS:
        for block in get_towers(model)[tower].blocks:
            if isinstance(block.attn, HeadMaskedAttention):
                block.attn.backend = backend


@contextlib.contextmanager
def head_masked(model: nn.Module, towers=TOWERS, backend: str = "auto") -> Iterator[nn.Module]:
    """Swap attention for the duration of a ``with`` block, then restore the originals."""
    already = {t: all(isinstance(b.attn, HeadMaskedAttention) for b in get_towers(model)[t].blocks) for t in towers}
    swap_attention(model, towers=towers, backend=backend)
    try:
        yield model
    finally:
        if not all(already.values()):
            restore_attention(model)
