"""Bias and retrieval metrics: pure functions on score matrices and labels.

Shapes: ``Q`` queries, ``M`` gallery items (images), ``G`` groups, ``K`` top-K length, ``D`` embedding
width. Scores are "higher = more relevant" (cosine similarities). Inputs may be torch tensors, numpy
arrays or lists; outputs are torch float64 tensors (per query) or Python floats (reduced).

Conventions shared by the ranking metrics (recorded by :class:`BiasConventions`):

* Top-K: the K highest scores per query, ties broken by the lower gallery index (stable sort), so
  results are deterministic.
* Logarithms are natural (``ln``) for Skew and KL; NDKL's rank discount is ``1 / log2(i + 1)``.
* Desired distribution ("target"): ``"uniform"`` (1/G each, Geyik et al.'s equality of
  opportunity; DeBiasLens), ``"dataset"`` (the gallery's own group proportions, demographic parity;
  seed 002's code), or an explicit (G,) probability vector.
* Reduction over queries: ``"none"`` (per query), ``"mean"`` (most papers), ``"sum"`` (seed 002's
  code sums over its 104 occupation prompts).
* Recall@K is hit@K: a query counts when ANY of its positives is in its top K (clip_benchmark's
  "recall@k").
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from surgery.errors import DataError
from surgery.metrics._inputs import _check_choice, _check_groups, _check_k, _float_matrix, _int_vector

TARGETS = ("uniform", "dataset")
REDUCTIONS = ("none", "mean", "sum")
DEFAULT_ZERO_COUNT = 1.0  # DeBiasLens: an empty group's top-K proportion becomes 1/K

Target = str | Sequence[float] | np.ndarray | torch.Tensor


def reduce_queries(values: torch.Tensor, reduce: str) -> torch.Tensor | float:
    """``values (Q,)`` as is (``"none"``), or their mean or sum over queries as a float."""
    _check_choice("reduce", reduce, REDUCTIONS)
    if reduce == "none":
        return values
    return float(values.mean() if reduce == "mean" else values.sum())


# ------------------------------------------------------------------------------------------ top-K
def top_k_indices(scores: Any, k: int) -> torch.Tensor:
    """Gallery indices (Q, K) of each query's K best scores; ties -> lower index first."""
    s = _float_matrix("scores", scores)  # (Q, M)
    _check_k(k, s.shape[1])
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]


def group_counts_at_k(scores: Any, groups: Any, k: int, n_groups: int) -> torch.Tensor:
    """How many of each query's top-K items fall in each group: (Q, G) float64."""
    s = _float_matrix("scores", scores)  # (Q, M)
    g = _int_vector("groups", groups, s.shape[1])  # (M,)
    _check_groups(g, n_groups)
    top = g[top_k_indices(s, k)]  # (Q, K) group of each ranked item
    return torch.nn.functional.one_hot(top, n_groups).sum(dim=1).to(torch.float64)


def desired_distribution(groups: Any, n_groups: int, target: Target = "uniform") -> torch.Tensor:
    """The desired group distribution (G,) float64.

    ``"uniform"``: 1/G. ``"dataset"``: each group's share of the gallery ``groups``; a group with no
    gallery item is an error (its desired share would be 0). A vector: used as given after checking
    it has G positive entries summing to 1.
    """
    g = _int_vector("groups", groups)
    _check_groups(g, n_groups)
    if isinstance(target, str):
        _check_choice("target", target, TARGETS)
        if target == "uniform":
            return torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64)
        counts = torch.bincount(g, minlength=n_groups).to(torch.float64)
        if (counts == 0).any():
            absent = [i for i in range(n_groups) if counts[i] == 0]
            raise DataError(
                f"groups {absent} have no gallery items, so target='dataset' gives them share 0; "
                "use target='uniform' or drop those groups"
            )
        return counts / counts.sum()
    p = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).to(torch.float64)
    if p.shape != (n_groups,) or (p <= 0).any() or abs(float(p.sum()) - 1.0) > 1e-6:
        raise DataError(f"target vector must have {n_groups} positive entries summing to 1, got {p.tolist()}")
    return p


# ------------------------------------------------------------------------------------------- skew
def skew_at_k(
    scores: Any,
    groups: Any,
    k: int,
    n_groups: int,
    target: Target = "uniform",
    zero_count: float = DEFAULT_ZERO_COUNT,
) -> torch.Tensor:
    """Skew@K per query and group, (Q, G) float64 (Geyik et al., 2019).

    ``Skew_a@K = ln(p_top(a) / p_desired(a))`` with ``p_top(a) = count_a / K`` over the query's top K
    (ties: lower gallery index first) and ``p_desired`` from :func:`desired_distribution`.
    Smoothing: a group with count 0 gets ``p_top = zero_count / K`` instead of 0 (which would give
    ``-inf``). Default ``zero_count = 1`` is DeBiasLens' ``1 / top_n``; the smoothed proportions
    then no longer sum to 1. ``zero_count`` must be in (0, 1].
    Arguments: ``scores (Q, M)``, ``groups (M,)`` ids in ``[0, n_groups)``, ``1 <= k <= M``.
    """
    if isinstance(zero_count, bool) or not isinstance(zero_count, (int, float)) or not 0 < zero_count <= 1:
        raise DataError(f"zero_count={zero_count!r} must be in (0, 1] (1 = DeBiasLens' 1/K smoothing)")
    counts = group_counts_at_k(scores, groups, k, n_groups)  # (Q, G)
    desired = desired_distribution(groups, n_groups, target)  # (G,)
    p_top = torch.where(counts == 0, torch.full_like(counts, float(zero_count)), counts) / k
    return torch.log(p_top / desired)  # (Q, G)


