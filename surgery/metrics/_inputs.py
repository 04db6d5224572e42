"""Input checks shared by the metric modules: any array-like in, torch tensors out, one-line DataErrors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from surgery.errors import DataError


# ------------------------------------------------------------------------------------- validation
def _float_matrix(name: str, x: Any) -> torch.Tensor:
    """2-D float tensor; float32/float64 inputs keep their dtype (no copy), others become float64."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64)
    if t.dim() != 2:
        raise DataError(f"{name} must be a 2-D matrix (queries x gallery), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one query and one item")
    return t


def _int_vector(name: str, x: Any, length: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 1:
        raise DataError(f"{name} must be a 1-D vector, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{name} must hold integer ids, got dtype {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise DataError(f"{name} has {t.shape[0]} entries but the gallery has {length}; give one per item")
    return t.to(torch.int64)


def _check_groups(groups: torch.Tensor, n_groups: int) -> None:
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 2:
        raise DataError(f"n_groups={n_groups!r}: bias needs at least 2 groups; a single group has no skew")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise DataError(
            f"group ids span [{int(groups.min())}, {int(groups.max())}], outside [0, {n_groups - 1}]; "
            "pass ids 0..n_groups-1 or raise n_groups"
        )


def _check_k(k: int, size: int, what: str = "gallery") -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"K={k!r} must be a positive integer")
    if k > size:
        raise DataError(f"K={k} is larger than the {what} of {size} items; use K <= {size}")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise DataError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _normalise(x: Any, name: str) -> torch.Tensor:
    t = _float_matrix(name, x)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
