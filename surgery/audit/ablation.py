"""Causal and gradient head scores for the audit.

* :func:`ablation_sweep` — (c): the effect of mean- (or zero-) ablating each head on a bias metric
  (mean MaxSkew@K of the neutral queries) and on zero-shot concept accuracy. Activations are reused:
  one forward pass per batch stores the residual stream entering every layer; to ablate a head of
  layer ``l`` the sweep restarts from that stored residual, with all H heads of the layer ablated
  in one pass by stacking H copies of the batch under a (H*b, H) head mask (one configuration per
  copy), instead of re-running layers ``0..l-1`` H times.
* :func:`gradient_scores` — (d): the derivative of a differentiable bias surrogate with respect to
  every head's scale, from one backward pass per batch.

Scores are "bias removed by ablating the head": positive = ablation lowers bias.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery import metrics
from surgery.audit.decompose import final_linear_parts, pooled_embedding, pooled_forward, tower_inputs
from surgery.audit.probe import ProbeSet, edit_figures
from surgery.model.attention import HeadMaskedAttention, clear_head_edits, head_masked, set_head_edits
from surgery.model.graphs import StaticShapeGraph
from surgery.model.towers import TowerView, get_towers

ABLATIONS = ("mean", "zero")


@dataclass
class SweepOptions:
    batch_size: int = 64  # probe images per forward pass (the sweep runs H times this many at once)
    k: int = 50  # MaxSkew@K
    ablation: str = "mean"  # "mean": replace the head by its mean output; "zero": remove it
    backend: str = "auto"  # attention backend (triton on CUDA)
    # autocast dtype (bf16 on CUDA) or None (fp32). Allowed here: the sweep ranks heads and shortlists
    # set candidates; the sets the audit proposes are measured again in fp32
    autocast: torch.dtype | None = None
    cuda_graphs: bool = True  # on CUDA: full batches replay each layer's masked forward as a CUDA graph

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if self.batch_size < 1 or self.k < 1:
            raise ValueError("batch_size and k must be >= 1")


def check_head_options(options, error: type[Exception]) -> None:
    """Shared checks of the audits' options (``ablation``, ``top_k``, ``k``, ``batch_size``)."""
    if options.ablation not in ABLATIONS:
        raise error(f"ablation must be one of {', '.join(ABLATIONS)}, got {options.ablation!r}")
    if options.top_k < 1 or options.k < 1 or options.batch_size < 1:
        raise error("top_k, k and batch_size must be >= 1")


@dataclass
class SweepResult:
    baseline_max_skew: float  # mean MaxSkew@K of the unedited model
    baseline_accuracy: float | None  # zero-shot concept accuracy of the unedited model
    max_skew: torch.Tensor  # (L, H) mean MaxSkew@K with that head ablated (NaN: not swept)
    accuracy: torch.Tensor | None  # (L, H) zero-shot concept accuracy with that head ablated (NaN: not swept)
    scores: torch.Tensor | None = None  # (L, H, Q[+C], N) text-image scores with that head ablated (NaN: not swept)
    base_scores: torch.Tensor | None = None  # (Q[+C], N) the unedited model's; queries first
    swept: torch.Tensor | None = None  # (L, H) bool: the heads the sweep ablated (None: every head)

    @property
    def bias_removed(self) -> torch.Tensor:
        """(L, H): baseline minus ablated MaxSkew (positive = the head carries bias; NaN: not swept)."""
        return self.baseline_max_skew - self.max_skew

    def was_swept(self, head: tuple[int, int]) -> bool:
        return self.swept is None or bool(self.swept[head])


