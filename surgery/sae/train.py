"""Training an SAE from an activation cache, with checkpoints and exact resume.

Batches are contiguous ``batch_size``-row slices of the cache's (pre-shuffled) shards, visited in
an order that depends only on ``(seed, epoch)``; so step ``s`` always sees the same rows and a run
resumed from a checkpoint at step ``s`` ends with the same weights as one never interrupted.
The checkpoint (``checkpoint.safetensors``: SAE state, Adam moments, dead-latent counters, step)
is replaced atomically, so an interruption never leaves it half-written.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from surgery.io.checkpoint import write_safetensors
from surgery.runtime.distributed import Ranks, agree
from surgery.sae.activations import ActivationCache
from surgery.sae.model import (
    B_DEC_INITS,
    BatchKth,
    SAEConfig,
    SAEError,
    SparseAutoencoder,
    aux_k_loss,
    l1_loss,
    reconstruction_loss,
    save_sae,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.json"
Progress = Callable[[int, int, float], None]  # (step, total steps, loss)
#: Inputs at least this wide train on the sparse path (2 CPU cores, F = 8 D, k = 8, B = 1024: as fast as
#: dense at D = 64 (0.99x), 1.8x faster at D = 512 (0.56x); `python benchmarks/bench_sae_sparse.py`, 2026-12-04).
SPARSE_MIN_WIDTH = 256


@dataclass
class TrainOptions:
    steps: int = 2000  # optimiser steps (batches); the cache is cycled as often as needed
    # passes over the cache's rows instead of ``steps`` (None: use ``steps``): the run's length then
    # follows the data (steps = ceil(epochs x the cache's batches per pass), at most ``steps``)
    epochs: float | None = None
    # stop at an epoch's end once its mean loss improved on the best earlier epoch's by less than this
    # fraction (0: never; the learning-rate decay is then skipped: the plateau says it is not needed)
    plateau: float = 0.0
    min_epochs: int = 3  # epochs before the plateau rule may stop the run
    batch_size: int = 1024  # rows per step (BatchTopK keeps k * batch_size activations per batch)
    lr: float = 4e-4  # Adam learning rate (peak)
    warmup_steps: int = 50  # linear warm-up from 0
    decay_fraction: float = 0.2  # last fraction of steps: linear decay to 0
    seed: int = 0  # initialisation and batch order
    b_dec_init: str = "geometric_median"  # "geometric_median" | "mean" | "zeros" (from a data sample)
    init_rows: int = 8192  # rows read to fit the normalisation and b_dec
    checkpoint_every: int = 500  # steps between checkpoints (0 = only at the end)
    checkpoint_dir: str | None = None  # where checkpoint.safetensors lives; None = no checkpoints
    resume: bool = True  # continue from checkpoint_dir's checkpoint when there is one
    threads: int | None = None  # torch intra-op threads during training (None: leave as is)
    device: str = "cpu"  # where the SAE trains ("cpu", "cuda", "cuda:N"); fp32 either way, returned on the CPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "init_rows"):
            if getattr(self, name) < 1:
                raise SAEError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise SAEError("warmup_steps and checkpoint_every must be >= 0")
        if not 0 < self.lr < 1:
            raise SAEError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise SAEError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.epochs is not None and not self.epochs > 0:
            raise SAEError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.plateau < 1 or self.min_epochs < 1:
            raise SAEError(f"plateau must be in [0, 1) and min_epochs >= 1, got {self.plateau}, {self.min_epochs}")

    def for_batches(self, batches: int) -> "TrainOptions":
        """These options with ``epochs`` turned into steps, for ``batches`` batches per pass over the cache."""
        if self.epochs is None:
            return self
        steps = min(self.steps, max(1, math.ceil(self.epochs * batches)))
        return replace(self, steps=steps, epochs=None)
        if self.b_dec_init not in B_DEC_INITS:
            raise SAEError(f"unknown b_dec_init {self.b_dec_init!r}; allowed: {', '.join(B_DEC_INITS)}")


@dataclass
class SAEMetrics:
    nmse: float  # sum ||x - x_hat||^2 / sum ||x - mean x||^2 (0 = perfect)
    explained_variance: float  # 1 - total variance of the residual / total variance of x
    l0: float  # mean number of non-zero latents per row (inference activation)
    dead_fraction: float  # latents that never fire on the evaluated rows
    rows: int  # rows evaluated
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ batch order
def _chunks(cache: ActivationCache, batch_size: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) slices of ``batch_size`` rows; a shard's remainder is dropped unless the
    shard is smaller than a batch."""
    out = []
    for i, info in enumerate(cache.shards):
        n = info["rows"]
        if n < batch_size:
            out.append((i, 0, n))
            continue
        out.extend((i, s, s + batch_size) for s in range(0, n - batch_size + 1, batch_size))
    return out


