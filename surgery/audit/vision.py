"""Head-level bias audit of the vision tower (seeds 000 and 002), fast enough for every checkpoint.

Per (layer, head), side by side:

* (a) ``cav``: separation of the protected groups along zero-shot concept directions (CAVs from
  group prompts) by the head's direct contribution alone (Cohen's d for two groups, eta-squared
  over the CAV subspace for more: :mod:`surgery.audit.head_scores`);
* (b) ``group_acc``: zero-shot group accuracy from the head's contribution alone;
* (c) ``ablation``: the causal effect of mean-ablating the head on mean MaxSkew@K of the neutral
  queries (baseline minus ablated) and on zero-shot concept accuracy;
* (d) ``gradient``: the first-order bias removed by ablating the head, from one backward pass.

(a), (b) and (d) are cheap; (c) is the ground truth they are checked against (Spearman of (d)
and (c) is reported). The proposed plan is chosen at set level: heads are removed one at a time, each
the one whose removal lowers bias the most when measured together with those already chosen,
within a concept-accuracy budget (:mod:`surgery.audit.head_set`); the per-head ranking stays the
interpretability output.
Bias-augmented TextSpan descriptions and a Concept Consistency Score are attached to the heads of
the last layers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from surgery import metrics
from surgery.audit.ablation import SweepOptions, SweepResult, ablation_sweep, check_head_options, gradient_scores
from surgery.audit.cav import zero_shot_cavs
from surgery.audit.ccs import EmbeddingJudge
from surgery.audit.decompose import (
    final_linear_parts,
    head_contributions,
    pooled_embedding,
    pooled_forward,
    tower_inputs,
)
from surgery.audit.head_scores import GroupAccuracyAccumulator, SeparationAccumulator, head_table, mean_rank, spearman
from surgery.audit.head_set import HeadSetOptions, propose_head_set
from surgery.audit.probe import ProbeSet
from surgery.audit.textspan import load_pool, textspan
from surgery.edit.plan import HeadEdit, SurgeryPlan
from surgery.errors import SurgeryError
from surgery.model.attention import head_masked
from surgery.model.encode import text_embeddings
from surgery.model.towers import get_towers

log = logging.getLogger(__name__)

SCORES = ("cav", "group_acc", "gradient", "ablation")
#: Heads the ablation sweep (c) ablates by default: the top of the cheap ranking. The set searches
#: measure at most 16 heads per step (the audit's ``confirm``; debias's is 4), and the sweep only
#: orders those; a model with at most 16 heads (every world model) is swept whole. ViT-B/32 (144
#: heads): 16 of them, about a fifth of the full sweep's work (issue 25, benchmarks/RESULTS.md).
DEFAULT_SWEEP_TOP = 16
CHEAP_SCORES = ("cav", "group_acc", "gradient")


@dataclass
class AuditOptions:
    k: int = 50  # MaxSkew@K of the neutral queries
    top_k: int = 3  # at most this many heads in the proposed plan (chosen as a set, see surgery.audit.head_set)
    max_accuracy_drop: float = 0.02  # concept accuracy (fraction) the proposed set may cost on the probe
    confirm: int = 16  # heads measured per step of the set search (the rest only predicted)
    propose: bool = True  # choose the proposed set (off: scores only, an empty plan; debias searches itself)
    batch_size: int = 64  # probe images per forward pass
    ablation: str = "mean"  # how heads are removed: "mean" | "zero"
    backend: str = "auto"  # attention backend (triton on CUDA)
    sweep: bool = True  # run the causal sweep (c); off: cheap scores only
    # the sweep (c) ablates only these many heads, the first of the cheap ranking (mean rank of a, b
    # and the gradient d); None: every head (``--sweep all``). Unswept heads have no (c) figure
    sweep_top: int | None = DEFAULT_SWEEP_TOP
    # autocast dtype for the sweep (c) alone (bf16 on CUDA; None: fp32). The sweep only ranks heads and
    # shortlists set candidates; the decomposition (a, b), the gradient (d), the head means and every
    # measured head set (the plan's before/after figures) stay fp32
    sweep_autocast: torch.dtype | None = None
    cuda_graphs: bool = True  # on CUDA: replay the sweep's fixed-shape masked forwards as CUDA graphs
    textspan_layers: int = 4  # TextSpan + CCS for the heads of the last this-many layers (0: none)
    textspan_images: int = 512  # probe images used for TextSpan
    textspan_iterations: int = 5  # descriptions per head

    def __post_init__(self) -> None:
        check_head_options(self, SurgeryError)
        if not 0 <= self.max_accuracy_drop <= 1:
            raise SurgeryError(f"max_accuracy_drop must be a fraction in [0, 1], got {self.max_accuracy_drop}")
        if self.confirm < 1:
            raise SurgeryError(f"confirm must be >= 1, got {self.confirm}")
        if self.sweep_top is not None and (isinstance(self.sweep_top, bool) or not isinstance(self.sweep_top, int)
                                           or self.sweep_top < 1):
            raise SurgeryError(f"--sweep-top must be an integer >= 1 (or --sweep all), got {self.sweep_top!r}")


@dataclass
class AuditResult:
    scores: dict[str, torch.Tensor]  # name -> (L, H); higher = more bias carried by the head
    accuracy_drop: torch.Tensor | None  # (L, H) concept accuracy lost by ablating the head
    cheap_rank: list[tuple[int, int]]  # heads by mean rank of the cheap scores, best first
    baseline: dict  # unedited model: max_skew, accuracy, surrogate
    spearman_gradient_vs_ablation: float | None
    means: torch.Tensor  # (L, H, d) head means over the probe set
    plan: SurgeryPlan
    descriptions: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    ccs: dict[tuple[int, int], dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sweep: SweepResult | None = None  # the causal sweep's per-image scores (c), when it ran (not serialised)

    def to_dict(self) -> dict:
        heads = head_table(self.scores, self.cheap_rank, {"accuracy_drop": self.accuracy_drop})
        for entry in heads:
            key = (entry["layer"], entry["head"])
            if key in self.descriptions:
                entry["descriptions"] = self.descriptions[key]
            if key in self.ccs:
                entry["ccs"] = self.ccs[key]
        swept = None if self.sweep is None or self.sweep.swept is None else \
            [[int(l), int(h)] for l, h in self.sweep.swept.nonzero().tolist()]
        return {"baseline": self.baseline, "spearman_gradient_vs_ablation": self.spearman_gradient_vs_ablation,
                "swept_heads": swept, "heads": heads, "plan": self.plan.to_dict(), "timings": self.timings}


def projections(model: nn.Module, probe: ProbeSet, directions: torch.Tensor, batch_size: int,
                keep_layers: int = 0, keep_images: int = 0, query_emb: torch.Tensor | None = None,
                backend: str = "sdpa"):
    """One streamed decomposition pass: head contributions projected on ``directions`` (K, D),
    (N, L, H, K); the full contributions (n_keep, keep_layers, H, D) of the last ``keep_layers``
    layers for the first ``keep_images`` images (for TextSpan) or None; and, with ``query_emb``
    (Q, D), the queries' cosine scores against the embeddings (Q, N) or None; and every head's
    mean output over images and tokens (L, H, d), for mean ablation.

    Only the class token's head outputs are projected (never every token's), straight onto the
    directions: ``c . u = (gamma * centre(W_O z)) / sigma . (P u)`` (:mod:`surgery.audit.decompose`),
    and the last block runs for the class token only (:func:`surgery.audit.decompose.pooled_forward`).
    """
    view = get_towers(model)["vision"]
    device = next(model.parameters()).device
    dirs = directions.to(device)
    out, kept, scores = [], [], []
    n_kept, sums, count = 0, None, 0
    with torch.no_grad(), head_masked(model, towers=("vision",), backend=backend):
        for images, _ in probe.batches(batch_size):
            x, mask, index = tower_inputs(model, "vision", images.to(device))
            residual, pooled, head_sums = pooled_forward(view, x, mask, index, capture=True, head_sums=True)
            sums = head_sums.double() if sums is None else sums + head_sums.double()
            count += x.shape[0] * x.shape[1]
            sigma, gamma, matrix, constant = final_linear_parts(view, residual)
            parts = head_contributions(view, pooled)  # (b, L, H, C)
            parts = gamma * (parts - parts.mean(dim=-1, keepdim=True)) / sigma.view(-1, 1, 1, 1)
            out.append((parts @ (matrix @ dirs.T)).cpu())  # (b, L, H, K)
            if query_emb is not None:
                emb = F.normalize(pooled_embedding(view, residual), dim=-1)
                scores.append((query_emb.to(device) @ emb.T).cpu())  # (Q, b)
            if keep_layers and n_kept < keep_images:
                take = min(keep_images - n_kept, x.shape[0])
                kept.append((parts[:take, -keep_layers:] @ matrix).cpu())  # (take, keep_layers, H, D)
                n_kept += take
    means = (sums / count).float().cpu()
    return torch.cat(out), (torch.cat(kept) if kept else None), (torch.cat(scores, 1) if scores else None), means


def _n_tokens(model: nn.Module) -> int:
    return int(model.visual.positional_embedding.shape[0])


def audit_vision(model: nn.Module, probe: ProbeSet, tokenizer: dict, options: AuditOptions | None = None,
                 extra_descriptions: list[str] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> AuditResult:
    """Score every vision head (a, b, c, d), rank them, describe the last layers, propose a plan."""
    opt = options or AuditOptions()
    view = get_towers(model)["vision"]
    if len(probe) < opt.k:
        raise SurgeryError(f"K={opt.k} is larger than the {len(probe)} probe images; lower --k or add images")
    embed = lambda texts: text_embeddings(model, texts, tokenizer)  # noqa: E731
    timings: dict[str, float] = {}
    start = time.perf_counter()
    query_emb = embed(probe.queries)  # (Q, D)
    class_emb = embed(probe.class_prompts) if probe.class_prompts else None
    group_emb = embed(probe.group_prompts)  # (G, D)
    G = len(probe.group_names)
    cavs = zero_shot_cavs(embed, {name: [prompt] for name, prompt in zip(probe.group_names, probe.group_prompts)},
                          attribute=probe.attribute)
    basis = cavs.basis().T  # (k, D): orthonormal span of the CAVs (k = 1 for two groups)
    directions = torch.cat([basis, group_emb])  # (k + G, D): everything (a) and (b) need from a head
    keep_layers = min(opt.textspan_layers, view.n_layers)
    texts = query_emb if class_emb is None else torch.cat([query_emb, class_emb])  # (Q[+C], D)
    proj, kept, text_scores, means = projections(model, probe, directions, opt.batch_size, keep_layers,
                                                 opt.textspan_images, texts, backend=opt.backend)
    query_scores = text_scores[: query_emb.shape[0]]  # (Q, N)
    k = basis.shape[0]
    separation, group_acc = SeparationAccumulator(G), GroupAccuracyAccumulator(G)
    separation.update(proj[..., :k], probe.groups)
    group_acc.update(proj[..., k:], probe.groups)
    scores = {"cav": separation.result(), "group_acc": group_acc.result()}
    timings["decomposition_a_b"] = time.perf_counter() - start
    start = time.perf_counter()
    fill = means if opt.ablation == "mean" else None
    grad, surrogate = gradient_scores(model, probe, query_emb, fill, opt.k, opt.batch_size, opt.backend,
                                      scores=query_scores)
    scores["gradient"] = grad
    timings["gradient_d"] = time.perf_counter() - start
    accuracy_drop = None
    baseline = {"surrogate": surrogate}
    spearman_dc = None
    sweep = None
    ranked = mean_rank([scores[name] for name in CHEAP_SCORES])
    if opt.sweep:
        start = time.perf_counter()
        shortlist = ranked[:opt.sweep_top] if opt.sweep_top is not None and opt.sweep_top < len(ranked) else None
        sweep = ablation_sweep(model, probe, query_emb, class_emb, means,
                               SweepOptions(opt.batch_size, opt.k, opt.ablation, opt.backend,
                                            autocast=opt.sweep_autocast, cuda_graphs=opt.cuda_graphs),
                               progress=(lambda d, t: progress("ablation sweep", d, t)) if progress else None,
                               heads=shortlist)
        scores["ablation"] = sweep.bias_removed
        if sweep.accuracy is not None:
            accuracy_drop = sweep.baseline_accuracy - sweep.accuracy
        baseline.update(max_skew=sweep.baseline_max_skew, accuracy=sweep.baseline_accuracy)
        swept = sweep.swept if sweep.swept is not None else torch.ones_like(grad, dtype=torch.bool)
        spearman_dc = spearman(scores["gradient"][swept].view(1, -1), scores["ablation"][swept].view(1, -1)) \
            if int(swept.sum()) > 1 else None
        timings["ablation_sweep_c"] = time.perf_counter() - start
    else:
        baseline.update(_baseline_from_scores(text_scores, query_emb.shape[0], probe, opt.k))
    if not opt.propose:
        plan = SurgeryPlan(provenance={"method": "clipsurgery audit (scores only, no set proposed)"})
        return AuditResult(scores=scores, accuracy_drop=accuracy_drop, cheap_rank=ranked, baseline=baseline,
                           spearman_gradient_vs_ablation=spearman_dc, means=means, plan=plan, timings=timings,
                           sweep=sweep)
    start = time.perf_counter()
    chosen = propose_head_set(model, probe, fill, query_emb, class_emb, ranked,
                              HeadSetOptions(size=opt.top_k, k=opt.k, max_accuracy_drop=opt.max_accuracy_drop,
                                             confirm=opt.confirm, batch_size=max(opt.batch_size, 256)),
                              sweep=sweep)
    timings["head_set_selection"] = time.perf_counter() - start
    plan = SurgeryPlan(
        heads=[HeadEdit("vision", l, h, 0.0, opt.ablation, means[l, h].tolist() if opt.ablation == "mean" else None)
               for l, h in chosen.chosen],
        provenance={"method": "clipsurgery audit: greedy forward selection over measured set effects",
                    "candidates": ("the open heads whose added-up single-head ablation effects (c) predict the "
                                   "lowest bias" if sweep is not None else "the open heads of the cheap ranking")
                    + f", {opt.confirm} measured per step",
                    "ranking": "mean rank of (a) cav, (b) group_acc, (d) gradient (interpretability, audit.json)",
                    "attribute": probe.attribute, "k": opt.k, "max_accuracy_drop": opt.max_accuracy_drop,
                    "before": chosen.before, "after": chosen.after, "search": chosen.steps},
    ).validate()
    result = AuditResult(scores=scores, accuracy_drop=accuracy_drop, cheap_rank=ranked, baseline=baseline,
                         spearman_gradient_vs_ablation=spearman_dc, means=means, plan=plan, timings=timings,
                         sweep=sweep)
    if kept is not None and opt.textspan_iterations > 0:
        start = time.perf_counter()
        _describe_heads(result, kept, view.n_layers - keep_layers, embed, extra_descriptions or [], opt)
        timings["textspan_ccs"] = time.perf_counter() - start
    return result


def _baseline_from_scores(scores: torch.Tensor, n_queries: int, probe: ProbeSet, k: int) -> dict:
    """Unedited model's mean MaxSkew@K (and concept accuracy) from the decomposition pass's text
    scores (Q[+C], N): queries first, then class prompts. Saves a forward pass."""
    out = {"max_skew": float(metrics.max_skew_at_k(scores[:n_queries], probe.groups, k, len(probe.group_names)).mean())}
    if scores.shape[0] > n_queries and probe.concepts is not None:
        out["accuracy"] = float((scores[n_queries:].argmax(0) == probe.concepts).double().mean())
    return out


def _describe_heads(result: AuditResult, kept: torch.Tensor, first_layer: int, embed, extra: list[str],
                    opt: AuditOptions) -> None:
    """Bias-augmented TextSpan descriptions and CCS for the heads whose contributions were kept."""
    pool = list(dict.fromkeys(load_pool("bias_augmented") + extra))
    pool_emb = embed(pool)  # (M, D)
    judge = EmbeddingJudge(embed_texts=embed)
    for j in range(kept.shape[1]):
        layer = first_layer + j
        for head in range(kept.shape[2]):
            contrib = kept[:, j, head]  # (K, D)
            span = textspan(contrib, pool_emb, pool, n_components=min(80, contrib.shape[0], contrib.shape[1]),
                            iterations=opt.textspan_iterations)
            result.descriptions[(layer, head)] = list(span.texts)
            verdict = judge.judge(list(span.texts))
            result.ccs[(layer, head)] = {"label": verdict.label, "score": verdict.score}