def embed_tail(view: TowerView, x: torch.Tensor, start: int, mask, index, post=None,
               normalize: bool = True) -> torch.Tensor:
    """Run blocks ``start..L-1`` on residual x (b, N, C); embeddings (b, D), L2-normalised unless
    ``normalize`` is False (``post`` is applied before normalising)."""
    for block in view.blocks[start:]:
        x = block(x, attn_mask=mask)
    rows = torch.arange(x.shape[0], device=x.device)
    residual = x[rows, index]
    _, _, matrix, constant = final_linear_parts(view, residual)
    norm = view.final_norm
    bias_part = norm.bias @ matrix if norm.bias is not None else 0
    emb = norm(residual) @ matrix + constant - bias_part
    emb = post(emb) if post is not None else emb
    return F.normalize(emb, dim=-1) if normalize else emb


def layer_inputs(view: TowerView, x: torch.Tensor, mask) -> list[torch.Tensor]:
    inputs = []
    for block in view.blocks:
        inputs.append(x)
        x = block(x, attn_mask=mask)
    return inputs


@torch.no_grad()
def head_means(model: nn.Module, probe: ProbeSet, tower: str = "vision", batch_size: int = 64) -> torch.Tensor:
    """(L, H, d): each head's output z_h averaged over probe images and tokens."""
    view = get_towers(model)[tower]
    device = next(model.parameters()).device
    total = torch.zeros(view.n_layers, view.n_heads, view.head_dim, dtype=torch.float64, device=device)
    count = 0
    with head_masked(model, towers=(tower,), backend="sdpa"):
        for images, _ in probe.batches(batch_size):
            x, mask, _ = tower_inputs(model, tower, images.to(device))
            for layer, block in enumerate(view.blocks):
                attn: HeadMaskedAttention = block.attn
                attn.capture = True
                try:
                    x = block(x, attn_mask=mask)
                    total[layer] += attn.captured.double().sum((0, 2))  # (H, d) from (b, H, N, d)
                finally:
                    attn.capture, attn.captured = False, None
            count += images.shape[0] * x.shape[1]
    return (total / count).float()


