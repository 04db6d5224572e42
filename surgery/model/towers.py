"""One uniform view over the two transformer towers of an open_clip CLIP.

Both towers are a stack of residual blocks ``x += attn(ln_1(x)); x += mlp(ln_2(x))`` followed by
a final LayerNorm and a projection, pooled at one token: the class token (vision, index 0) or the
end-of-text token (text, the argmax of the token ids). :class:`TowerView` records where each of
those pieces lives so later stages never special-case open_clip's layouts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgery.errors import UnsupportedTowerError

TOWERS = ("vision", "text")


@dataclass
class TowerView:
    name: str  # "vision" | "text"
    blocks: nn.ModuleList  # the residual attention blocks, in order
    n_layers: int
    n_heads: int
    head_dim: int
    width: int  # residual stream width = n_heads * head_dim
    causal: bool  # text: causal attention mask; vision: full attention
    final_norm: nn.Module  # ln_post (vision) / ln_final (text)
    projection: torch.Tensor | nn.Linear | None  # (width, embed_dim) matrix, a Linear, or none
    pooling: str  # "cls" | "avg" | "argmax" | "eos" | "first" | "last"
    norm_after_pool: bool  # final norm applied to the pooled token only (same result for token pooling)
    block_prefix: str  # state-dict prefix of the blocks, e.g. "visual.transformer.resblocks"

    def attention(self, layer: int) -> nn.Module:
        """The attention module of block ``layer``."""
        return self.blocks[layer].attn

    def summary(self) -> dict:
        return {
            "layers": self.n_layers,
            "heads": self.n_heads,
            "head_dim": self.head_dim,
            "width": self.width,
            "causal": self.causal,
            "pooling": self.pooling,
            "final_norm": type(self.final_norm).__name__,
            "projection": None if self.projection is None else list(_proj_shape(self.projection)),
        }


def get_towers(model: nn.Module) -> dict[str, TowerView]:
    """``{"vision": TowerView, "text": TowerView}`` for an open_clip CLIP / CustomTextCLIP."""
    return {"vision": vision_tower(model), "text": text_tower(model)}


def vision_tower(model: nn.Module) -> TowerView:
    visual = getattr(model, "visual", None)
    if visual is None:
        raise UnsupportedTowerError(f"{type(model).__name__} has no .visual tower; pass an open_clip CLIP")
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise UnsupportedTowerError(
            f"vision tower is a {type(visual).__name__}; surgery supports open_clip ViT towers only"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedTowerError("vision tower uses attentional pooling; surgery supports token pooling only")
    blocks = visual.transformer.resblocks
    pool = {"tok": "cls", "avg": "avg"}.get(visual.pool_type)
    if pool is None:
        raise UnsupportedTowerError(f"vision pooling {visual.pool_type!r} is not supported (only 'tok' and 'avg')")
    return _view("vision", blocks, causal=False, final_norm=visual.ln_post, projection=visual.proj,
                 pooling=pool, norm_after_pool=bool(getattr(visual, "final_ln_after_pool", False)),
                 block_prefix="visual.transformer.resblocks")


def text_tower(model: nn.Module) -> TowerView:
    text = getattr(model, "text", None)
    if text is not None:  # CustomTextCLIP
        if not hasattr(text, "token_embedding"):
            raise UnsupportedTowerError(
                f"text tower is a {type(text).__name__}; surgery supports open_clip text transformers only"
            )
        owner, prefix = text, "text."
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedTowerError("text tower appends a class token (CoCa style); not supported")
        pooling = text.pool_type
    else:
        owner, prefix = model, ""
        pooling = getattr(model, "text_pool_type", "argmax")
    if pooling == "none":
        raise UnsupportedTowerError("text pooling 'none' is not supported")
    attn_mask = getattr(owner, "attn_mask", None)
    return _view("text", owner.transformer.resblocks, causal=attn_mask is not None,
                 final_norm=owner.ln_final, projection=owner.text_projection, pooling=pooling,
                 norm_after_pool=False, block_prefix=f"{prefix}transformer.resblocks")


def _view(name, blocks, *, causal, final_norm, projection, pooling, norm_after_pool, block_prefix) -> TowerView:
    attn = blocks[0].attn
    n_heads = int(attn.num_heads)
    width = int(attn.in_proj_weight.shape[1]) if getattr(attn, "in_proj_weight", None) is not None else None
    if width is None:
        raise UnsupportedTowerError(
            f"{name} tower attention {type(attn).__name__} has no packed in_proj_weight; not supported"
        )
    return TowerView(
        name=name,
        blocks=blocks,
        n_layers=len(blocks),
        n_heads=n_heads,
        head_dim=width // n_heads,
        width=width,
        causal=causal,
        final_norm=final_norm,
        projection=projection,
        pooling=pooling,
        norm_after_pool=norm_after_pool,
        block_prefix=block_prefix,
    )


def _proj_shape(proj) -> tuple[int, ...]:
    if isinstance(proj, nn.Linear):
        return (proj.in_features, proj.out_features)
    return tuple(proj.shape)
