"""Linear probes: is a label (e.g. a protected group) linearly readable from features?

Two readings of "a probe's accuracy after an edit", both used by the SAE acceptance:

* :func:`fit_linear_probe` on the unedited features, applied to the edited ones (a *fixed* probe):
  what a group classifier built on the shipped model's features sees after the edit.
* :func:`cross_validated_accuracy` on the edited features themselves (a *retrained* probe): whether
  the label is still linearly present at all. An edit that keeps a fraction of the original
  features, ``(1 - a) h + a h_edited`` with ``a < 1``, keeps a retrained probe's accuracy whenever
  the label is linearly separable in ``h``: the probe rescales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from surgery.errors import ProbeError


def _check(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> None:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ProbeError(f"features must be (n, D) and labels (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype != torch.long:
        raise ProbeError(f"labels must be integer class ids (torch.long), got {y.dtype}")
    if x.shape[0] < 2:
        raise ProbeError(f"a probe needs at least 2 rows to fit, got {x.shape[0]}")
    if n_classes < 2 or int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ProbeError(f"labels must lie in 0..{n_classes - 1} with at least 2 classes")
    if not torch.isfinite(x).all():
        raise ProbeError("features contain NaN or infinite values")


@dataclass
class LinearProbe:
    """``argmax(((z - mean) / std) @ weight + bias)``; fitted by :func:`fit_linear_probe`."""
    mean: torch.Tensor  # (D,) training mean
    std: torch.Tensor  # (D,) training std (floored at 1e-6)
    weight: torch.Tensor  # (D, C) on standardised features
    bias: torch.Tensor  # (C,)

    def logits(self, z: torch.Tensor) -> torch.Tensor:  # (m, D) -> (m, C)
        return ((z.detach().double() - self.mean) / self.std) @ self.weight + self.bias

    def __call__(self, z: torch.Tensor) -> torch.Tensor:  # (m, D) -> (m,) labels
        return self.logits(z).argmax(1)


def probe_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """The fitted objective: mean cross-entropy plus ``weight_decay * ||weight||^2``."""
    return F.cross_entropy(logits, y) + weight_decay * weight.pow(2).sum()


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = 300,
                     weight_decay: float = 1e-3) -> LinearProbe:
    """Multinomial logistic regression (L-BFGS, L2 penalty) on standardised x (n, D), labels y (n,)."""
    _check(x, y, n_classes)
    x = x.detach().double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = probe_loss(xs @ w + b, y, w, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mu, sd, w.detach(), b.detach())


def probe_accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows of x (n, D) that ``predict`` labels as y (n,)."""
    return float((predict(x) == y).double().mean())


def cross_validated_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int, folds: int = 2, seed: int = 0,
                             steps: int = 300) -> float:
    """k-fold cross-validated accuracy of a probe refitted on x (n, D) itself (random folds)."""
    _check(x, y, n_classes)
    if folds < 2 or len(y) - -(-len(y) // folds) < 2:
        raise ProbeError(f"folds must be at least 2 and leave at least 2 training rows of the {len(y)}, got {folds}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    correct = 0
    for test in order.chunk(folds):
        train = order[~torch.isin(order, test)]
        predict = fit_linear_probe(x[train], y[train], n_classes, steps)
        correct += int((predict(x[test]) == y[test]).sum())
    return correct / len(y)
