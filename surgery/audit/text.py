"""Head-level bias audit of the text tower, from prompts (images optional), and supervised CAVs.

**Prompt set** (:class:`TextProbe`): neutral queries (no group named: the built-in occupations and
traits for people, one query per concept for a planted-bias world) and *group-naming prompts*, each
labelled with its group: the attribute's prompt set (the prompts the zero-shot CAVs are built from)
plus every neutral query combined with every group ("a photo of a red circle" in a world,
"a photo of a doctor who is a woman" for people: ``"<query> who is <group noun phrase>"``, the
noun phrase being the group's first prompt without a leading "a photo of" / "a portrait of").

**Scores** per text (layer, head), side by side, all at the end-of-text token (higher = more bias):

* (a) ``cav``: separation of the groups along the zero-shot CAVs by the head's direct contribution
  (:mod:`surgery.audit.decompose`) on the group-naming prompts: Cohen's d (2 groups) or eta-squared
  (:mod:`surgery.audit.head_scores`);
* (b) ``group_acc``: group accuracy of the group-naming prompts from the head's contribution alone,
  against the groups' zero-shot prototypes (cosine argmax, not centred, as for the vision tower);
* (c) ``ablation``: bias removed (baseline minus ablated) by mean-ablating the head in the text tower,
  on the *bias measure* B of the neutral queries. With labelled images: mean MaxSkew@K of the queries
  retrieving the images (the images are embedded once; only the text tower is edited). Without
  images, the text-only **CAV projection**

      T = mean_q sqrt( (1/G) sum_g <unit(t_q), v_g>^2 )

  with ``t_q`` the query's text embedding and ``v_g`` the *unedited* model's zero-shot CAV directions
  (group prototype minus the mean prototype). For 2 groups ``T = mean_q |cos(t_q, p_1) - cos(t_q, p_0)| / 2``:
  how much closer a neutral query sits to one group's prompts than to the other's, the text-side
  cause of a skewed retrieval. The directions stay fixed while heads are ablated (images, or the
  group prototypes they were matched against, are not edited by a text-tower edit; a direction
  re-derived from the edited tower could shrink merely because group words lost their meaning).
  The sweep reuses activations: for a head of layer ``l`` it restarts from the stored residual
  entering layer ``l`` and ablates all heads of the layer in one stacked pass.
* (d) ``gradient``: ``dB/ds_h`` at ``s = 1`` for every text head from one backward pass (``s_h`` the
  head's scale along the mean-ablation direction ``z_h - mean_h``; with images B is the soft top-K
  MaxSkew surrogate :func:`surgery.audit.ablation.soft_max_skew`, without images T itself), the
  first-order estimate of (c); the Spearman correlation of (d) with (c) is reported.

Head means (mean ablation, plan ``mean``): each head's output ``z_h`` averaged over the real tokens
(start to end-of-text) of every prompt of the probe.

**Supervised CAVs** (:func:`supervised_image_cavs`, :func:`supervised_vision_scores`): with labelled
images, class means of the normalised image embeddings (:func:`surgery.audit.cav.supervised_cavs`); the
(a) and (b) scores are repeated along them (``cav_supervised``, ``group_acc_supervised``) for the
vision heads, and for the text heads when the prompt groups carry the label values' names.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from surgery import metrics
from surgery.audit.ablation import (
    check_head_options,
    embed_tail,
    frozen_weights,
    layer_inputs,
    soft_max_skew,
    soft_topk_params,
)
from surgery.audit.cav import CAVs, zero_shot_cavs
from surgery.audit.decompose import decompose, tower_inputs
from surgery.audit.head_scores import GroupAccuracyAccumulator, SeparationAccumulator, head_table, mean_rank, spearman
from surgery.audit.probe import ProbeSet
from surgery.audit.supervised import probe_image_embeddings
from surgery.audit.text_probe import TextProbe
from surgery.edit.plan import HeadEdit, SurgeryPlan
from surgery.errors import TextAuditError
from surgery.model.attention import head_masked
from surgery.model.encode import text_embeddings
from surgery.model.preprocess import tokenize
from surgery.model.towers import get_towers

log = logging.getLogger(__name__)

TOWER = "text"
CHEAP_SCORES = ("cav", "group_acc", "gradient")
MEASURES = {
    "max_skew": "mean MaxSkew@K of the neutral queries retrieving the probe images (uniform target)",
    "cav_projection": "mean over neutral queries of sqrt(mean_g <unit(t_q), v_g>^2), v_g the unedited "
                      "zero-shot CAV directions (2 groups: |cos(t_q, p_1) - cos(t_q, p_0)| / 2)",
}
_EPS = 1e-12


# ------------------------------------------------------------------------------------- options, result
@dataclass
class TextAuditOptions:
    k: int = 50  # MaxSkew@K of the neutral queries (with images)
    top_k: int = 3  # text heads the proposed plan ablates
    batch_size: int = 256  # prompts per forward pass
    ablation: str = "mean"  # how heads are removed: "mean" | "zero"
    backend: str = "auto"  # attention backend for (c) and (d)
    sweep: bool = True  # run the causal sweep (c); off: cheap scores only

    def __post_init__(self) -> None:
        check_head_options(self, TextAuditError)


@dataclass
class TextAuditResult:
    scores: dict[str, torch.Tensor]  # name -> (L, H); higher = more bias carried by the head
    cheap_rank: list[tuple[int, int]]  # heads by mean rank of the cheap scores, best first
    measure: str  # the bias measure of (c) and (d): "max_skew" | "cav_projection"
    baseline: dict  # unedited model: the measure, its surrogate, the text-only cav_projection
    spearman_gradient_vs_ablation: float | None
    means: torch.Tensor  # (L, H, d) head means over the probe prompts' tokens
    plan: SurgeryPlan
    probe: dict  # what the prompts were
    supervised: dict | None = None  # how supervised scores were made, or why not
    query_shift: torch.Tensor | None = None  # (L, H) 1 - mean cosine of ablated vs unedited query embeddings
    accuracy_drop: torch.Tensor | None = None  # (L, H) zero-shot concept accuracy lost (images with concepts)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        heads = head_table(self.scores, self.cheap_rank,
                           {"query_shift": self.query_shift, "accuracy_drop": self.accuracy_drop})
        return {"tower": TOWER, "measure": self.measure, "measure_definition": MEASURES[self.measure],
                "baseline": self.baseline, "spearman_gradient_vs_ablation": self.spearman_gradient_vs_ablation,
                "probe": self.probe, "supervised": self.supervised, "heads": heads,
                "plan": self.plan.to_dict(), "timings": self.timings}


# ------------------------------------------------------------------------------------- bias measures
def cav_projection(query_emb: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Text-only bias T (a scalar tensor, differentiable): query_emb (Q, D) (normalised here),
    directions (G, D) the CAV directions. See the module docstring."""
    proj = F.normalize(query_emb, dim=-1) @ directions.to(query_emb.dtype).T  # (Q, G)
    return torch.sqrt((proj * proj).mean(1) + _EPS).mean()


