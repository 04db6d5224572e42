"""The closed form behind the balance edit: the least change of a linear map under linear constraints.

Find ``A`` (D, D) that minimises ``tr(A Sigma A^T)`` (the mean squared change ``|A e|^2`` over
embeddings ``e`` whose second moment is ``Sigma``, plus a ridge) subject to ``n`` constraints

    a_k^T (I + A) b_k = 0        i.e.   a_k^T A b_k = c_k  with  c_k = -a_k^T b_k.

Balance edits use two instances (METHODS.md, "Balancing edits"):

* text side: ``b_k`` = query ``i``'s embedding, ``a_k`` = the difference of two groups' mean image
  embeddings near it. ``(I + A) t_i`` then scores every group's neighbourhood equally.
* image side: ``a_k`` = the query, ``b_k`` = the group difference (the images move instead).

Lagrange: ``2 A Sigma + sum_k lambda_k a_k b_k^T = 0``, so ``A = sum_k beta_k a_k w_k^T`` with
``w_k = Sigma^-1 b_k``, and the constraints become the linear system ``K beta = c`` with
``K_jk = (a_j . a_k) (b_j^T Sigma^-1 b_k)`` (a Hadamard product of two Gram matrices: symmetric,
positive semi-definite). Duplicate or empty constraints make ``K`` singular; a ridge relative to
its mean diagonal (``system_ridge``) keeps the solve finite, and the residual is reported so a
caller can tell an exact fit from a regularised one. All arithmetic is float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.errors import SurgeryError

#: Singular values of the fitted map below this fraction of the largest are dropped from the factors.
RANK_TOLERANCE = 1e-9


@dataclass
class LeastChange:
    u: torch.Tensor  # (D, r) float64: A = u @ v.T
    v: torch.Tensor  # (D, r) float64
    residual: float  # max_k |a_k^T A b_k - c_k| / (|a_k| |b_k|) after the fit (0: every constraint holds)
    constraints: int  # n: constraints fitted (trivial ones, a_k = 0 or b_k = 0, included)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def matrix(self) -> torch.Tensor:
        """A (D, D)."""
        return self.u @ self.v.T


def second_moment(embeddings: torch.Tensor, weights: torch.Tensor | None = None, ridge: float = 1e-2) -> torch.Tensor:
    """Sigma (D, D) = weighted mean of e e^T over ``embeddings`` (P, D), plus ``ridge`` x its mean
    eigenvalue on the diagonal (so that directions no embedding uses cost something too and
    Sigma is invertible). ``weights`` (P,) >= 0, default 1."""
    e = embeddings.double()
    if e.ndim != 2 or e.shape[0] == 0:
        raise SurgeryError("the balance edit needs at least one text or image embedding to weigh its change by")
    w = torch.ones(e.shape[0], dtype=torch.float64) if weights is None else weights.double()
    if w.shape != (e.shape[0],) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise SurgeryError("embedding weights must be one non-negative number per embedding, not all zero")
    sigma = (e.T * w) @ e / w.sum()
    scale = float(sigma.trace()) / e.shape[1]
    if not scale > 0:
        raise SurgeryError("the embeddings the balance edit is weighed by are all zero")
    return sigma + ridge * scale * torch.eye(e.shape[1], dtype=torch.float64)


def least_change(a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor | None = None,
                 system_ridge: float = 1e-10) -> LeastChange:
    """The least change ``A = u v^T`` with ``a_k^T A b_k = c_k`` for every row k.

    ``a``, ``b``: (n, D) constraint vectors; ``sigma``: (D, D) symmetric positive definite;
    ``c``: (n,) targets, default ``-a_k . b_k`` (the constraint ``a_k^T (I + A) b_k = 0``).
    """
    a, b, sigma = a.double(), b.double(), sigma.double()
    if a.ndim != 2 or a.shape != b.shape or sigma.shape != (a.shape[1], a.shape[1]):
        raise SurgeryError(f"constraint shapes do not fit: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                           f"sigma {tuple(sigma.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(sigma).all()):
        raise SurgeryError("the balance constraints contain NaN or infinite values (an image or text embedding "
                           "is not finite)")
    n, dim = a.shape
    c = -(a * b).sum(1) if c is None else c.double()
    if n == 0:
        raise SurgeryError("the balance edit has no constraints: give at least one query and two groups")
    w = torch.linalg.solve(sigma, b.T).T  # (n, D): Sigma^-1 b_k
    system = (a @ a.T) * (b @ w.T)  # (n, n), symmetric PSD
    diag = system.diagonal()
    scale = float(diag.mean())
    if not scale > 0:  # every constraint trivial (a_k or b_k zero): nothing to change
        zero = torch.zeros(dim, 0, dtype=torch.float64)
        return LeastChange(zero, zero.clone(), 0.0, n)
    system = system + system_ridge * scale * torch.eye(n, dtype=torch.float64)
    beta = torch.linalg.solve(system, c)  # (n,)
    full = (a * beta[:, None]).T @ w  # (D, D): sum_k beta_k a_k w_k^T
    u, v = _factors(full)
    change = ((a @ u) * (b @ v)).sum(1)  # a_k^T A b_k
    norms = a.norm(dim=1) * b.norm(dim=1)
    live = norms > 0
    residual = float(((change - c)[live].abs() / norms[live]).max()) if bool(live.any()) else 0.0
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise SurgeryError("the balance fit is singular (no finite least change); raise the ridge or give more "
                           "images per group")
    return LeastChange(u, v, residual, n)


def _factors(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with ``u @ v.T == full`` and as few columns as its numerical rank."""
    left, values, right_t = torch.linalg.svd(full)
    if values.numel() == 0 or float(values[0]) == 0.0:
        zero = torch.zeros(full.shape[0], 0, dtype=full.dtype)
        return zero, zero.clone()
    rank = int((values > RANK_TOLERANCE * values[0]).sum())
    return left[:, :rank] * values[:rank], right_t[:rank].T