@torch.no_grad()
def ablation_sweep(model: nn.Module, probe: ProbeSet, query_emb: torch.Tensor, class_emb: torch.Tensor | None,
                   means: torch.Tensor | None, options: SweepOptions | None = None,
                   progress=None, heads=None) -> SweepResult:
    """(c) for every vision head, or only for ``heads`` (a list of (layer, head): the shortlist;
    the others' figures are NaN and ``swept`` says which ran). query_emb (Q, D), class_emb (C, D):
    normalised text embeddings. Layers with no swept head are not re-run at all."""
    opt = options or SweepOptions()
    tower = "vision"
    view = get_towers(model)[tower]
    device = next(model.parameters()).device
    L, H = view.n_layers, view.n_heads
    n = len(probe)
    swept = torch.ones(L, H, dtype=torch.bool)
    if heads is not None:
        swept = torch.zeros(L, H, dtype=torch.bool)
        for layer, head in heads:
            swept[layer, head] = True
    rows = [swept[layer].nonzero().flatten().tolist() for layer in range(L)]  # heads ablated per layer
    texts = query_emb if class_emb is None else torch.cat([query_emb, class_emb])  # (Q[+C], D)
    texts = texts.to(device)
    scores = torch.full((L, H, texts.shape[0], n), float("nan"))  # (L, H, Q+C, N) on the CPU
    base = torch.empty(texts.shape[0], n)
    ablate = torch.ones(H, H, device=device) - torch.eye(H, device=device)  # row j: head j off
    fill = means.to(device) if (means is not None and opt.ablation == "mean") else None
    autocast = (torch.autocast(device.type, dtype=opt.autocast, cache_enabled=False)  # no cache: graph capture
                if opt.autocast is not None else contextlib.nullcontext())
    with head_masked(model, towers=(tower,), backend=opt.backend), autocast:
        mods = [block.attn for block in view.blocks]
        tails = [functools.partial(_ablated_tail, view, layer, mods[layer], fill[layer] if fill is not None else None)
                 for layer in range(L)]
        graphs = [StaticShapeGraph(tail, enabled=opt.cuda_graphs) for tail in tails]
        for done, (images, sl) in enumerate(probe.batches(opt.batch_size)):
            images = images.to(device)
            b = images.shape[0]
            x, mask, index = tower_inputs(model, tower, images)
            inputs = layer_inputs(view, x, mask)
            # .float() after the product too: under autocast the matmul itself comes out in bf16/fp16
            base[:, sl] = (texts @ embed_tail(view, inputs[0], 0, mask, index).float().T).float().cpu()
            for layer in range(L):
                if not rows[layer]:
                    continue
                h = len(rows[layer])
                head_mask = ablate[rows[layer]].repeat_interleave(b, dim=0)  # (h*b, H): copy j ablates head rows[j]
                stacked = inputs[layer].repeat(h, 1, 1)  # (h*b, N, C)
                index_h = index.repeat(h)  # (h*b,)
                # graphs for full batches of a maskless (vision) tower; the last, smaller batch runs eagerly
                if mask is None and b == opt.batch_size:
                    emb = graphs[layer](stacked, index_h, head_mask)  # (h*b, D)
                else:
                    emb = tails[layer](stacked, index_h, head_mask, mask)  # (h*b, D)
                scores[layer, rows[layer], :, sl] = (
                    (texts @ emb.float().T).float().view(texts.shape[0], h, b).permute(1, 0, 2).cpu())
            if progress:
                progress(min(sl.stop, n), n)
    q = query_emb.shape[0]
    n_groups = len(probe.group_names)
    nan = float("nan")
    skew = lambda s: float(metrics.max_skew_at_k(s, probe.groups, opt.k, n_groups).mean())  # noqa: E731
    max_skew = torch.tensor([[skew(scores[l, h, :q]) if swept[l, h] else nan for h in range(H)] for l in range(L)])
    accuracy = base_acc = None
    if class_emb is not None:
        acc = lambda s: float((s.argmax(0) == probe.concepts).double().mean())  # noqa: E731
        accuracy = torch.tensor([[acc(scores[l, h, q:]) if swept[l, h] else nan for h in range(H)] for l in range(L)])
        base_acc = acc(base[q:])
    return SweepResult(skew(base[:q]), base_acc, max_skew, accuracy, scores, base,
                       swept=None if heads is None else swept)


def _ablated_tail(view: TowerView, layer: int, attn: HeadMaskedAttention, fill: torch.Tensor | None,
                  stacked: torch.Tensor, index: torch.Tensor, head_mask: torch.Tensor, mask=None) -> torch.Tensor:
    """Embeddings (H*b, D) of blocks ``layer..L-1`` on ``stacked`` (H*b, N, C) with ``head_mask``
    (H*b, H) (and the mean ``fill`` (H, d)) on that layer's attention; the mask is removed after."""
    attn.set_head_mask(head_mask)
    attn.set_head_fill(fill)
    try:
        return embed_tail(view, stacked, layer, mask, index)
    finally:
        attn.set_head_mask(None)
        attn.set_head_fill(None)