class _Measure:
    """The bias measure B of (c) (exact) and its differentiable form for (d), on query embeddings."""

    def __init__(self, directions: torch.Tensor, images: tuple[torch.Tensor, torch.Tensor, int] | None, k: int,
                 base_emb: torch.Tensor):
        self.directions = directions  # (G, D)
        self.images = images  # (image embeddings (N, D) normalised, groups (N,), n_groups) or None
        self.k = k
        self.name = "max_skew" if images is not None else "cav_projection"
        self.n_queries = base_emb.shape[0]
        if images is not None:
            emb, _, _ = images
            self.threshold, self.tau = soft_topk_params(base_emb @ emb.T.to(base_emb.dtype), k)  # (Q, 1) each

    def exact(self, query_emb: torch.Tensor) -> float:
        """B for normalised query embeddings (Q, D)."""
        if self.images is None:
            return float(cav_projection(query_emb, self.directions))
        emb, groups, G = self.images
        scores = query_emb @ emb.T.to(query_emb.dtype)
        return float(metrics.max_skew_at_k(scores.float().cpu(), groups, self.k, G).mean())

    def surrogate(self, query_emb: torch.Tensor, rows: slice) -> torch.Tensor:
        """Differentiable B of the queries ``rows`` (q, D), times q / Q (so the chunks add up to B)."""
        share = query_emb.shape[0] / self.n_queries
        if self.images is None:
            return cav_projection(query_emb, self.directions) * share
        emb, groups, G = self.images
        scores = query_emb @ emb.T.to(query_emb.device, query_emb.dtype)  # (q, N)
        return soft_max_skew(scores, groups.to(scores.device), G, self.threshold[rows].to(scores),
                             self.tau[rows].to(scores)) * share


