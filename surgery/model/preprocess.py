"""Preprocessing beside the model (as open_clip keeps its transforms): image transforms, tokenizers,
and the preprocessing/tokenizer records a checkpoint carries.
"""
from __future__ import annotations

import json

import numpy as np
import open_clip
import torch


def image_transform(preprocess: dict):
    """open_clip's evaluation transform for a preprocessing dict: PIL image -> (3, H, W)."""
    keys = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
    cfg = open_clip.transform.PreprocessCfg(**{k: (tuple(v) if isinstance(v, list) else v)
                                               for k, v in preprocess.items() if k in keys})
    return open_clip.transform.image_transform_v2(cfg, is_train=False)


_TOKENS: dict[tuple, torch.Tensor] = {}
_TOKEN_MEMO_LIMIT = 64


def tokenize(texts: list[str], tokenizer: dict) -> torch.Tensor:
    """Token ids (n, ctx) with the encoder's tokenizer (memoised: compare tokenizes the same
    captions for both models, and BPE with text cleaning costs as much as a tiny model's pass)."""
    name = tokenizer.get("name", "openai-clip-bpe")
    ctx = int(tokenizer["context_length"])
    key = (name, ctx, tuple(texts))
    if key not in _TOKENS:
        if len(_TOKENS) >= _TOKEN_MEMO_LIMIT:
            _TOKENS.clear()
        if name == "openai-clip-bpe":
            _TOKENS[key] = open_clip.tokenize(list(texts), context_length=ctx)
        else:
            _TOKENS[key] = open_clip.tokenizer.HFTokenizer(name, context_length=ctx)(list(texts))
    return _TOKENS[key].clone()


def preprocess_key(preprocess: dict) -> str:
    return json.dumps(preprocess, sort_keys=True, default=str)


def images_to_tensor(images: np.ndarray, preprocess: dict) -> torch.Tensor:
    """uint8 (n, S, S, 3) at the model's input size -> normalised float (n, 3, S, S)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def default_preprocess(cfg: dict) -> dict:
    """open_clip's default preprocessing for a config (OpenAI mean/std, bicubic, shortest side)."""
    pre = {k: v for k, v in vars(open_clip.transform.PreprocessCfg()).items()}
    pre["size"] = cfg["vision_cfg"].get("image_size", pre["size"])
    pre.update(cfg.get("preprocess_cfg", {}))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pre.items()}


def tokenizer_info(cfg: dict) -> dict:
    text = cfg.get("text_cfg", {})
    return {
        "name": text.get("hf_tokenizer_name") or "openai-clip-bpe",
        "context_length": int(text.get("context_length", 77)),
    }
