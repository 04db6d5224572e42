"""Social-neuron search (seed 001) plus a ranked score, from labelled images or group prompts.

Per sample (an image, or a text) each latent gets one activation: at the embedding site its code;
at the residual site its codes over the sample's tokens reduced by ``token_reduce``: ``pooled``
(default: the token the tower pools into the embedding, the class token or the text's end-of-text
token, the only residual token that reaches the embedding), ``max``, ``mean`` or ``first``. Then, for groups ``g`` of one attribute:

* ``freq[g, i]`` = fraction of g's samples on which latent i is non-zero;
* seed 001's rule: i is *effective* for g when ``freq[g, i] >= tau``; g's social neurons are the
  latents effective for g and for no other group;
* ranked score = consistency x specificity, with consistency ``freq[g, i]`` and specificity
  ``(share - 1/G) / (1 - 1/G)`` clipped at 0, ``share = freq[g, i] / sum_h freq[h, i]``
  (1: fires for g only, 0: no preference). The top ``top_n`` per group (score > 0) are selected.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from surgery.errors import NeuronError, SurgeryError
from surgery.io.checkpoint import state_dict_hash
from surgery.io.fs import atomic_output
from surgery.io.images import ImageFolderDataset
from surgery.io.shards import LABEL_ERROR_KEY
from surgery.io.labels import load_labels
from surgery.model.preprocess import tokenize
from surgery.model.towers import get_towers
from surgery.sae.activations import ActivationCache, Site, capture, eot_mask
from surgery.sae.extract import read_part_sidecars
from surgery.sae.model import SAEError, SparseAutoencoder

log = logging.getLogger(__name__)

TOKEN_REDUCTIONS = ("pooled", "max", "mean", "first")
NEURONS_SCHEMA = "clipsurgery.neurons/1"


@dataclass
class NeuronOptions:
    tau: float = 0.5  # a latent is effective for a group when non-zero on >= tau of its samples
    top_n: int = 3  # latents selected per group by the ranked score
    token_reduce: str = "pooled"  # residual site: "pooled" (token pooled into the embedding) | "max" | "mean" | "first"
    batch_size: int = 128  # samples per forward pass
    max_bad_labels: float = 0.05  # caches: samples whose label JSON cannot be parsed (fraction) before refusing

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise SAEError(f"tau must be in (0, 1], got {self.tau}")
        if not 0.0 <= self.max_bad_labels <= 1.0:
            raise SAEError(f"max_bad_labels must be a fraction in [0, 1], got {self.max_bad_labels}")
        if self.top_n < 1 or self.batch_size < 1:
            raise SAEError("top_n and batch_size must be >= 1")
        if self.token_reduce not in TOKEN_REDUCTIONS:
            raise SAEError(f"unknown token_reduce {self.token_reduce!r}; allowed: {', '.join(TOKEN_REDUCTIONS)}")


@dataclass
class NeuronReport:
    attribute: str  # the label column searched
    groups: list[str]  # group names, in code order
    samples_per_group: list[int]  # how many samples each group had
    tau: float  # threshold of the rule
    rule: dict[str, list[int]]  # seed 001's social neurons per group (effective for that group only)
    ranked: dict[str, list[dict]]  # per group, top latents: id, score, consistency, specificity, freq_others
    selected: dict[str, list[int]]  # per group, the top_n ids by score
    source: str = "images"  # "images" | "texts"
    sae: dict = field(default_factory=dict)  # kind, site, tower, width, model_hash of the SAE searched
    bad_labels: int = 0  # samples left out because their label JSON could not be parsed (caches)

    @property
    def selected_ids(self) -> list[int]:
        """Sorted union of the selected ids of every group."""
        return sorted({i for ids in self.selected.values() for i in ids})

    def to_dict(self) -> dict:
        return {"schema": NEURONS_SCHEMA, **asdict(self), "selected_ids": self.selected_ids}


# -------------------------------------------------------------------------------- per-sample codes
@torch.no_grad()
def sample_latents(model: nn.Module, sae: SparseAutoencoder, batches: Iterable[torch.Tensor],
                   token_reduce: str = "pooled") -> torch.Tensor:
    """One activation per sample and latent, (n, F), for images (B, 3, H, W) or tokens (B, ctx)."""
    if token_reduce not in TOKEN_REDUCTIONS:
        raise SAEError(f"unknown token_reduce {token_reduce!r}; allowed: {', '.join(TOKEN_REDUCTIONS)}")
    site = Site(sae.cfg.tower, sae.cfg.site)
    sae.eval()
    out = []
    for batch in batches:
        acts = capture(model, site, batch)  # (B, D) or (B, N, D)
        z = sae.encode(acts)  # (B, F) or (B, N, F)
        if z.dim() == 3:
            if token_reduce == "pooled":
                token_reduce_here = pooled_reduction(model, site)
            else:
                token_reduce_here = token_reduce
            if token_reduce_here == "first":
                z = z[:, 0]
            elif token_reduce_here == "last":
                z = z[:, -1]
            elif token_reduce_here == "eot":
                z = z[torch.arange(z.shape[0]), batch.argmax(dim=-1)]
            else:
                mask = (eot_mask(batch) if site.tower == "text" and z.shape[:2] == batch.shape[:2]
                        else torch.ones(z.shape[:2], dtype=torch.bool)).to(z.dtype)[..., None]  # (B, N, 1)
                z = (z * mask).amax(1) if token_reduce_here == "max" else (z * mask).sum(1) / mask.sum(1)
        out.append(z.float())
    return torch.cat(out)


def pooled_reduction(model: nn.Module, site: Site) -> str:
    """How the tower turns tokens into its embedding: "first" (class token), "eot", or "mean"."""
    pooling = get_towers(model)[site.tower].pooling
    if pooling in ("cls", "first"):
        return "first"
    if pooling in ("argmax", "eot"):
        return "eot"
    if pooling == "avg":
        return "mean"
    if pooling == "last":
        return "last"
    raise SAEError(f"token pooling {pooling!r} has no single pooled token; pass token_reduce='max' or 'mean'")


def find_neurons(latents: torch.Tensor, groups: Sequence[int] | torch.Tensor, group_names: Sequence[str],
                 options: NeuronOptions | None = None, attribute: str = "group") -> NeuronReport:
    """Seed 001's rule and the ranked score on per-sample codes ``latents`` (n, F), ``groups`` (n,)."""
    opt = options or NeuronOptions()
    g = torch.as_tensor(groups, dtype=torch.long)
    names = [str(n) for n in group_names]
    counts = torch.bincount(g, minlength=len(names))
    present = [i for i in range(len(names)) if counts[i] > 0]
    if len(present) < 2:
        only = names[present[0]] if present else "(none)"
        raise NeuronError(f"attribute {attribute!r} has one group ({only}) in these samples; neuron search "
                          "compares groups, so pick an attribute with >= 2 values or add samples of other groups")
    active = (latents > 0).float()  # (n, F)
    freq = torch.stack([active[g == i].mean(0) if counts[i] > 0 else torch.zeros(active.shape[1])
                        for i in range(len(names))])  # (G, F)
    effective = freq >= opt.tau  # (G, F)
    if not effective.any():
        best = float(freq.max())
        raise NeuronError(f"no latent is non-zero on >= tau={opt.tau} of any group's samples (highest: {best:.3f}); "
                          f"lower tau below {best:.2f} ('clipsurgery sae neurons --tau') or train the SAE longer / with a larger k")
    n_groups = len(present)
    total = freq.sum(0).clamp_min(1e-12)  # (F,)
    rule, ranked, selected = {}, {}, {}
    for i in present:
        others = [j for j in present if j != i]
        only_here = effective[i] & ~effective[others].any(0)
        rule[names[i]] = torch.nonzero(only_here).flatten().tolist()
        share = freq[i] / total
        spec = ((share - 1.0 / n_groups) / (1.0 - 1.0 / n_groups)).clamp_min(0.0)
        score = freq[i] * spec  # (F,)
        order = torch.argsort(score, descending=True, stable=True)
        rows = []
        for idx in order[: max(opt.top_n, 10)].tolist():
            if score[idx] <= 0:
                break
            rows.append({"id": idx, "score": round(float(score[idx]), 6), "consistency": round(float(freq[i, idx]), 6),
                         "specificity": round(float(spec[idx]), 6),
                         "freq_others": round(float(freq[others, idx].max()), 6), "rule": bool(only_here[idx])})
        ranked[names[i]] = rows
        selected[names[i]] = [r["id"] for r in rows[: opt.top_n]]
        if not rule[names[i]]:
            log.warning("group %s: no latent passes seed 001's rule at tau=%.2f (ranked ones are still listed); "
                        "lower tau to get rule neurons", names[i], opt.tau)
    return NeuronReport(attribute=attribute, groups=names, samples_per_group=counts.tolist(), tau=opt.tau,
                        rule=rule, ranked=ranked, selected=selected)