def _epoch_order(n_chunks: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_chunks, generator=gen)


def _lr_factor(step: int, opt: TrainOptions) -> float:
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    decay_start = int(opt.steps * (1 - opt.decay_fraction))
    if opt.decay_fraction > 0 and step >= decay_start:
        return max(0.0, (opt.steps - step) / max(1, opt.steps - decay_start))
    return 1.0


# -------------------------------------------------------------------------------------- the loop
@dataclass
class StepResult:
    loss: torch.Tensor  # () scalar to backpropagate
    fired: torch.Tensor  # (F,) bool: latents non-zero on some row of the batch
    min_active: torch.Tensor | None  # () smallest non-zero activation (BatchTopK threshold update)


def training_step(sae: SparseAutoencoder, x: torch.Tensor, rows_since_fired: torch.Tensor,
                  sparse: bool | None = None, batch_kth: BatchKth | None = None) -> StepResult:
    """Loss for one batch x (B, D). ``rows_since_fired`` (F,) marks dead latents (auxiliary-k).

    ``batch_kth``: when x is this rank's share of a batch split over ranks, the BatchTopK selection
    over the whole batch (:data:`surgery.sae.model.BatchKth`); None: x is the whole batch.

    ``sparse`` (default: TopK / BatchTopK without Matryoshka prefixes and ``d_in >= SPARSE_MIN_WIDTH``): the
    latents are chosen from pre-activations computed without autograd, then only the chosen ones are
    recomputed with autograd (a gather of k encoder columns per row) and decoded with
    ``embedding_bag`` (k decoder rows per row). Same values and gradients as the dense path (the
    top-k's gradient reaches only the chosen latents), at O(B k D) instead of O(B F D) for everything
    but the one selection matmul.
    """
    cfg = sae.cfg
    if sparse is None:
        sparse = cfg.kind in ("topk", "batchtopk") and not cfg.matryoshka and cfg.d_in >= SPARSE_MIN_WIDTH
    if sparse:
        return _sparse_step(sae, x, rows_since_fired, batch_kth)
    out = sae.run(x, batch_topk=True, batch_kth=batch_kth)
    loss = reconstruction_loss(out.x_norm, out.x_hat_norm)
    if cfg.matryoshka:
        partial = torch.stack([reconstruction_loss(out.x_norm, p) for p in out.aux["matryoshka"]]).mean()
        loss = (loss + partial * len(cfg.matryoshka)) / (1 + len(cfg.matryoshka))
    if cfg.kind == "relu" and cfg.l1_coeff > 0:
        loss = loss + cfg.l1_coeff * l1_loss(out.z)
    if cfg.aux_coeff > 0:
        dead = rows_since_fired >= cfg.dead_after
        if dead.any():
            loss = loss + cfg.aux_coeff * aux_k_loss(out.x_norm, out.x_hat_norm, out.pre, dead, sae.W_dec, cfg.aux_k)
    z = out.z.detach()
    active = z > 0
    min_active = torch.where(active, z, torch.full_like(z, math.inf)).amin() if cfg.kind == "batchtopk" else None
    if min_active is not None and not math.isfinite(float(min_active)):
        min_active = None
    return StepResult(loss, active.any(0), min_active)


