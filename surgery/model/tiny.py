"""Tiny open_clip CLIPs built in-process, for tests, examples and the built-in demo model.

``builtin:tiny`` is a randomly initialised (seeded) CLIP with both towers: vision ViT 2 layers,
width 64, 4 heads of 16, patch 8 on 32x32 images; text transformer 2 layers, width 32, 2 heads,
context 16, the real CLIP BPE vocabulary so the stock tokenizer works.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from surgery.model.arch import build_model, bundled_config

TINY_ARCH = "clipsurgery-tiny"
TINY_CONFIG: dict = bundled_config(TINY_ARCH)  # configs/clipsurgery-tiny.json


def tiny_config(**overrides) -> dict:
    """A copy of :data:`TINY_CONFIG`; ``vision_cfg`` / ``text_cfg`` overrides are merged, not replaced."""
    cfg = copy.deepcopy(TINY_CONFIG)
    for key, value in overrides.items():
        if key in ("vision_cfg", "text_cfg"):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def build_tiny_clip(seed: int = 0, **overrides) -> tuple[nn.Module, dict]:
    """(model, config): a tiny CLIP in eval mode with seeded random weights.

    open_clip initialises small weights (std ~ width**-0.5 / layers), so every parameter is
    re-drawn here at unit-ish scale to make heads matter and differences measurable in tests.
    """
    cfg = tiny_config(**overrides)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if param.ndim >= 2 or name.endswith(("class_embedding", "positional_embedding")):
                fan_in = param.shape[-1] if param.ndim >= 2 else param.numel()
                param.copy_(torch.randn(param.shape, generator=gen) * fan_in ** -0.5)
            elif "ln" in name or "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen) if name.endswith("weight")
                            else 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model, cfg
