"""Embeddings from an open_clip model in PyTorch: L2-normalised text and image embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgery.model.preprocess import tokenize


def text_embeddings(model: nn.Module, texts: list[str], tokenizer: dict) -> torch.Tensor:
    """Normalised (n, D) text embeddings."""

    device = next(model.parameters()).device
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenize(texts, tokenizer).to(device)).float(), dim=-1).cpu()
