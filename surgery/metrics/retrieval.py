"""Retrieval recall (hit@K): a query counts when ANY of its positives is in its top K (clip_benchmark's
"recall@k"). ``sim (Q, M)`` query-to-gallery similarities.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from surgery.errors import DataError
from surgery.metrics._inputs import _check_k, _float_matrix, _int_vector, _normalise

_QUERY_CHUNK = 256  # queries sorted at once in retrieval (bounds memory at 256 x M)


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


def retrieval_recall(
    text_emb: Any, image_emb: Any, text_to_image: Any, ks: Sequence[int] = (1, 5, 10),
    text_keys: Sequence[str] | None = None, ranks: dict | None = None,
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

    ``ranks``: a dict to fill with each query's best positive rank (0-based), ``"t2i"`` per (merged)
    caption query and ``"i2t"`` per image query, for intervals over the queries.
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
    if ranks is not None:
        ranks["t2i"], ranks["i2t"] = t2i.tolist(), i2t.tolist()
    for k in ks:
        out[f"t2i@{k}"] = float((t2i < k).to(torch.float64).mean())
        if k <= sim.shape[0]:  # image->text needs K distinct captions (merged ones may be fewer)
            out[f"i2t@{k}"] = float((i2t < k).to(torch.float64).mean())
    return out