def _gathered(sae: SparseAutoencoder, xc: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """relu(pre[rows, cols]) with autograd: (n,), from centred inputs xc (B, D)."""
    w = F.embedding(cols, sae.W_enc.t())  # (n, D) encoder columns
    return F.relu((xc[rows] * w).sum(-1) + sae.b_enc[cols])


def _sparse_step(sae: SparseAutoencoder, x: torch.Tensor, rows_since_fired: torch.Tensor,
                 batch_kth: BatchKth | None = None) -> StepResult:
    cfg = sae.cfg
    b = x.shape[0]
    x_n = sae.normalise(x)  # (B, D)
    xc = x_n - sae.b_dec  # (B, D), autograd reaches b_dec
    with torch.no_grad():
        pre = xc @ sae.W_enc + sae.b_enc  # (B, F) selection only
        if cfg.kind == "topk":
            cols = pre.topk(cfg.k, dim=-1).indices.reshape(-1)  # (B k,)
            rows = torch.arange(b, device=x.device).repeat_interleave(cfg.k)
        else:
            flat = F.relu(pre).reshape(-1)
            if batch_kth is None:
                keep = flat.topk(min(cfg.k * b, flat.numel())).indices.sort().values  # row-major order
            else:  # this rank's entries of the whole batch's top-k
                kth = batch_kth(flat, cfg.k)
                keep = ((flat >= kth) & (flat > 0)).nonzero().squeeze(1)
            rows, cols = keep // cfg.width, keep % cfg.width
    vals = _gathered(sae, xc, rows, cols)  # (n,)
    offsets = torch.searchsorted(rows, torch.arange(b, device=x.device))  # (B,) start of each row's latents
    x_hat_n = F.embedding_bag(cols, sae.W_dec, offsets, mode="sum", per_sample_weights=vals) + sae.b_dec
    loss = reconstruction_loss(x_n, x_hat_n)
    if cfg.aux_coeff > 0:
        dead = rows_since_fired >= cfg.dead_after
        n_dead = int(dead.sum())
        if n_dead:
            k_aux = min(cfg.aux_k, n_dead)
            with torch.no_grad():
                masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
                a_cols = masked.topk(k_aux, dim=-1).indices.reshape(-1)
            a_rows = torch.arange(b, device=x.device).repeat_interleave(k_aux)
            a_vals = _gathered(sae, xc, a_rows, a_cols)
            e_hat = F.embedding_bag(a_cols, sae.W_dec, torch.arange(0, b * k_aux, k_aux, device=x.device), mode="sum",
                                    per_sample_weights=a_vals)
            aux = (e_hat - (x_n - x_hat_n).detach()).pow(2).sum(-1).mean()
            loss = loss + cfg.aux_coeff * aux
    with torch.no_grad():
        active = vals.detach() > 0
        fired = torch.zeros(cfg.width, dtype=torch.bool, device=x.device)
        fired[cols[active]] = True
        min_active = None
        if cfg.kind == "batchtopk" and bool(active.any()):
            min_active = vals.detach()[active].min()
    return StepResult(loss, fired, min_active)


def train_sae(cache: ActivationCache, cfg: SAEConfig, options: TrainOptions | None = None,
              progress: Progress | None = None, model_hash: str | None = None,
              ranks: Ranks | None = None) -> tuple[SparseAutoencoder, dict]:
    """Train an SAE on ``cache``; returns (SAE in eval mode, history).

    ``model_hash``: when given, the cache must come from that model. ``cfg.d_in`` must equal the
    cache's width. With ``options.checkpoint_dir`` a checkpoint is written every
    ``checkpoint_every`` steps and at the end, and (``resume``) picked up on the next call.

    ``ranks``: data-parallel training over a torch.distributed job (every rank calls this alike).
    Each step's batch of ``batch_size`` rows is split over the ranks; the BatchTopK selection is
    made over the whole batch (each rank's top values gathered), the gradients are summed over
    ranks (each rank's loss weighted by its share of rows), the dead-latent counters and the
    threshold update are reduced over ranks, and every rank takes the same Adam step and decoder
    renormalisation: the same run as one process with the same batch, up to float summation order.
    Rank 0 writes the checkpoints (``checkpoint_dir`` must be on storage every rank reads).
    """
    opt = options or TrainOptions()
    opt = opt.for_batches(len(_chunks(cache, opt.batch_size)))
    if model_hash:
        cache.check_model(model_hash)
    if cfg.d_in != cache.d:
        raise SAEError(f"SAE d_in={cfg.d_in} but the cache rows have width {cache.d}; use d_in={cache.d}")
    if not cfg.model_hash:
        cfg.model_hash = cache.model_hash
    old_threads = torch.get_num_threads()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    ranks = ranks or Ranks()
    agree(ranks, {"cache": f"{cache.model_hash}/{cache.rows}/{cache.d}", "config": json.dumps(cfg.to_dict()),
                  "options": json.dumps(_resume_key(opt))})
    try:
        return _train(cache, cfg, opt, progress, ranks)
    finally:
        torch.set_num_threads(old_threads)


def _share(a: int, b: int, ranks: Ranks) -> tuple[int, int]:
    """This rank's rows [lo, hi) of the batch rows [a, b) (near-equal contiguous pieces, in rank order)."""
    n = b - a
    return a + n * ranks.rank // ranks.world, a + n * (ranks.rank + 1) // ranks.world


def _global_kth(ranks: Ranks, rows: int) -> BatchKth:
    """BatchTopK over a batch of ``rows`` rows split over ``ranks``: every rank's largest values are
    gathered, and the smallest of the batch's top ``k * rows`` is the cut-off."""
    def kth(flat: torch.Tensor, k: int) -> torch.Tensor:
        n_keep = k * rows
        local = flat.topk(min(n_keep, flat.numel())).values  # only these can be in the batch's top
        return ranks.all_gather_padded(local, n_keep, -math.inf).topk(n_keep).values[-1]

    return kth


def _all_reduce_grads(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Sum gradients over ranks, in one flat buffer (one collective per step)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = ranks.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _train(cache: ActivationCache, cfg: SAEConfig, opt: TrainOptions, progress: Progress | None, ranks: Ranks):
    torch.manual_seed(opt.seed)
    gen = torch.Generator().manual_seed(opt.seed)
    device = torch.device(opt.device)
    sae = SparseAutoencoder(cfg)
    sae.reset_parameters(gen)  # on the CPU (seeded the same on every device), then moved
    sae.to(device)
    adam = torch.optim.Adam(sae.parameters(), lr=opt.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    rows_since_fired = torch.zeros(cfg.width, dtype=torch.long, device=device)
    step, losses = 0, []
    ckpt = os.path.join(opt.checkpoint_dir, CHECKPOINT_FILE) if opt.checkpoint_dir else None
    if ckpt and opt.resume and os.path.isfile(ckpt):
        step, losses = _load_checkpoint(ckpt, sae, adam, rows_since_fired, cfg, opt, cache)
        log.info("resumed from %s at step %d", ckpt, step)
    else:
        sample = cache.sample_rows(opt.init_rows).to(device)
        sae.fit_normalisation_(sample)
        sae.init_b_dec_(sample, opt.b_dec_init)
    if ranks.distributed:  # the same start everywhere (it is already, by the seed; DDP checks it this way too)
        with torch.no_grad():
            for tensor in list(sae.parameters()) + list(sae.buffers()):
                ranks.broadcast_(tensor.data)
    params = list(sae.parameters())
    chunks = _chunks(cache, opt.batch_size)
    sae.train()
    start = time.perf_counter()
    start_step = step
    order, order_epoch = [], -1
    plateau = _Plateau(opt.plateau, opt.min_epochs)
    stopped_at = None
    while step < opt.steps:
        epoch, pos = divmod(step, len(chunks))
        if order_epoch != epoch:
            order, order_epoch = _epoch_order(len(chunks), opt.seed, epoch).tolist(), epoch
        shard, a, b = chunks[order[pos]]
        for group in adam.param_groups:
            group["lr"] = opt.lr * _lr_factor(step, opt)
        adam.zero_grad(set_to_none=True)
        if ranks.distributed:
            result, loss_value = _distributed_step(sae, cache, shard, a, b, rows_since_fired, params, ranks)
        else:
            x = cache.read(shard, a, b).to(device)  # (B, D)
            result = training_step(sae, x, rows_since_fired)
            loss_value = result.loss.item()
        if not math.isfinite(loss_value):
            raise SAEError(f"training diverged at step {step} (loss {loss_value}); lower --lr")
        if not ranks.distributed:
            result.loss.backward()
        sae.remove_parallel_gradient_()
        adam.step()
        sae.normalise_decoder_()
        with torch.no_grad():
            rows_since_fired.add_(b - a).masked_fill_(result.fired, 0)
            if cfg.kind == "batchtopk" and result.min_active is not None:
                sae.update_threshold_(result.min_active.reshape(1))
        step += 1
        losses.append(round(loss_value, 6))
        if progress is not None:
            progress(step, opt.steps, losses[-1])
        if step % len(chunks) == 0 and plateau.flat(losses[-len(chunks):]):
            stopped_at = step  # every rank sees the same (reduced) losses, so every rank stops here
            if ckpt and ranks.main:
                _save_checkpoint(ckpt, sae, adam, rows_since_fired, step, losses, cfg, opt, cache)
            break
        if ckpt and ((opt.checkpoint_every and step % opt.checkpoint_every == 0) or step == opt.steps):
            if ranks.main:
                _save_checkpoint(ckpt, sae, adam, rows_since_fired, step, losses, cfg, opt, cache)
            ranks.barrier()
    sae.eval()
    sae.to("cpu")
    seconds = time.perf_counter() - start
    history = {
        "steps": step,
        "planned_steps": opt.steps,
        "epochs": round(step / len(chunks), 3),
        "stopped_on_plateau": stopped_at is not None,
        "resumed_at": start_step,
        "seconds": round(seconds, 2),
        "steps_per_second": round((step - start_step) / seconds, 2) if seconds > 0 else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "dead_at_end": float((rows_since_fired >= cfg.dead_after).float().mean()),
        "threshold": float(sae.threshold),
        "options": asdict(opt),
        "threads": torch.get_num_threads(),
        "ranks": ranks.world,
        "device": str(device),
    }
    return sae, history


class _Plateau:
    """The stop rule: an epoch's mean loss that improves on the best earlier epoch's by less than
    ``fraction`` (relative), once ``min_epochs`` epochs have run."""

    def __init__(self, fraction: float, min_epochs: int):
        self.fraction, self.min_epochs, self.best, self.epochs = fraction, min_epochs, math.inf, 0

    def flat(self, epoch_losses: list[float]) -> bool:
        self.epochs += 1
        mean = sum(epoch_losses) / len(epoch_losses)
        improved = (self.best - mean) / abs(self.best) if math.isfinite(self.best) and self.best != 0 else math.inf
        self.best = min(self.best, mean)
        return self.fraction > 0 and self.epochs >= self.min_epochs and improved < self.fraction


def _distributed_step(sae: SparseAutoencoder, cache: ActivationCache, shard: int, a: int, b: int,
                      rows_since_fired: torch.Tensor, params: list, ranks: Ranks) -> tuple[StepResult, float]:
    """One step's forward and backward on this rank's share of rows [a, b); gradients, the fired
    latents, the threshold's minimum and the loss reduced over ranks. Returns (result, batch loss)."""
    lo, hi = _share(a, b, ranks)
    device = sae.W_dec.device  # NCCL reduces CUDA tensors, gloo CPU ones: everything stays on the SAE's device
    weight = (hi - lo) / (b - a)  # this rank's share of the batch mean
    if hi > lo:
        x = cache.read(shard, lo, hi).to(device)  # (B / ranks, D)
        result = training_step(sae, x, rows_since_fired, batch_kth=_global_kth(ranks, b - a))
        (result.loss * weight).backward()
        loss = result.loss.detach() * weight
        fired, min_active = result.fired, result.min_active
    else:  # fewer rows than ranks: this rank contributes nothing, but joins every collective
        if sae.cfg.kind == "batchtopk":
            _global_kth(ranks, b - a)(torch.empty(0, device=device), sae.cfg.k)
        loss = torch.zeros((), device=device)
        fired, min_active = torch.zeros(sae.cfg.width, dtype=torch.bool, device=device), None
    _all_reduce_grads(params, ranks)
    fired = ranks.all_reduce_(fired.to(torch.int32), "max").bool()
    smallest = (torch.full((1,), math.inf, device=device) if min_active is None
                else min_active.reshape(1).float().clone())
    smallest = ranks.all_reduce_(smallest, "min")
    loss = ranks.all_reduce_(loss.reshape(1).float().clone())
    min_active = smallest[0] if math.isfinite(float(smallest[0])) else None
    return StepResult(loss[0], fired, min_active), float(loss[0])


# ------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(path, sae, adam, rows_since_fired, step, losses, cfg, opt, cache) -> None:
    tensors = {f"sae.{k}": v.detach().cpu() for k, v in sae.state_dict().items()}
    params = list(sae.parameters())
    for i, p in enumerate(params):
        state = adam.state.get(p)
        if state:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                value = torch.as_tensor(state[key]).reshape(-1) if key == "step" else state[key]
                tensors[f"adam.{i}.{key}"] = value.detach().cpu()
    tensors["rows_since_fired"] = rows_since_fired.cpu()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_safetensors(tensors, path, {
        "step": step, "losses": losses, "config": cfg.to_dict(), "options": _resume_key(opt),
        "cache": {"model_hash": cache.model_hash, "rows": cache.rows, "d": cache.d},
    })


def _resume_key(opt: TrainOptions) -> dict:
    """Options a resumed run must share with the run that wrote the checkpoint."""
    keys = ("steps", "batch_size", "lr", "warmup_steps", "decay_fraction", "seed", "b_dec_init", "init_rows")
    return {k: getattr(opt, k) for k in keys}


def _load_checkpoint(path, sae, adam, rows_since_fired, cfg, opt, cache) -> tuple[int, list]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEError(f"{path}: unreadable checkpoint ({str(exc)[:120]}); delete it to start over") from None
    if json.loads(meta["config"]) != cfg.to_dict() or json.loads(meta["options"]) != _resume_key(opt):
        raise SAEError(f"{path} was written by a run with other settings; use the same settings to resume, "
                       "or delete the checkpoint (or pass --no-resume) to start over")
    cached = json.loads(meta["cache"])
    if cached != {"model_hash": cache.model_hash, "rows": cache.rows, "d": cache.d}:
        raise SAEError(f"{path} was trained on another activation cache; delete it to start over")
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}, strict=True)
    for i, p in enumerate(sae.parameters()):
        if f"adam.{i}.step" in tensors:
            # step stays a CPU tensor on every device (as Adam keeps it unless capturable/fused on CUDA)
            step_device = p.device if p.is_cuda else "cpu"
            adam.state[p] = {"step": tensors[f"adam.{i}.step"].reshape(()).clone().to(step_device),
                             "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device),
                             "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device)}
    rows_since_fired.copy_(tensors["rows_since_fired"])
    return int(meta["step"]), list(json.loads(meta["losses"]))


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, cache: ActivationCache, max_rows: int | None = None,
                 chunk: int = 4096) -> SAEMetrics:
    """Reconstruction figures over the cache's rows (streamed; inference-mode activation)."""
    sae.eval()
    n = 0
    sum_x = torch.zeros(cache.d, dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    sum_r = torch.zeros(cache.d, dtype=torch.float64)
    sum_r2 = torch.zeros((), dtype=torch.float64)
    nnz = 0
    fired = torch.zeros(sae.cfg.width, dtype=torch.bool)
    for x in cache.iter_rows(chunk):
        if max_rows is not None and n >= max_rows:
            break
        if max_rows is not None:
            x = x[: max_rows - n]
        z = sae.encode(x)
        r = (x - sae.decode(z)).double()
        xd = x.double()
        sum_x += xd.sum(0)
        sum_x2 += xd.pow(2).sum()
        sum_r += r.sum(0)
        sum_r2 += r.pow(2).sum()
        nnz += int((z != 0).sum())
        fired |= (z != 0).any(0)
        n += x.shape[0]
    if n == 0:
        raise SAEError("no rows to evaluate; the cache is empty")
    var_x = sum_x2 - sum_x.pow(2).sum() / n
    var_r = sum_r2 - sum_r.pow(2).sum() / n
    return SAEMetrics(
        nmse=float(sum_r2 / var_x.clamp_min(1e-30)),
        explained_variance=float(1 - var_r / var_x.clamp_min(1e-30)),
        l0=nnz / n,
        dead_fraction=float((~fired).double().mean()),
        rows=n,
    )


def save_trained(sae: SparseAutoencoder, out_dir: str, history: dict, metrics: SAEMetrics | None = None) -> None:
    """weights.safetensors + cfg.json (with the training history and metrics) in ``out_dir``."""
    extra: dict[str, Any] = {"training": history}
    if metrics is not None:
        extra["metrics"] = asdict(metrics)
    save_sae(sae, out_dir, extra)