def max_skew_at_k(
    scores: Any,
    groups: Any,
    k: int,
    n_groups: int,
    target: Target = "uniform",
    zero_count: float = DEFAULT_ZERO_COUNT,
    reduce: str = "none",
) -> torch.Tensor | float:
    """MaxSkew@K = max over groups of :func:`skew_at_k`: (Q,), or a float if ``reduce`` is mean/sum.

    The most over-represented group's log-ratio; 0 means no group above its desired share (for a
    uniform target and 2 groups the maximum is ln 2 ~= 0.693).
    """
    _check_choice("reduce", reduce, REDUCTIONS)
    skew = skew_at_k(scores, groups, k, n_groups, target, zero_count)  # (Q, G)
    return reduce_queries(skew.max(dim=1).values, reduce)


def min_skew_at_k(
    scores: Any,
    groups: Any,
    k: int,
    n_groups: int,
    target: Target = "uniform",
    zero_count: float = DEFAULT_ZERO_COUNT,
    reduce: str = "none",
) -> torch.Tensor | float:
    """MinSkew@K = min over groups of :func:`skew_at_k` (the most under-represented group): (Q,) or float.

    With the default smoothing an absent group gives ``ln((zero_count / K) / p_desired)``.
    """
    _check_choice("reduce", reduce, REDUCTIONS)
    skew = skew_at_k(scores, groups, k, n_groups, target, zero_count)  # (Q, G)
    return reduce_queries(skew.min(dim=1).values, reduce)


# ------------------------------------------------------------------------------------------- NDKL
def ndkl(
    scores: Any, groups: Any, k: int, n_groups: int, target: Target = "uniform", reduce: str = "none"
) -> torch.Tensor | float:
    """Normalised discounted KL divergence (Geyik et al., 2019): (Q,), or a float if reduced.

    ``NDKL = (1/Z) * sum_{i=1..K} KL(D_i || D_desired) / log2(i + 1)``, ``Z = sum_{i=1..K} 1/log2(i + 1)``,
    where ``D_i`` is the group distribution of the query's top i items (ties: lower index first) and
    ``KL(P || Q) = sum_a P(a) ln(P(a) / Q(a))`` in nats. No smoothing is needed: groups absent from
    the top i contribute ``0 * ln 0 = 0`` (as in DeBiasLens' and Berg et al.'s code); the desired
    distribution must be positive everywhere (see :func:`desired_distribution`). 0 = the ranking
    matches the target at every depth.
    """
    _check_choice("reduce", reduce, REDUCTIONS)
    s = _float_matrix("scores", scores)  # (Q, M)
    g = _int_vector("groups", groups, s.shape[1])  # (M,)
    _check_groups(g, n_groups)
    desired = desired_distribution(g, n_groups, target)  # (G,)
    top = g[top_k_indices(s, k)]  # (Q, K)
    cum = torch.nn.functional.one_hot(top, n_groups).cumsum(dim=1).to(torch.float64)  # (Q, K, G)
    depth = torch.arange(1, k + 1, dtype=torch.float64)  # (K,)
    dist = cum / depth[None, :, None]  # (Q, K, G) D_i
    log_ratio = torch.log(dist.clamp_min(1e-300)) - torch.log(desired)  # (Q, K, G)
    terms = torch.where(dist > 0, dist * log_ratio, torch.zeros_like(dist))  # 0 * ln 0 = 0
    kl = terms.sum(dim=2)  # (Q, K)
    discount = 1.0 / torch.log2(depth + 1.0)  # (K,)
    values = (kl * discount).sum(dim=1) / discount.sum()  # (Q,)
    return reduce_queries(values, reduce)


