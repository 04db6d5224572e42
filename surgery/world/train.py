"""Train and evaluate a tiny open_clip CLIP on a planted-bias world (:mod:`surgery.world.generator`).

The trained model is the project's "model with real, measurable bias": it learns shape (the
concept) and colour/texture (the protected group), and because the training split pairs each
concept with one group most of the time, group-free queries ("a photo of a circle") retrieve
mostly that group from a balanced evaluation split.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surgery import metrics
from surgery.model.arch import build_model, bundled_config
from surgery.model.preprocess import default_preprocess, images_to_tensor, tokenize
from surgery.world.generator import check_eval_size, generate
from surgery.world.params import WorldParams
from surgery.world.prompts import CAPTION_TEMPLATES, describe, group_prompts, neutral_queries

log = logging.getLogger(__name__)

#: The world model's architecture (DESIGN.md's feasibility run, embed_dim 64): configs/clipsurgery-world-v1.json.
WORLD_ARCH = "clipsurgery-world-v1"
WORLD_MODEL_CONFIG: dict = bundled_config(WORLD_ARCH)
#: Its tokenizer record (open_clip's BPE, the config's context length).
WORLD_TOKENIZER = {"name": "openai-clip-bpe", "context_length": WORLD_MODEL_CONFIG["text_cfg"]["context_length"]}


@dataclass
class WorldTrainOptions:
    n_train: int = 20000  # training images generated from the world
    epochs: int = 6  # passes over the training images
    batch_size: int = 256  # images (and captions) per contrastive batch
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    warmup_steps: int = 150  # warm-up steps; without them lr >= 2e-3 collapsed here (DESIGN.md)
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on norms, biases, embeddings)
    seed: int = 0  # model init and batch order
    n_eval: int = 1200  # balanced evaluation images for the quality figures

    def __post_init__(self) -> None:
        for name in ("n_train", "epochs", "batch_size", "n_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")


@dataclass
class WorldQuality:
    concept_accuracy: float  # zero-shot, "a photo of a {concept}" prompts, balanced eval split
    group_accuracy: float  # zero-shot, "a photo of something {group}" prompts
    max_skew_at_50: float  # mean over the neutral concept queries, uniform target
    per_query_max_skew: list[float] = field(default_factory=list)
    majority_share: list[float] = field(default_factory=list)  # per query: share of its top 50 in the assigned group


def world_vocabulary(params: WorldParams) -> list[str]:
    """Every text the world can produce: captions of all forms, neutral queries, group prompts."""
    phrases = [describe(params, c, g) for c in range(params.n_concepts) for g in [None, *range(params.n_groups)]]
    texts = [t.format(p) for t in CAPTION_TEMPLATES for p in phrases]
    return texts + neutral_queries(params) + group_prompts(params)


def build_world_clip(params: WorldParams, seed: int = 0) -> nn.Module:
    """The world architecture with token-embedding rows zeroed outside the world's vocabulary.

    Unused rows get no gradient and stay exactly zero, so the checkpoint compresses to a few MB.
    """
    torch.manual_seed(seed)
    model = build_model(WORLD_MODEL_CONFIG)
    used = torch.unique(tokenize(world_vocabulary(params), WORLD_TOKENIZER))
    with torch.no_grad():
        keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[used] = True
        model.token_embedding.weight[~keep] = 0.0
    return model


def train_world_model(
    params: WorldParams,
    options: WorldTrainOptions | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Train a world CLIP; returns (model in eval mode, on the CPU, history dict). ``progress(step, total,
    loss)``. ``device``: where the steps run (a GPU trains the same model in seconds; its numerics differ
    from the CPU's, so the weights are not bit-identical across devices)."""
    opt = options or WorldTrainOptions()
    torch.manual_seed(opt.seed)
    preprocess = default_preprocess(WORLD_MODEL_CONFIG)
    train = generate(params, "train", opt.n_train)
    images = images_to_tensor(train.images, preprocess)  # (n, 3, S, S)
    unique, inverse = np.unique(np.array(train.captions), return_inverse=True)
    caption_tokens = tokenize(list(unique), WORLD_TOKENIZER)  # (U, ctx)
    caption_ids = torch.from_numpy(inverse.reshape(-1)).long()  # (n,)
    concepts = torch.from_numpy(train.concepts)  # (n,)
    groups = torch.from_numpy(train.groups)  # (n,)
    named = torch.tensor([params.group_word(int(g)) in c.split() for g, c in zip(train.groups, train.captions)])
    caption_groups = torch.where(named, groups, torch.full_like(groups, -1))  # (n,) group the caption names, or -1

    model = build_world_clip(params, seed=opt.seed).to(device).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    steps_per_epoch = math.ceil(opt.n_train / opt.batch_size)
    total = steps_per_epoch * opt.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _lr_factor(s, opt.warmup_steps, total))
    gen = torch.Generator().manual_seed(opt.seed)
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    for _epoch in range(opt.epochs):
        order = torch.randperm(opt.n_train, generator=gen)
        for first in range(0, opt.n_train, opt.batch_size):
            idx = order[first:first + opt.batch_size]
            true_pairs = caption_truth(concepts[idx], caption_groups[idx], groups[idx]).to(device)
            loss = _contrastive_step(model, images[idx].to(device), caption_tokens[caption_ids[idx]].to(device),
                                     true_pairs)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            losses.append(loss.item())
            if progress is not None:
                progress(step, total, losses[-1])
    model.eval().cpu()
    history = {
        "options": asdict(opt),
        "seconds": round(time.perf_counter() - start, 1),
        "steps": total,
        "loss_first": losses[0],
        "loss_last_epoch_mean": float(np.mean(losses[-steps_per_epoch:])),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    return model, history


def caption_truth(concepts: torch.Tensor, caption_groups: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: caption t (row) is a true description of image j (column).

    "a circle" is true of every circle; "a red circle" only of red circles.
    """
    same_concept = concepts.unsqueeze(1) == concepts.unsqueeze(0)  # (B, B)
    group_ok = (caption_groups.unsqueeze(1) < 0) | (caption_groups.unsqueeze(1) == groups.unsqueeze(0))
    return same_concept & group_ok


def _contrastive_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                      true_pairs: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with false negatives masked out.

    In web-scale data two captions in a batch almost never describe each other's images; in a
    world of six shapes they do all the time. Pairs where the caption is true of another image
    (``true_pairs`` off the diagonal) are removed from the softmax instead of being pushed apart,
    so, as in web data, a caption is pulled toward its own image and away from images it does not
    describe. That is what lets the concept/group co-occurrence of the training split become
    bias in the model, the way it does in real CLIPs.
    """
    img = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
    txt = F.normalize(model.encode_text(tokens), dim=-1)  # (B, D)
    logits = model.logit_scale.exp() * txt @ img.T  # (B texts, B images)
    eye = torch.eye(len(tokens), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(true_pairs & ~eye, float("-inf"))
    target = torch.arange(len(tokens), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_world_model(model: nn.Module, params: WorldParams, n_eval: int = 1200, k: int = 50) -> WorldQuality:
    """The quality bar's figures on a balanced evaluation split of the world."""
    split = generate(params, "eval", check_eval_size(params, n_eval, "n_eval"))
    preprocess = default_preprocess(WORLD_MODEL_CONFIG)
    img = torch.cat([model.encode_image(chunk) for chunk in images_to_tensor(split.images, preprocess).split(256)])
    img = F.normalize(img, dim=-1)  # (n, D)
    concept_txt = F.normalize(model.encode_text(tokenize(neutral_queries(params), WORLD_TOKENIZER)), dim=-1)  # (C, D)
    group_txt = F.normalize(model.encode_text(tokenize(group_prompts(params), WORLD_TOKENIZER)), dim=-1)  # (G, D)
    groups = torch.from_numpy(split.groups)
    scores = concept_txt @ img.T  # (C, n)
    per_query = metrics.max_skew_at_k(scores, groups, k, params.n_groups)
    counts = metrics.group_counts_at_k(scores, groups, k, params.n_groups)  # (C, G)
    assigned = torch.tensor([params.assigned_group(c) for c in range(params.n_concepts)])
    majority = (counts[torch.arange(params.n_concepts), assigned] / k).tolist()
    return WorldQuality(
        concept_accuracy=metrics.zero_shot_accuracy(img, concept_txt, torch.from_numpy(split.concepts)),
        group_accuracy=metrics.zero_shot_accuracy(img, group_txt, groups),
        max_skew_at_50=float(per_query.mean()),
        per_query_max_skew=[round(float(v), 4) for v in per_query],
        majority_share=[round(float(v), 4) for v in majority],
    )