# ------------------------------------------------------------------------------------- passes
def _tokens(texts: list[str], tokenizer: dict, device) -> torch.Tensor:

    return tokenize(texts, tokenizer).to(device)  # (n, ctx)


@torch.no_grad()
def text_head_means(model: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(L, H, d): each text head's output z_h averaged over the real tokens (up to and including the
    pooled end-of-text token) of ``tokens`` (n, ctx)."""
    view = get_towers(model)[TOWER]
    total = torch.zeros(view.n_layers, view.n_heads, view.head_dim, dtype=torch.float64, device=tokens.device)
    count = 0
    with head_masked(model, towers=(TOWER,), backend="sdpa"):
        for start in range(0, tokens.shape[0], batch_size):
            x, mask, index = tower_inputs(model, TOWER, tokens[start:start + batch_size])
            valid = (torch.arange(x.shape[1], device=x.device)[None, :] <= index[:, None]).to(torch.float64)  # (b, N)
            for layer, block in enumerate(view.blocks):
                block.attn.capture = True
                try:
                    x = block(x, attn_mask=mask)
                    total[layer] += torch.einsum("bhnd,bn->hd", block.attn.captured.double(), valid)
                finally:
                    block.attn.capture, block.attn.captured = False, None
            count += int(valid.sum())
    return (total / count).float().cpu()


def _set_text_masks(view, mask, fill) -> None:
    for layer, block in enumerate(view.blocks):
        block.attn.set_head_mask(None if mask is None else mask[layer])
        block.attn.set_head_fill(None if (fill is None or mask is None) else fill[layer])


@torch.no_grad()
def text_ablation_sweep(model: nn.Module, tokens: torch.Tensor, means: torch.Tensor | None, batch_size: int = 256,
                        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(base (Q, D), ablated (L, H, Q, D)): normalised query embeddings of ``tokens`` (Q, ctx), unedited
    and with each text head ablated alone (mean-ablated with ``means`` (L, H, d), else zeroed).

    Reuses activations: the residual entering every layer is stored once per chunk of queries; for
    layer l all H heads are ablated in one pass over H stacked copies under an (H*q, H) head mask.
    """
    view = get_towers(model)[TOWER]
    device = tokens.device
    L, H = view.n_layers, view.n_heads
    ablate = torch.ones(H, H, device=device) - torch.eye(H, device=device)  # row j: head j off
    fill = means.to(device) if means is not None else None
    base, ablated = [], []
    chunk = max(1, batch_size // H)
    with head_masked(model, towers=(TOWER,), backend=backend):
        for start in range(0, tokens.shape[0], chunk):
            x, mask, index = tower_inputs(model, TOWER, tokens[start:start + chunk])
            q = x.shape[0]
            inputs = layer_inputs(view, x, mask)
            base.append(embed_tail(view, inputs[0], 0, mask, index).float().cpu())
            per_layer = []
            for layer in range(L):
                attn = view.blocks[layer].attn
                attn.set_head_mask(ablate.repeat_interleave(q, dim=0))  # (H*q, H)
                attn.set_head_fill(fill[layer] if fill is not None else None)
                try:
                    emb = embed_tail(view, inputs[layer].repeat(H, 1, 1), layer, mask, index.repeat(H))  # (H*q, D)
                finally:
                    attn.set_head_mask(None)
                    attn.set_head_fill(None)
                per_layer.append(emb.float().cpu().view(H, q, -1))
            ablated.append(torch.stack(per_layer))  # (L, H, q, D)
    return torch.cat(base), torch.cat(ablated, dim=2)


def text_gradient_scores(model: nn.Module, tokens: torch.Tensor, surrogate, means: torch.Tensor | None,
                         batch_size: int = 256, backend: str = "auto") -> tuple[torch.Tensor, float]:
    """(d): ((L, H) dB/ds_h at s = 1 for every text head, B). ``surrogate(query_emb (q, D), rows)``
    returns the differentiable measure of a chunk of queries scaled so the chunks add up to B. One
    backward per chunk of queries (one in all for up to ``batch_size`` queries); weights frozen."""
    view = get_towers(model)[TOWER]
    device = tokens.device
    frozen = [p for p in model.parameters() if p.requires_grad]
    mask = torch.ones(view.n_layers, view.n_heads, device=device, requires_grad=True)
    total = 0.0
    with head_masked(model, towers=(TOWER,), backend=backend), frozen_weights(frozen):
        _set_text_masks(view, mask, means.to(device) if means is not None else None)
        try:
            for start in range(0, tokens.shape[0], batch_size):
                rows = slice(start, min(start + batch_size, tokens.shape[0]))
                x, attn_mask, index = tower_inputs(model, TOWER, tokens[rows])
                value = surrogate(embed_tail(view, x, 0, attn_mask, index), rows)
                value.backward()
                total += float(value.detach())
        finally:
            _set_text_masks(view, None, None)
    return mask.grad.detach().float().cpu(), total


@torch.no_grad()
def _head_projections(model: nn.Module, tokens: torch.Tensor, directions: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n, L, H, K): every text head's direct contribution at end-of-text projected on ``directions`` (K, D)."""
    dirs = directions.to(tokens.device)
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        dec = decompose(model, TOWER, tokens[start:start + batch_size])
        out.append((dec.heads @ dirs.T.to(dec.heads.dtype)).float().cpu())  # (b, L, H, K)
    return torch.cat(out)


def _separation_and_accuracy(proj: torch.Tensor, labels: torch.Tensor, k: int, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a), (b) from projections (n, L, H, k + G): the first k columns on the CAV basis, the rest on the prototypes."""
    sep, acc = SeparationAccumulator(n_groups), GroupAccuracyAccumulator(n_groups)
    sep.update(proj[..., :k], labels)
    acc.update(proj[..., k:], labels)
    return sep.result(), acc.result()


# ------------------------------------------------------------------------------------- the audit
def audit_text(model: nn.Module, tokenizer: dict, probe: TextProbe, options: TextAuditOptions | None = None,
               images: ProbeSet | None = None, image_emb: torch.Tensor | None = None,
               supervised: CAVs | None = None) -> TextAuditResult:
    """Score every text head (a, b, c, d), rank them, propose a plan of text head edits.

    ``images``: labelled probe images; with them the bias measure is MaxSkew@K of the neutral queries
    retrieving them (``image_emb`` (N, D): their normalised embeddings, if already computed), else the
    text-only CAV projection. ``supervised``: CAVs from labelled images (:func:`supervised_image_cavs`):
    (a) and (b) are also reported along them.
    """
    opt = options or TextAuditOptions()
    view = get_towers(model)[TOWER]  # raises for towers surgery cannot handle
    device = next(model.parameters()).device
    if images is not None and len(images) < opt.k:
        raise TextAuditError(f"K={opt.k} is larger than the {len(images)} probe images; lower --k or add images")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cavs, scores, sup_info = _projection_scores(model, tokenizer, probe, supervised, opt.batch_size, device)
    timings["decomposition_a_b"] = time.perf_counter() - start

    start = time.perf_counter()
    query_tokens = _tokens(probe.queries, tokenizer, device)
    means = text_head_means(model, _tokens(probe.all_prompts(), tokenizer, device), opt.batch_size)
    fill = means if opt.ablation == "mean" else None
    with torch.no_grad():
        base_emb = F.normalize(model.encode_text(query_tokens).float(), dim=-1)  # (Q, D)
    image_info = None
    if images is not None:
        if image_emb is None:
            image_emb = probe_image_embeddings(model, images, opt.batch_size)
        image_info = (image_emb.to(device), images.groups, len(images.group_names))
    measure = _Measure(cavs.directions.to(device), image_info, opt.k, base_emb)
    grad, surrogate = text_gradient_scores(model, query_tokens, measure.surrogate, fill, opt.batch_size, opt.backend)
    scores["gradient"] = grad
    timings["gradient_d"] = time.perf_counter() - start
    baseline = {"cav_projection": float(cav_projection(base_emb, cavs.directions.to(device))),
                measure.name: measure.exact(base_emb), "surrogate": surrogate}
    spearman_dc = query_shift = accuracy_drop = None
    if opt.sweep:
        start = time.perf_counter()
        query_shift, accuracy_drop = _sweep_scores(model, tokenizer, query_tokens, images, image_emb, fill, measure,
                                                   scores, baseline, opt, view, device)
        spearman_dc = spearman(scores["gradient"], scores["ablation"])
        timings["ablation_sweep_c"] = time.perf_counter() - start
    ranked = mean_rank([scores[name] for name in CHEAP_SCORES])
    plan = _text_plan(ranked, means, probe, measure.name, opt)
    info = {"attribute": probe.attribute, "groups": probe.group_names, "n_queries": len(probe.queries),
            "n_group_prompts": len(probe.prompts), "n_cav_prompts": sum(len(v) for v in probe.prompt_set.values()),
            **probe.source}
    if images is not None:
        info.update(n_images=len(images), k=opt.k)
    return TextAuditResult(scores=scores, cheap_rank=ranked, measure=measure.name, baseline=baseline,
                           spearman_gradient_vs_ablation=spearman_dc, means=means, plan=plan, probe=info,
                           supervised=sup_info, query_shift=query_shift, accuracy_drop=accuracy_drop,
                           timings=timings)


def _projection_scores(model: nn.Module, tokenizer: dict, probe: TextProbe, supervised: CAVs | None,
                       batch_size: int, device) -> tuple[CAVs, dict[str, torch.Tensor], dict | None]:
    """(zero-shot CAVs, scores (a) ``cav`` and (b) ``group_acc`` (L, H) -- plus their supervised twins
    when ``supervised`` CAVs fit the prompts' groups --, what the supervised scores used)."""
    embed = lambda texts: text_embeddings(model, texts, tokenizer)  # noqa: E731
    cavs = zero_shot_cavs(embed, probe.prompt_set, attribute=probe.attribute)
    basis = cavs.basis().T  # (k, D)
    k = basis.shape[0]
    G = len(probe.group_names)
    prompt_tokens = _tokens(probe.prompts, tokenizer, device)
    directions = torch.cat([basis, cavs.prototypes])  # (k + G, D)
    sup_dirs = None
    sup_info = None
    if supervised is not None:
        sup_labels, sup_info = _supervised_labels(probe, supervised)
        if sup_labels is not None:
            sup_dirs = torch.cat([supervised.basis().T, supervised.prototypes])
            directions = torch.cat([directions, sup_dirs])
    proj = _head_projections(model, prompt_tokens, directions, batch_size)  # (P, L, H, K)
    scores = dict(zip(("cav", "group_acc"), _separation_and_accuracy(proj[..., :k + G], probe.groups, k, G)))
    if sup_dirs is not None:
        k_sup = sup_dirs.shape[0] - supervised.n_groups
        sep, acc = _separation_and_accuracy(proj[..., k + G:], sup_labels, k_sup, supervised.n_groups)
        scores.update(cav_supervised=sep, group_acc_supervised=acc)
    return cavs, scores, sup_info


def _sweep_scores(model: nn.Module, tokenizer: dict, query_tokens: torch.Tensor, images: ProbeSet | None,
                  image_emb: torch.Tensor | None, fill: torch.Tensor | None, measure: _Measure,
                  scores: dict, baseline: dict, opt: TextAuditOptions, view, device
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score (c) ``ablation`` (L, H) into ``scores`` (and the unedited accuracy into ``baseline``);
    returns each head's query shift (L, H) and, with labelled images, its accuracy drop (L, H)."""
    concepts = images is not None and images.concepts is not None and bool(images.class_prompts)
    sweep_tokens = torch.cat([query_tokens, _tokens(images.class_prompts, tokenizer, device)]) if concepts \
        else query_tokens
    base, ablated = text_ablation_sweep(model, sweep_tokens, fill, opt.batch_size, opt.backend)
    Q = query_tokens.shape[0]
    reference = measure.exact(base[:Q].to(device))
    L, H = view.n_layers, view.n_heads
    scores["ablation"] = torch.tensor([[reference - measure.exact(ablated[l, h, :Q].to(device)) for h in range(H)]
                                       for l in range(L)])
    query_shift = 1 - (ablated[:, :, :Q] * base[:Q]).sum(-1).mean(-1)  # (L, H)
    accuracy_drop = None
    if concepts:
        accuracy = _concept_accuracy(base[Q:], image_emb, images.concepts)
        accuracy_drop = torch.tensor([[accuracy - _concept_accuracy(ablated[l, h, Q:], image_emb, images.concepts)
                                       for h in range(H)] for l in range(L)])
        baseline["accuracy"] = accuracy
    return query_shift, accuracy_drop


def _text_plan(ranked: list[tuple[int, int]], means: torch.Tensor, probe: TextProbe, measure: str,
               opt: TextAuditOptions) -> SurgeryPlan:
    """The proposed plan: the top-k heads of the cheap ranking, removed (mean- or zero-ablated)."""
    return SurgeryPlan(
        heads=[HeadEdit(TOWER, l, h, 0.0, opt.ablation, means[l, h].tolist() if opt.ablation == "mean" else None)
               for l, h in ranked[: opt.top_k]],
        provenance={"method": "clipsurgery audit (text tower)",
                    "ranking": "mean rank of (a) cav, (b) group_acc, (d) gradient",
                    "attribute": probe.attribute, "measure": measure},
    ).validate()


def _concept_accuracy(class_emb: torch.Tensor, image_emb: torch.Tensor, concepts: torch.Tensor) -> float:
    """Zero-shot concept accuracy: class prompt embeddings (C, D), image embeddings (N, D), concept ids (N,)."""
    return float(((class_emb @ image_emb.T.to(class_emb)).argmax(0) == concepts).double().mean())


def _supervised_labels(probe: TextProbe, supervised: CAVs) -> tuple[torch.Tensor | None, dict]:
    """The prompts' labels as ids of the supervised CAVs' groups (matched by name), or None and why."""
    index = {name: i for i, name in enumerate(supervised.groups)}
    missing = [g for g in probe.group_names if g not in index]
    if missing:
        reason = (f"prompt groups {', '.join(missing)} are not among the labelled groups "
                  f"({', '.join(supervised.groups)}); supervised text scores skipped")
        log.warning(reason)
        return None, {"method": supervised.method, "skipped": reason}
    ids = torch.tensor([index[g] for g in probe.group_names], dtype=torch.int64)[probe.groups]
    return ids, {"method": supervised.method, "groups": list(supervised.groups),
                 "features": "normalised image embeddings of the labelled probe images"}
