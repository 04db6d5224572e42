"""Zero-shot classification from class prompt embeddings: ``image_emb (M, D)``, ``class_emb (C, D)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from surgery.errors import DataError
from surgery.metrics._inputs import _int_vector, _normalise


# ------------------------------------------------------------------------------------- zero-shot
def class_embeddings(text_emb: Any) -> torch.Tensor:
    """Per-class prompt ensemble (C, T, D) -> (C, D): normalise, average over templates, normalise."""
    t = torch.as_tensor(np.asarray(text_emb) if not isinstance(text_emb, torch.Tensor) else text_emb).to(torch.float64)
    if t.dim() != 3:
        raise DataError(f"text_emb must be (classes, templates, width), got shape {tuple(t.shape)}")
    t = t / t.norm(dim=2, keepdim=True).clamp_min(1e-12)
    mean = t.mean(dim=1)  # (C, D)
    return mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-12)


def zero_shot_predict(image_emb: Any, class_emb: Any) -> torch.Tensor:
    """Predicted class (n,) int64: argmax of cosine similarity, ties -> lowest class id."""
    images, classes = _normalise(image_emb, "image_emb"), _normalise(class_emb, "class_emb")  # (n, D), (C, D)
    if images.shape[1] != classes.shape[1]:
        raise DataError(f"image and class embeddings differ in width ({images.shape[1]} vs {classes.shape[1]})")
    return (images @ classes.T).argmax(dim=1)  # (n,)


def zero_shot_accuracy(image_emb: Any, class_emb: Any, labels: Any) -> float:
    """Fraction of images whose cosine-argmax class (see :func:`zero_shot_predict`) equals ``labels (n,)``."""
    pred = zero_shot_predict(image_emb, class_emb)  # (n,)
    y = _int_vector("labels", labels, pred.shape[0])
    n_classes = len(class_emb)
    if (y < 0).any() or (y >= n_classes).any():
        raise DataError(f"labels must lie in [0, {n_classes - 1}] (one id per class embedding)")
    return float((pred == y).to(torch.float64).mean())
