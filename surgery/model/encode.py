"""Embeddings from an open_clip model in PyTorch, L2-normalised: prompts, captions, image batches.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.model.preprocess import tokenize


def text_embeddings(model: nn.Module, texts: list[str], tokenizer: dict) -> torch.Tensor:
    """Normalised (n, D) text embeddings."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenize(texts, tokenizer).to(device)).float(), dim=-1).cpu()


def caption_embeddings(model: nn.Module, captions: list[str], tokenizer: dict) -> torch.Tensor:
    """Normalised (N, D) embedding of each of N captions, each distinct caption embedded once
    (a world's captions repeat about 100 times)."""
    unique = sorted(set(captions))
    emb = text_embeddings(model, unique, tokenizer)  # (U, D)
    index = {text: i for i, text in enumerate(unique)}
    return emb[torch.tensor([index[t] for t in captions])]


def image_embeddings(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Normalised (N, D) image embeddings, on the CPU, of image batches (B, 3, H, W)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([F.normalize(model.encode_image(imgs.to(device)).float(), dim=-1).cpu() for imgs in batches])
