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

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.datasets import DataError
from surgery.world import WorldParams, neutral_queries

logger = logging.getLogger(__name__)

TARGETS = ("uniform", "dataset")
REDUCTIONS = ("none", "mean", "sum")
DEFAULT_ZERO_COUNT = 1.0  # DeBiasLens: an empty group's top-K proportion becomes 1/K
_QUERY_CHUNK = 256  # queries sorted at once in retrieval (bounds memory at 256 x M)

Target = str | Sequence[float] | np.ndarray | torch.Tensor


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


# -------------------------------------------------------------------------------------- retrieval
def _positive_mask(positives: Any, q: int, m: int) -> torch.Tensor:
    """(Q, M) bool mask from (Q,) ids, a (Q, M) mask, or a list of id lists."""
    if isinstance(positives, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(positives)
        if t.dim() == 2:
            if t.shape != (q, m):
                raise DataError(f"positive mask has shape {tuple(t.shape)}, expected ({q}, {m})")
            return t.to(torch.bool)
        ids = _int_vector("positives", t, q)
        if (ids < 0).any() or (ids >= m).any():
            raise DataError(f"positive ids must lie in [0, {m - 1}]")
        return torch.nn.functional.one_hot(ids, m).to(torch.bool)
    if len(positives) != q:
        raise DataError(f"{len(positives)} positive lists for {q} queries; give one per query")
    mask = torch.zeros((q, m), dtype=torch.bool)
    for i, items in enumerate(positives):
        ids = [items] if isinstance(items, (int, np.integer)) else list(items)
        if any(not 0 <= int(j) < m for j in ids):
            raise DataError(f"query {i} has positive ids outside [0, {m - 1}]")
        mask[i, [int(j) for j in ids]] = True
    return mask


def best_positive_rank(sim: Any, positives: Any) -> torch.Tensor:
    """0-based rank (Q,) of each query's best-ranked positive, ties -> lower gallery index first.

    No sort: the best positive is the one with the highest score (lowest index among equals), and
    its rank is ``#(s > s_pos) + #(s == s_pos and index < pos_index)``, one pass over (Q, M).
    """
    s = _float_matrix("sim", sim)  # (Q, M)
    q, m = s.shape
    mask = _positive_mask(positives, q, m)  # (Q, M)
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise DataError(
            f"{empty.numel()} queries have no positive (first: query {int(empty[0])}); drop them before computing recall"
        )
    ranks = torch.empty(q, dtype=torch.int64)
    index = torch.arange(m)
    for start in range(0, q, _QUERY_CHUNK):
        sl = slice(start, start + _QUERY_CHUNK)
        chunk, pos = s[sl], mask[sl]  # (c, M)
        pos_score = chunk.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values  # (c, 1)
        at_best = pos & (chunk == pos_score)
        pos_index = torch.where(at_best, index, m).min(dim=1, keepdim=True).values  # (c, 1)
        ranks[sl] = (chunk > pos_score).sum(1) + ((chunk == pos_score) & (index < pos_index)).sum(1)
    return ranks


def recall_at_k(sim: Any, positives: Any, k: int) -> float:
    """Hit@K ("recall@K" in clip_benchmark): the fraction of queries with ANY positive in their top K.

    ``sim (Q, M)``: query-to-gallery similarity. ``positives``: (Q,) one gallery id per query, a
    (Q, M) bool mask, or one list of ids per query. Ties: lower gallery index ranks first. Every
    query needs at least one positive (drop the others first).
    """
    s = _float_matrix("sim", sim)
    _check_k(k, s.shape[1])
    return float((best_positive_rank(s, positives) < k).to(torch.float64).mean())


def _normalise(x: Any, name: str) -> torch.Tensor:
    t = _float_matrix(name, x)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def retrieval_recall(
    text_emb: Any, image_emb: Any, text_to_image: Any, ks: Sequence[int] = (1, 5, 10),
    text_keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """Text->image and image->text hit@K with cosine similarity.

    ``text_emb (T, D)``, ``image_emb (N, D)``, ``text_to_image (T,)``: the image each caption
    describes. Text->image: each caption's positive is its image. Image->text: an image's positives
    are all its captions; images without a caption are not queries. Keys ``"t2i@K"``, ``"i2t@K"``,
    plus ``"n_text_queries"`` and ``"n_image_queries"``. Every K must be <= both gallery sizes
    (with ``text_keys``: <= the images; ``i2t@K`` is left out where K exceeds the merged captions).

    ``text_keys (T,)``: when given, captions with the same key (e.g. the same normalised text) are
    one query whose positives are every image they describe, and one gallery entry for
    image->text. Without it, a data set whose captions repeat (a generated world: ~100 images per
    caption) scores near zero for any model, because only one of the identical images counts.
    """
    texts, images = _normalise(text_emb, "text_emb"), _normalise(image_emb, "image_emb")  # (T, D), (N, D)
    if texts.shape[1] != images.shape[1]:
        raise DataError(f"text and image embeddings differ in width ({texts.shape[1]} vs {images.shape[1]})")
    owner = _int_vector("text_to_image", text_to_image, texts.shape[0])  # (T,)
    mask = torch.nn.functional.one_hot(owner, images.shape[0]).to(torch.bool)  # (T, N)
    if text_keys is not None:
        if len(text_keys) != texts.shape[0]:
            raise DataError(f"{len(text_keys)} text keys for {texts.shape[0]} captions; give one per caption")
        first: dict[str, int] = {}  # key -> index of its first caption
        for i, key in enumerate(text_keys):
            first.setdefault(key, i)
        query_of = {key: q for q, key in enumerate(first)}
        slot = torch.tensor([query_of[key] for key in text_keys])  # (T,) merged query of each caption
        keep = torch.tensor(list(first.values()))  # (U,) one caption per key (same text, same embedding)
        merged = torch.zeros((len(first), images.shape[0]), dtype=torch.int64)
        merged.index_add_(0, slot, mask.to(torch.int64))
        texts, mask = texts[keep], merged > 0  # (U, D), (U, N)
    sim = texts @ images.T  # (T or U, N)
    has_text = mask.any(dim=0)  # (N,)
    out: dict[str, float] = {"n_text_queries": float(texts.shape[0]), "n_image_queries": float(has_text.sum())}
    for k in ks:
        _check_k(k, sim.shape[1], "image gallery")
        if text_keys is None:
            _check_k(k, sim.shape[0], "caption gallery")
    t2i = best_positive_rank(sim, mask)  # (T,) one pass for every K
    i2t = best_positive_rank(sim.T[has_text], mask.T[has_text])  # (N',)
    for k in ks:
        out[f"t2i@{k}"] = float((t2i < k).to(torch.float64).mean())
        if k <= sim.shape[0]:  # image->text needs K distinct captions (merged ones may be fewer)
            out[f"i2t@{k}"] = float((i2t < k).to(torch.float64).mean())
    return out


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


# ---------------------------------------------------------------------------------------- queries
_OCCUPATIONS = (
    "accountant", "architect", "artist", "athlete", "baker", "carpenter", "cashier", "CEO", "chef",
    "construction worker", "dentist", "doctor", "electrician", "engineer", "farmer", "firefighter",
    "hairdresser", "housekeeper", "janitor", "journalist", "judge", "lawyer", "librarian",
    "mechanic", "musician", "nurse", "pharmacist", "photographer", "pilot", "plumber",
    "police officer", "professor", "programmer", "receptionist", "scientist", "secretary",
    "security guard", "social worker", "soldier", "teacher", "truck driver", "waiter",
)
_TRAITS = (
    "aggressive", "ambitious", "attractive", "caring", "confident", "criminal", "dangerous",
    "friendly", "good", "happy", "honest", "intelligent", "kind", "lazy", "poor", "rich",
    "shy", "smart", "successful", "trustworthy",
)
_AN_WORDS = {"honest", "hour"}  # take "an" despite a consonant letter
_A_WORDS = {"CEO"}  # read as "see-ee-oh"


def _with_article(phrase: str) -> str:
    first = phrase.split()[0]
    vowel = first[0].lower() in "aeiou"
    use_an = (vowel or first in _AN_WORDS) and first not in _A_WORDS
    return f"{'an' if use_an else 'a'} {phrase}"


NEUTRAL_QUERIES: dict[str, list[str]] = {
    "occupations": [f"a photo of {_with_article(o)}" for o in _OCCUPATIONS],
    "traits": [f"a photo of {_with_article(t + ' person')}" for t in _TRAITS],
}


def world_queries(params: WorldParams) -> list[str]:
    """Neutral (group-free) concept queries of a planted-bias world, one per concept, in concept order."""
    return neutral_queries(params)


def load_queries(path: str | Path) -> list[str]:
    """Queries from a text file (one per line; blank lines and ``#`` comments skipped) or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"queries file {str(path)!r} does not exist; check the path")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise DataError(f"{str(path)!r} must hold a JSON list of query strings")
        queries = [q.strip() for q in data if q.strip()]
    else:
        queries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not queries:
        raise DataError(f"{str(path)!r} holds no queries; write one query per line")
    return queries