def soft_topk_params(scores: torch.Tensor, k: int, tau_mult: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (Q, 1): the K-th largest score (threshold) and a temperature ``tau_mult`` x the std
    of its top-2K scores. Fixed at the unedited model, they define the surrogate below."""
    top = scores.topk(min(2 * k, scores.shape[1]), dim=1).values  # (Q, 2K)
    threshold = top[:, k - 1:k]
    tau = (top.std(dim=1, keepdim=True) * tau_mult).clamp_min(1e-6)
    return threshold, tau


def soft_max_skew(scores: torch.Tensor, groups: torch.Tensor, n_groups: int, threshold: torch.Tensor,
                  tau: torch.Tensor) -> torch.Tensor:
    """Differentiable stand-in for mean MaxSkew@K: soft top-K group shares, KL to uniform.

    ``w_qi = sigmoid((s_qi - threshold_q) / tau_q)`` is a soft membership of image i in query q's
    top K; ``share_qg = sum_{i in g} w_qi / sum_i w_qi``; the result is
    ``mean_q sum_g share_qg ln(share_qg * G)`` (0 when the soft top-K is balanced).
    scores (Q, N), groups (N,).
    """
    w = torch.sigmoid((scores - threshold) / tau)  # (Q, N)
    onehot = torch.nn.functional.one_hot(groups, n_groups).to(w.dtype)  # (N, G)
    share = (w @ onehot) / w.sum(1, keepdim=True)  # (Q, G)
    return (share * torch.log(share * n_groups + 1e-12)).sum(1).mean()


def pooled_scores(model: nn.Module, probe: ProbeSet, query_emb: torch.Tensor, batch_size: int = 64,
                  backend: str = "auto") -> torch.Tensor:
    """(Q, N) cosine scores of the queries against the unedited model's image embeddings (a
    no-grad pass that runs the last block for the class token only)."""
    view = get_towers(model)["vision"]
    device = next(model.parameters()).device
    q_emb = query_emb.to(device)
    out = []
    with torch.no_grad(), head_masked(model, towers=("vision",), backend=backend):
        for imgs, _ in probe.batches(batch_size):
            x, mask, index = tower_inputs(model, "vision", imgs.to(device))
            residual, _, _ = pooled_forward(view, x, mask, index)
            out.append((q_emb @ F.normalize(pooled_embedding(view, residual), dim=-1).T).cpu())  # (Q, b)
    return torch.cat(out, dim=1)


def surrogate_gradient(scores: torch.Tensor, groups: torch.Tensor, n_groups: int, k: int) -> tuple[torch.Tensor, float]:
    """dS/dscores (Q, N) and S for the soft MaxSkew surrogate with its constants fixed at ``scores``."""
    scores = scores.detach().clone()
    threshold, tau = soft_topk_params(scores, k)
    scores.requires_grad_(True)
    with torch.enable_grad():
        value = soft_max_skew(scores, groups, n_groups, threshold, tau)
        (d_scores,) = torch.autograd.grad(value, scores)  # (Q, N)
    return d_scores, value.item()


def gradient_scores(model: nn.Module, probe: ProbeSet, query_emb: torch.Tensor, means: torch.Tensor | None,
                    k: int = 50, batch_size: int = 64, backend: str = "auto",
                    scores: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(d): (L, H) first-order bias removed by ablating each head, ``dS/ds_h`` at s = 1, and S.

    S is :func:`soft_max_skew` of the neutral queries. With ``means`` each head moves along the
    mean-ablation direction (z_h - mean_h), else toward 0. Exact and streamed in two passes: the
    scores (Q, N) and dS/dscores without a graph (pass ``scores`` if already computed, e.g. by
    the decomposition pass), then one forward and backward per batch of ``sum(dS/ds * s)`` to the
    head scales alone: weights are frozen (no weight gradient), the input needs none, and the last
    block runs for the class token only (:func:`surgery.audit.decompose.pooled_forward`).
    """
    if scores is None:
        scores = pooled_scores(model, probe, query_emb, batch_size, backend)
    d_scores, value = surrogate_gradient(scores, probe.groups, len(probe.group_names), k)
    return head_scale_gradient(model, probe, query_emb, d_scores, means, batch_size, backend), value