# ------------------------------------------------------------------------------------- front ends
def check_same_model(sae: SparseAutoencoder, model: nn.Module) -> None:
    """Refuse an SAE trained on another model's activations."""
    if sae.cfg.model_hash and sae.cfg.model_hash != state_dict_hash(model):
        raise SAEError("this SAE was trained on another model's activations (weights hash differs); "
                       "pass the model it was trained on, or train an SAE for this one")


def neurons_from_images(model: nn.Module, sae: SparseAutoencoder, images_dir: str, labels_path: str,
                        attribute: str, transform, options: NeuronOptions | None = None) -> NeuronReport:
    """Search with a labelled image folder (``labels_path``: CSV ``file,<attribute>,...``)."""
    opt = options or NeuronOptions()
    if sae.cfg.tower != "vision":
        raise SAEError("this SAE reads the text tower; search it with group prompts (neurons_from_texts)")
    check_same_model(sae, model)
    table = load_labels(labels_path, images_dir, required=[attribute])
    codes, names = table.codes(attribute)
    dataset = ImageFolderDataset(images_dir, table.files, transform)
    kept: list[torch.Tensor] = []

    def batches():
        for images, idx in dataset.batches(opt.batch_size):
            kept.append(idx)
            yield images

    latents = sample_latents(model, sae, batches(), opt.token_reduce)
    groups = torch.from_numpy(codes)[torch.cat(kept)]
    report = find_neurons(latents, groups, names, opt, attribute)
    report.sae = _sae_info(sae)
    return report


