"""Per-head bias scores over decomposed contributions, and rank helpers.

Input convention: ``contrib`` (N, L, H, D) holds, for N probe images, the direct contribution of
every (layer, head) to the image embedding in the joint space (:mod:`surgery.audit.decompose`; with the
MLP, bias and embedding terms they sum to the embedding). ``labels`` (N,) are group ids 0..G-1.
Every score is an (L, H) float32 tensor, "higher = more group information in the head".

(a) :func:`cav_separation` — project each head's contribution onto the CAV subspace
    (:meth:`surgery.audit.cav.CAVs.basis`, ``k`` = G - 1 orthonormal columns) and measure how far apart the
    groups are:
    * 2 groups (``measure="auto"`` or ``"cohens_d"``): Cohen's d of the 1-D projection ``x`` on the
      unit direction from group 0's prototype to group 1's:
      ``d = (mean_1(x) - mean_0(x)) / s``, ``s^2 = ((n_0 - 1) var_0 + (n_1 - 1) var_1) / (n_0 + n_1 - 2)``
      (unbiased group variances, pooled). ``|d|`` unless ``signed=True``. ``s`` is clamped at ``eps``
      (a constant head with equal group means scores 0).
    * G > 2 groups (``"auto"`` or ``"eta_squared"``): eta-squared of the k-D projection ``y``, the
      share of its total variance that lies between groups:
      ``eta^2 = sum_g n_g |mean_g(y) - mean(y)|^2 / sum_i |y_i - mean(y)|^2`` in [0, 1]
      (0 when the head is constant). It depends only on the subspace, not on the basis or the CAV
      scales. For G = 2 it relates to Cohen's d by ``eta^2 = w d^2 / (w d^2 + N - 2)``, ``w = n_0 n_1 / N``.
(b) :func:`group_accuracy_from_head` — zero-shot group accuracy with the head's contribution as the
    image embedding: predict ``argmax_g <c, t_g / |t_g|>`` (the cosine argmax: scaling ``c`` does not
    change it) against the group prompt embeddings ``t_g``; ties go to the lower group id; a zero
    contribution predicts group 0. ``center=True`` removes the head's mean over the images first
    (a constant offset otherwise pushes every image to one group); ``balanced=True`` averages the
    per-group recalls (chance = 1/G either way on a balanced set).

Both scores stream: :class:`SeparationAccumulator` and :class:`GroupAccuracyAccumulator` take chunks
of projections / logits (N_chunk, L, H, k|G), so memory does not grow with N.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from surgery.audit.cav import CAVError, CAVs, cav_basis, check_labels
from surgery.errors import HeadScoreError

MEASURES = ("auto", "cohens_d", "eta_squared")


def _check_contrib(contrib: torch.Tensor, name: str = "contrib") -> None:
    if not isinstance(contrib, torch.Tensor) or contrib.dim() != 4 or not contrib.is_floating_point():
        shape = tuple(contrib.shape) if isinstance(contrib, torch.Tensor) else type(contrib).__name__
        raise HeadScoreError(f"{name} must be an (N, L, H, D) float tensor of per-head contributions, got {shape}")


def _labels(labels: torch.Tensor, n: int, n_groups: int) -> torch.Tensor:
    try:
        return check_labels(labels, n, n_groups)
    except CAVError as exc:
        raise HeadScoreError(str(exc)) from exc


# ------------------------------------------------------------------------------------- (a) CAV separation
class SeparationAccumulator:
    """Streaming group statistics of projections (N_chunk, L, H, k) -> (L, H) effect sizes.

    Keeps per group the count, the sum and the sum of squared norms of the projections, in float64,
    shifted by the first chunk's mean for numerical stability.
    """

    def __init__(self, n_groups: int, measure: str = "auto", *, signed: bool = False, eps: float = 1e-12) -> None:
        if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 2:
            raise HeadScoreError(f"n_groups must be an integer >= 2, got {n_groups!r}")
        if measure not in MEASURES:
            raise HeadScoreError(f"unknown measure {measure!r}; allowed: {', '.join(MEASURES)}")
        if measure == "cohens_d" and n_groups != 2:
            raise HeadScoreError(f"cohens_d compares 2 groups, got {n_groups}; use measure='eta_squared'")
        self.n_groups = n_groups
        self.measure = ("cohens_d" if n_groups == 2 else "eta_squared") if measure == "auto" else measure
        self.signed = signed
        self.eps = eps
        self._shift: torch.Tensor | None = None  # (L, H, k)
        self._count = torch.zeros(n_groups, dtype=torch.float64)  # (G,)
        self._sum: torch.Tensor | None = None  # (G, L, H, k)
        self._sumsq: torch.Tensor | None = None  # (G, L, H)

    def update(self, proj: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a chunk: proj (n, L, H, k) projections of the heads' contributions, labels (n,)."""
        if not isinstance(proj, torch.Tensor) or proj.dim() != 4:
            raise HeadScoreError(f"projections must be (n, L, H, k), got {getattr(proj, 'shape', type(proj).__name__)}")
        if self.measure == "cohens_d" and proj.shape[-1] != 1:
            raise HeadScoreError(f"cohens_d needs a 1-D projection (k = 1), got k = {proj.shape[-1]}")
        ids = labels.to(torch.int64).cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
        if ids.dim() != 1 or ids.shape[0] != proj.shape[0]:
            raise HeadScoreError(f"labels must be ({proj.shape[0]},) for this chunk, got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_groups):
            raise HeadScoreError(f"label ids outside [0, {self.n_groups - 1}]")
        x = proj.detach().to("cpu", torch.float64)
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = x.new_zeros((self.n_groups, *x.shape[1:]))
            self._sumsq = x.new_zeros((self.n_groups, *x.shape[1:3]))
        elif x.shape[1:] != self._shift.shape:
            raise HeadScoreError(f"chunk shape {tuple(x.shape[1:])} differs from the first chunk's "
                                 f"{tuple(self._shift.shape)}")
        x = x - self._shift
        self._count += torch.bincount(ids, minlength=self.n_groups).double()
        self._sum.index_add_(0, ids, x)
        self._sumsq.index_add_(0, ids, (x * x).sum(-1))

    def result(self) -> torch.Tensor:
        """(L, H) Cohen's d (2 groups) or eta-squared (see the module docstring)."""
        if self._sum is None or int((self._count > 0).sum()) < 2:
            raise HeadScoreError("group separation needs images of at least 2 groups; add probe images")
        n = self._count  # (G,)
        present = n > 0
        if self.measure == "cohens_d":
            return self._cohens_d(n).float()
        N = n.sum()
        grand = self._sum.sum(0) / N  # (L, H, k)
        means = self._sum[present] / n[present, None, None, None]  # (G', L, H, k)
        between = (n[present, None, None] * ((means - grand) ** 2).sum(-1)).sum(0)  # (L, H)
        total = self._sumsq.sum(0) - N * (grand * grand).sum(-1)  # (L, H)
        eta = torch.where(total > self.eps, between / total.clamp_min(self.eps), torch.zeros_like(total))
        return eta.clamp(0.0, 1.0).float()

    def _cohens_d(self, n: torch.Tensor) -> torch.Tensor:
        if float(n.sum()) < 3:
            raise HeadScoreError("Cohen's d needs at least 3 images (2 degrees of freedom); add probe images")
        s = self._sum[..., 0]  # (2, L, H)
        means = s / n[:, None, None]
        within = (self._sumsq - n[:, None, None] * means * means).sum(0).clamp_min(0.0)  # (L, H)
        pooled = torch.sqrt(within / (n.sum() - 2)).clamp_min(self.eps)
        d = (means[1] - means[0]) / pooled
        return d if self.signed else d.abs()


def cav_separation(
    contrib: torch.Tensor,  # (N, L, H, D)
    labels: torch.Tensor,  # (N,) group ids 0..G-1
    cavs: CAVs | torch.Tensor,  # CAVs, or raw (G, D) directions in group order
    measure: str = "auto",  # "auto" (d for 2 groups, eta^2 otherwise) | "cohens_d" | "eta_squared"
    *,
    signed: bool = False,  # 2 groups: keep d's sign (positive = group 1 projects higher)
) -> torch.Tensor:
    """(a) (L, H): effect size of group separation along the CAVs (see the module docstring)."""
    _check_contrib(contrib)
    directions = cavs.directions if isinstance(cavs, CAVs) else cavs
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[1] != contrib.shape[-1]:
        raise HeadScoreError(f"CAV directions must be (G, {contrib.shape[-1]}) to match contrib's width, "
                             f"got {getattr(directions, 'shape', type(directions).__name__)}")
    G = directions.shape[0]
    ids = _labels(labels, contrib.shape[0], G)
    try:
        basis = cav_basis(directions).to(contrib.device, torch.float64)  # (D, k)
    except CAVError as exc:
        raise HeadScoreError(str(exc)) from exc
    acc = SeparationAccumulator(G, measure, signed=signed)
    acc.update(contrib.detach().double() @ basis, ids)  # (N, L, H, k)
    return acc.result()


# ------------------------------------------------------------------------------------- (b) group accuracy
class GroupAccuracyAccumulator:
    """Streaming zero-shot group accuracy from logits (N_chunk, L, H, G) -> (L, H)."""

    def __init__(self, n_groups: int) -> None:
        if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 2:
            raise HeadScoreError(f"n_groups must be an integer >= 2, got {n_groups!r}")
        self.n_groups = n_groups
        self._correct: torch.Tensor | None = None  # (G, L, H) correct predictions per true group
        self._count = torch.zeros(n_groups, dtype=torch.float64)  # (G,)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a chunk: logits (n, L, H, G) (argmax = prediction), labels (n,)."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[-1] != self.n_groups:
            raise HeadScoreError(f"logits must be (n, L, H, {self.n_groups}), got "
                                 f"{getattr(logits, 'shape', type(logits).__name__)}")
        ids = labels.to(torch.int64).cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
        if ids.dim() != 1 or ids.shape[0] != logits.shape[0]:
            raise HeadScoreError(f"labels must be ({logits.shape[0]},) for this chunk, got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_groups):
            raise HeadScoreError(f"label ids outside [0, {self.n_groups - 1}]")
        hit = (logits.detach().argmax(-1).cpu() == ids[:, None, None]).double()  # (n, L, H)
        if self._correct is None:
            self._correct = hit.new_zeros((self.n_groups, *hit.shape[1:]))
        self._correct.index_add_(0, ids, hit)
        self._count += torch.bincount(ids, minlength=self.n_groups).double()

    def result(self, balanced: bool = False) -> torch.Tensor:
        """(L, H) accuracy; ``balanced``: the mean of per-group recalls over the groups present."""
        if self._correct is None or float(self._count.sum()) == 0:
            raise HeadScoreError("no images were scored; add probe images")
        if not balanced:
            return (self._correct.sum(0) / self._count.sum()).float()
        present = self._count > 0
        recall = self._correct[present] / self._count[present, None, None]
        return recall.mean(0).float()


def group_logits(
    contrib: torch.Tensor,  # (N, L, H, D)
    group_text_emb: torch.Tensor,  # (G, D)
    *,
    center: bool = False,  # subtract each head's mean contribution over the N images first
) -> torch.Tensor:
    """(N, L, H, G): dot products of each head's contribution with the unit group prompt embeddings."""
    _check_contrib(contrib)
    if (not isinstance(group_text_emb, torch.Tensor) or group_text_emb.dim() != 2
            or group_text_emb.shape[1] != contrib.shape[-1] or group_text_emb.shape[0] < 2):
        raise HeadScoreError(f"group_text_emb must be (G >= 2, {contrib.shape[-1]}), got "
                             f"{getattr(group_text_emb, 'shape', type(group_text_emb).__name__)}")
    t = group_text_emb.detach().to(contrib.device, torch.float64)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = contrib.detach().double()
    if center:
        c = c - c.mean(0, keepdim=True)
    return c @ t.T


def group_accuracy_from_head(
    contrib: torch.Tensor,  # (N, L, H, D)
    labels: torch.Tensor,  # (N,) group ids 0..G-1, in the order of group_text_emb's rows
    group_text_emb: torch.Tensor,  # (G, D) one (mean) prompt embedding per group
    *,
    balanced: bool = False,  # mean of per-group recalls instead of plain accuracy
    center: bool = False,  # remove each head's mean contribution first
) -> torch.Tensor:
    """(b) (L, H): zero-shot group accuracy using only the head's contribution as the embedding."""
    logits = group_logits(contrib, group_text_emb, center=center)
    ids = _labels(labels, contrib.shape[0], group_text_emb.shape[0])
    acc = GroupAccuracyAccumulator(group_text_emb.shape[0])
    acc.update(logits, ids)
    return acc.result(balanced)


# ------------------------------------------------------------------------------------- ranks
def _check_map(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise HeadScoreError(f"{name} must be an (L, H) score map, got {getattr(x, 'shape', type(x).__name__)}")
    return x.detach().cpu().double()


def rank(scores: torch.Tensor, descending: bool = True) -> list[tuple[int, int]]:
    """Heads ordered by score (L, H): best first when ``descending``. Ties keep (layer, head) order;
    NaN scores go last."""
    x = _check_map("scores", scores)
    H = x.shape[1]
    flat = x.flatten()
    key = -flat if descending else flat
    key = torch.where(torch.isnan(key), torch.full_like(key, math.inf), key)
    order = torch.sort(key, stable=True).indices  # NaN keys were mapped to +inf: last
    return [(int(i) // H, int(i) % H) for i in order]


def rank_data(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ascending, ties given the average of their ranks (float64)."""
    x = x.detach().cpu().double().flatten()
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    end = torch.cumsum(counts, 0).double()  # last 1-based rank of each distinct value
    average = end - (counts.double() - 1) / 2
    return average[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (L, H) score maps: Pearson correlation of their tie-averaged
    ranks. NaN when either map is constant (no ranking to compare)."""
    x, y = _check_map("a", a), _check_map("b", b)
    if x.shape != y.shape:
        raise HeadScoreError(f"score maps differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if bool(torch.isnan(x).any() or torch.isnan(y).any()):
        raise HeadScoreError("score maps hold NaN; compare maps of finite scores")
    rx, ry = rank_data(x), rank_data(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else math.nan


def top_heads(scores: torch.Tensor, k: int, descending: bool = True) -> list[tuple[int, int]]:
    """The first ``k`` heads of :func:`rank`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise HeadScoreError(f"k must be an integer >= 0, got {k!r}")
    return rank(scores, descending)[:k]


def mean_rank(maps: Sequence[torch.Tensor], descending: bool = True) -> list[tuple[int, int]]:
    """Heads ordered by the mean over ``maps`` (each (L, H)) of their tie-averaged rank (best first)."""
    if not maps:
        raise HeadScoreError("mean_rank needs at least one score map")
    shape = _check_map("maps[0]", maps[0]).shape
    total = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    for i, m in enumerate(maps):
        x = _check_map(f"maps[{i}]", m)
        if x.shape != shape:
            raise HeadScoreError(f"maps[{i}] has shape {tuple(x.shape)}, expected {tuple(shape)}")
        total += rank_data(-x if descending else x)
    return rank(total.view(shape), descending=False)


def head_table(scores: dict[str, torch.Tensor], cheap_rank: Sequence[tuple[int, int]],
               extra: dict[str, torch.Tensor | None] | None = None) -> list[dict]:
    """One JSON-able entry per head, layer-major: its cheap rank, every score map (L, H) and every
    extra map that is not None (e.g. accuracy drop)."""
    L, H = next(iter(scores.values())).shape
    rank_of = {head: i for i, head in enumerate(cheap_rank)}
    maps = {**scores, **{name: m for name, m in (extra or {}).items() if m is not None}}
    return [{"layer": layer, "head": head, "cheap_rank": rank_of[(layer, head)],
             **{name: _number(m[layer, head]) for name, m in maps.items()}}
            for layer in range(L) for head in range(H)]


def _number(value: torch.Tensor) -> float | None:
    """A JSON-able score: None where there is none (NaN: e.g. a head the shortlisted sweep skipped)."""
    x = float(value)
    return None if math.isnan(x) else x