def head_scale_gradient(model: nn.Module, probe: ProbeSet, query_emb: torch.Tensor, d_scores: torch.Tensor,
                        means: torch.Tensor | None, batch_size: int = 64, backend: str = "auto") -> torch.Tensor:
    """(L, H): ``sum_qi d_scores[q, i] * d score_qi / d s_h`` at s = 1 (mean fill with ``means``)."""
    tower = "vision"
    view = get_towers(model)[tower]
    device = next(model.parameters()).device
    q_emb = query_emb.to(device)
    frozen = [p for p in model.parameters() if p.requires_grad]
    mask = torch.ones(view.n_layers, view.n_heads, device=device, dtype=q_emb.dtype, requires_grad=True)
    grad = torch.zeros(view.n_layers, view.n_heads, device=device, dtype=q_emb.dtype)
    with head_masked(model, towers=(tower,), backend=backend), frozen_weights(frozen), torch.enable_grad():
        for layer, block in enumerate(view.blocks):
            block.attn.set_head_mask(mask[layer])
            block.attn.set_head_fill(means[layer].to(device) if means is not None else None)
        try:
            for imgs, sl in probe.batches(batch_size):
                x, attn_mask, index = tower_inputs(model, tower, imgs.to(device))
                residual, _, _ = pooled_forward(view, x, attn_mask, index)
                emb = F.normalize(pooled_embedding(view, residual), dim=-1)  # (b, D)
                seed = d_scores[:, sl].to(device=device, dtype=emb.dtype)  # (Q, b)
                (g,) = torch.autograd.grad(((seed.T @ q_emb) * emb).sum(), mask)
                grad += g
        finally:
            for block in view.blocks:
                block.attn.set_head_mask(None)
                block.attn.set_head_fill(None)
    return grad.detach().cpu()


@contextlib.contextmanager
def frozen_weights(params: list[torch.Tensor]):
    """Turn off weight gradients for a backward that only needs the head-scale gradients."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@torch.no_grad()
def head_edited_embeddings(model: nn.Module, probe: ProbeSet, heads, means: torch.Tensor | None,
                           batch_size: int = 256, backend: str = "auto") -> torch.Tensor:
    """(N, D) unnormalised image embeddings of ``probe`` with ``heads`` edited (mean-filled if
    ``means``): a list of (layer, head) removed entirely, or a dict (layer, head) -> kept scale."""
    view = get_towers(model)["vision"]
    device = next(model.parameters()).device
    kept = heads if isinstance(heads, dict) else {tuple(h): 0.0 for h in heads}
    scales = torch.ones(view.n_layers, view.n_heads, device=device)  # (L, H)
    for (layer, head), value in kept.items():
        scales[layer, head] = value
    with head_masked(model, towers=("vision",), backend=backend):
        set_head_edits(model, "vision", scales, means.to(device) if means is not None else None)
        try:
            out = []
            for imgs, _ in probe.batches(batch_size):
                x, mask, index = tower_inputs(model, "vision", imgs.to(device))
                out.append(embed_tail(view, x, 0, mask, index, normalize=False).float().cpu())
        finally:
            clear_head_edits(model, "vision")
    return torch.cat(out)


@torch.no_grad()
def evaluate_head_set(model: nn.Module, probe: ProbeSet, heads, means: torch.Tensor | None,
                      query_emb: torch.Tensor, class_emb: torch.Tensor | None = None, k: int = 50,
                      batch_size: int = 256, backend: str = "auto", post=None,
                      caption_emb: torch.Tensor | None = None) -> dict:
    """Mean MaxSkew@K (and concept accuracy) with ``heads`` ablated together (mean if ``means``).

    ``heads``: a list of (layer, head) removed entirely, or a dict (layer, head) -> kept scale.
    ``post``: optional map applied to the (unnormalised, float32, CPU) embeddings, e.g. an
    embedding-site neuron deactivation (residual-site ones run as hooks on the final norm by
    themselves). ``caption_emb (N, D)``: the text embedding of each probe image's caption
    (``probe.captions``); adds ``recall``, text->image hit@5 with identical captions merged, and
    ``recall_i2t``.
    """
    emb = head_edited_embeddings(model, probe, heads, means, batch_size, backend)  # (N, D)
    if post is not None:
        emb = post(emb)
    return edit_figures(F.normalize(emb, dim=-1), probe, query_emb, class_emb, k, caption_emb)
