"""Downstream figures with a representation replaced inside the CLIP (reconstruction or deactivation)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from surgery import metrics
from surgery.sae.activations import Site, replaced


@torch.no_grad()
def encode_images_replaced(model: nn.Module, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     site: Site | None = None, batch_size: int = 256) -> torch.Tensor:
    """Raw (unnormalised) image embeddings (n, E) of images (n, 3, H, W); with ``fn``, the
    representation at ``site`` (vision tower) is replaced by ``fn(h)`` while encoding."""
    def run() -> torch.Tensor:
        return torch.cat([model.encode_image(chunk).float() for chunk in images.split(batch_size)])

    if fn is None:
        return run()
    with replaced(model, site or Site("vision", "residual"), fn):
        return run()


@torch.no_grad()
def encode_texts_replaced(model: nn.Module, tokens: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    site: Site | None = None, batch_size: int = 256) -> torch.Tensor:
    """Raw (unnormalised) text embeddings (n, E) of tokens (n, ctx), optionally with the text site replaced."""
    def run() -> torch.Tensor:
        return torch.cat([model.encode_text(chunk).float() for chunk in tokens.split(batch_size)])

    if fn is None:
        return run()
    with replaced(model, site or Site("text", "residual"), fn):
        return run()


def zero_shot_with_replacement(model: nn.Module, sae_fn: Callable[[torch.Tensor], torch.Tensor], site: Site,
                               images: torch.Tensor, labels: Sequence[int], class_tokens: torch.Tensor) -> dict:
    """Zero-shot accuracy of images (n, 3, H, W) against class prompts (C, ctx), before and with the
    representation at ``site`` replaced by ``sae_fn(h)`` (e.g. the SAE's reconstruction).

    A vision site changes the image side, a text site the class prompts' side."""
    y = torch.as_tensor(labels)
    img = encode_images_replaced(model, images)
    txt = encode_texts_replaced(model, class_tokens)
    before = metrics.zero_shot_accuracy(img, txt, y)
    if site.tower == "vision":
        img = encode_images_replaced(model, images, sae_fn, site)
    else:
        txt = encode_texts_replaced(model, class_tokens, sae_fn, site)
    after = metrics.zero_shot_accuracy(img, txt, y)
    return {"zero_shot_accuracy": before, "zero_shot_accuracy_replaced": after, "change": after - before}