def neurons_from_cache(sae: SparseAutoencoder, cache: ActivationCache, attribute: str,
                       options: NeuronOptions | None = None, *, pooled_as: str = "first",
                       labels: dict[str, str] | None = None) -> NeuronReport:
    """Search with a cache written by ``clipsurgery embed``, without running the model.

    Groups come from each sample's shard JSON (key ``attribute``) or from ``labels`` ({sample key:
    group}: a labels CSV's file column for folders, the shard key for shards); unlabelled samples
    are left out. Residual rows are reduced per sample by ``options.token_reduce`` (``pooled`` means
    ``pooled_as``: "first" for a class-token tower, "mean" for average pooling).
    """
    opt = options or NeuronOptions()
    if (sae.cfg.tower, sae.cfg.site) != (cache.site.tower, cache.site.site):
        raise SAEError(f"this SAE reads {sae.cfg.tower}/{sae.cfg.site} but the cache holds "
                       f"{cache.site.tower}/{cache.site.site} activations; use a cache of the SAE's site")
    if sae.cfg.model_hash and sae.cfg.model_hash != cache.model_hash:
        raise SAEError("this SAE was trained on another model's activations than the cache's (weights hash differs)")
    reduce = pooled_as if opt.token_reduce == "pooled" else opt.token_reduce
    group_of: dict[int, str] = {}  # global sample id -> group
    bad: list[str] = []  # keys whose label JSON could not be parsed (shard labels only)
    samples = 0
    for info, sidecar in zip(cache.shards, read_part_sidecars(cache)):
        first = int(info.get("first_sample", 0))
        for pos, (key, meta) in enumerate(zip(sidecar["keys"], sidecar["meta"])):
            samples += 1
            if labels is None and LABEL_ERROR_KEY in (meta or {}):
                bad.append(str(key))
                continue
            value = labels.get(key) if labels is not None else (meta or {}).get(attribute)
            if value not in (None, ""):
                group_of[first + pos] = str(value)
    if bad:
        share = len(bad) / max(1, samples)
        if share > opt.max_bad_labels:
            raise NeuronError(f"{len(bad)} of {samples} samples of the cache have label JSON that cannot be parsed "
                              f"({share:.1%} > {opt.max_bad_labels:.1%}), e.g. {bad[0]!r}; fix the shards' JSON, "
                              "or pass --labels CSV")
        log.warning("%d samples have label JSON that cannot be parsed; left out of the search", len(bad))
    if not group_of:
        where = "the labels given" if labels is not None else f"the shards' JSON (key {attribute!r})"
        raise SAEError(f"no sample of the cache has a {attribute!r} label in {where}; pass --labels CSV")
    sae.eval()
    order = sorted(group_of)  # labelled samples, in cache order
    lookup = torch.full((max(order) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor(order)] = torch.arange(len(order))
    acc = torch.zeros(len(order), sae.cfg.width)  # (n, F) per-sample sum or max of codes (codes are >= 0)
    counts = torch.zeros(len(order))
    with torch.no_grad():
        for shard in range(len(cache.shards)):
            ids = cache.read_samples(shard)  # (m,)
            j = torch.where(ids < len(lookup), lookup[ids.clamp(max=len(lookup) - 1)], -1)  # (m,) row in acc
            keep = j >= 0
            if reduce == "first" and cache.site.site == "residual":
                keep &= cache.read_tokens(shard) == 0
            if not keep.any():
                continue
            z = sae.encode(cache.read(shard)[keep]).float()  # (m', F)
            if reduce == "max":
                acc.scatter_reduce_(0, j[keep][:, None].expand_as(z), z, "amax")
            else:
                acc.index_add_(0, j[keep], z)
            counts.index_add_(0, j[keep], torch.ones(int(keep.sum())))
    present = counts > 0
    latents = (acc / counts.clamp_min(1)[:, None] if reduce == "mean" else acc)[present]  # (n', F)
    order = [i for i, p in zip(order, present.tolist()) if p]
    names = sorted({group_of[i] for i in order})
    groups = torch.tensor([names.index(group_of[i]) for i in order])
    report = find_neurons(latents, groups, names, opt, attribute)
    report.sae = _sae_info(sae)
    report.source = "cache"
    report.bad_labels = len(bad)
    return report


def group_prompt_texts(groups: Sequence[str], templates: Sequence[str] = (
        "a photo of a {} person", "a {} person", "a picture of someone {}", "{}")) -> dict[str, list[str]]:
    """Prompts naming each group, one per template."""
    return {g: [t.format(g) for t in templates] for g in groups}


def neurons_from_texts(model: nn.Module, sae: SparseAutoencoder, prompts: dict[str, list[str]], tokenizer: dict,
                       options: NeuronOptions | None = None, attribute: str = "group") -> NeuronReport:
    """Search with text prompts naming the groups (when no image labels exist).

    Works for text-tower SAEs (any site) and for embedding-site SAEs of either tower (the joint
    embedding space; for a vision SAE this crosses the modality gap, so treat it as a first guess).
    """

    opt = options or NeuronOptions()
    check_same_model(sae, model)
    texts, groups = [], []
    for gi, (_name, items) in enumerate(prompts.items()):
        texts += list(items)
        groups += [gi] * len(items)
    tokens = tokenize(texts, tokenizer)  # (n, ctx)
    if sae.cfg.tower == "text":
        latents = sample_latents(model, sae, tokens.split(opt.batch_size), opt.token_reduce)
    elif sae.cfg.site == "embedding":
        log.warning("searching a vision-embedding SAE with text prompts: image and text embeddings differ "
                    "(modality gap); prefer labelled images")
        with torch.no_grad():
            device = next(model.parameters()).device
            emb = torch.cat([model.encode_text(t.to(device)).float().cpu() for t in tokens.split(opt.batch_size)])
            latents = sae.encode(emb)
    else:
        raise SAEError("a vision residual-stream SAE cannot read text; pass labelled images (--images/--labels)")
    report = find_neurons(latents, groups, list(prompts), opt, attribute)
    report.source = "texts"
    report.sae = _sae_info(sae)
    return report


def _sae_info(sae: SparseAutoencoder) -> dict:
    c = sae.cfg
    return {"kind": c.kind, "site": c.site, "tower": c.tower, "width": c.width, "k": c.k, "model_hash": c.model_hash}


def write_neurons(report: NeuronReport, path: str, extra: dict | None = None) -> None:
    """neurons.json, atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SurgeryError(f"folder {folder} does not exist; create it first")
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({**report.to_dict(), **(extra or {})}, indent=2))


def read_neurons(path: str) -> dict:
    """A neurons.json record (checked schema)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SurgeryError(f"{path}: unreadable neurons file ({exc}); rerun 'clipsurgery sae neurons'") from None
    if data.get("schema") != NEURONS_SCHEMA:
        raise SurgeryError(f"{path}: schema {data.get('schema')!r}, this version reads {NEURONS_SCHEMA}")
    return data