# ------------------------------------------------------------------------------------- Cramér's V
def cramers_v(pred: Any, groups: Any, bias_correction: bool = False) -> float:
    """Cramér's V between predicted labels and groups, in [0, 1] (0 = independent).

    Contingency table over the categories that occur (absent ids are dropped): ``r`` predicted
    labels x ``c`` groups, ``chi2 = sum (O - E)^2 / E`` with ``E = row * col / n`` (no continuity
    correction), ``V = sqrt(chi2 / n / (min(r, c) - 1))``. Default is this plain V (seed 000
    reports it). ``bias_correction=True`` applies Bergsma (2013): ``phi2 = max(0, chi2/n -
    (r-1)(c-1)/(n-1))``, ``r~ = r - (r-1)^2/(n-1)``, ``c~ = c - (c-1)^2/(n-1)``,
    ``V = sqrt(phi2 / min(r~ - 1, c~ - 1))``.
    Fewer than 2 groups present is an error; a model that predicts one label for everyone has
    V = 0 by convention (no association is measurable).
    """
    p = _int_vector("pred", pred)
    g = _int_vector("groups", groups, p.shape[0])
    n = p.shape[0]
    if n < 2:
        raise DataError(f"Cramér's V needs at least 2 samples, got {n}")
    _, g_idx = torch.unique(g, return_inverse=True)
    _, p_idx = torch.unique(p, return_inverse=True)
    c, r = int(g_idx.max()) + 1, int(p_idx.max()) + 1
    if c < 2:
        raise DataError("only one group occurs in the data; Cramér's V needs at least 2 groups")
    if r < 2:
        return 0.0
    table = torch.zeros((r, c), dtype=torch.float64)  # (r, c) observed counts
    table.index_put_((p_idx, g_idx), torch.ones(n, dtype=torch.float64), accumulate=True)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / n  # (r, c)
    chi2 = float(((table - expected) ** 2 / expected).sum())
    if not bias_correction:
        return math.sqrt(chi2 / n / (min(r, c) - 1))
    phi2 = max(0.0, chi2 / n - (r - 1) * (c - 1) / (n - 1))
    r_t, c_t = r - (r - 1) ** 2 / (n - 1), c - (c - 1) ** 2 / (n - 1)
    denom = min(r_t - 1, c_t - 1)
    return 0.0 if denom <= 0 else math.sqrt(phi2 / denom)


# ---------------------------------------------------------------------------------- conventions
@dataclass(frozen=True)
class BiasConventions:
    """The conventions a bias report uses; ``to_dict()`` goes into every report."""
    k: int = 50  # top-K list length for Skew and NDKL (the world's quality bar uses 50)
    target: str | tuple[float, ...] = "uniform"  # "uniform", "dataset", or G probabilities
    zero_count: float = DEFAULT_ZERO_COUNT  # Skew smoothing: empty group -> p_top = zero_count / K
    reduce: str = "mean"  # over queries: "mean" or "sum" (seed 002's code sums)

    def __post_init__(self) -> None:
        _check_k(self.k, self.k)
        if isinstance(self.target, str):
            _check_choice("target", self.target, TARGETS)
        else:
            object.__setattr__(self, "target", tuple(float(x) for x in self.target))
        numeric = isinstance(self.zero_count, (int, float)) and not isinstance(self.zero_count, bool)
        if not numeric or not 0 < self.zero_count <= 1:
            raise DataError(f"zero_count={self.zero_count!r} must be in (0, 1]")
        _check_choice("reduce", self.reduce, ("mean", "sum"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the conventions, with the fixed choices spelled out."""
        return {
            "k": self.k,
            "target": self.target if isinstance(self.target, str) else list(self.target),
            "zero_count": self.zero_count,
            "reduce": self.reduce,
            "skew": "ln(p_top/p_desired); empty group p_top = zero_count/K",
            "ndkl": "KL in nats, 0*ln0=0, discount 1/log2(i+1), normalised by Z",
            "ties": "stable: lower gallery index ranks first",
            "recall": "hit@k: a query counts if any positive is in its top k; identical captions are one query "
                      "whose positives are all the images they describe",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BiasConventions:
        """Inverse of :meth:`to_dict` (descriptive keys are ignored)."""
        target = data.get("target", "uniform")
        return cls(
            k=int(data.get("k", 50)),
            target=target if isinstance(target, str) else tuple(target),
            zero_count=float(data.get("zero_count", DEFAULT_ZERO_COUNT)),
            reduce=str(data.get("reduce", "mean")),
        )


def bias_summary(
    scores: Any, groups: Any, n_groups: int, conventions: BiasConventions | None = None
) -> dict[str, Any]:
    """MaxSkew@K, MinSkew@K and NDKL under ``conventions``, reduced and per query.

    ``scores (Q, M)`` query-to-image similarities, ``groups (M,)``. Returns JSON-able
    ``{"max_skew", "min_skew", "ndkl": float, "per_query": {"max_skew", "min_skew", "ndkl": [Q],
    "skew": [Q][G]}, "conventions": {...}}``.
    """
    c = conventions if conventions is not None else BiasConventions()
    target: Target = c.target if isinstance(c.target, str) else list(c.target)
    skew = skew_at_k(scores, groups, c.k, n_groups, target, c.zero_count)  # (Q, G)
    max_q, min_q = skew.max(dim=1).values, skew.min(dim=1).values  # (Q,), (Q,)
    nd = ndkl(scores, groups, c.k, n_groups, target)  # (Q,)
    assert isinstance(nd, torch.Tensor)
    return {
        "max_skew": reduce_queries(max_q, c.reduce),
        "min_skew": reduce_queries(min_q, c.reduce),
        "ndkl": reduce_queries(nd, c.reduce),
        "per_query": {
            "max_skew": max_q.tolist(), "min_skew": min_q.tolist(), "ndkl": nd.tolist(), "skew": skew.tolist()
        },
        "conventions": c.to_dict(),
    }
