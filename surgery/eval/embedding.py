"""Embedding image folders and texts, batched, with an on-disk cache.

Each model embeds a data set once: the result is stored as safetensors under the cache folder,
keyed by the encoder's identity (weights sha256), its preprocessing and the data's hash (file
names and bytes), so a second ``compare``/``eval`` on the same data reads the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from surgery.errors import SurgeryError
from surgery.eval.encoders import Encoder
from surgery.io.checkpoint import write_safetensors
from surgery.io.images import ImageFolderDataset, SkippedImage, data_hash
from surgery.model.preprocess import image_transform, preprocess_key, tokenize
from surgery.sae.activations import open_cache
from surgery.sae.extract import read_part_sidecars

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class EmbedOptions:
    batch_size: int = 256  # images or texts per forward pass
    cache_dir: str | None = None  # folder for cached embeddings; None = no cache
    num_workers: int = 0  # DataLoader worker processes for image decoding
    max_skipped_fraction: float = 0.05  # abort when more images than this are unreadable

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ImageEmbeddings:
    embeddings: torch.Tensor  # (n_kept, D) float32, unnormalised
    indices: torch.Tensor  # (n_kept,) int64: position of each row in the requested file list
    skipped: list[SkippedImage] = field(default_factory=list)
    from_cache: bool = False


def image_embeddings_from_cache(cache_dir: str, files: Sequence[str], encoder: Encoder) -> ImageEmbeddings:
    """The embeddings of ``files`` from a ``clipsurgery embed`` cache at the vision embedding site,
    instead of running the encoder. The cache must come from ``encoder``'s weights and preprocessing;
    a file is found by its sample key (a folder's file name, or a shard's key: the name without its
    extension); files the cache lacks are listed as skipped."""
    cache = open_cache(cache_dir)
    if (cache.site.tower, cache.site.site) != ("vision", "embedding"):
        raise SurgeryError(f"cache {cache_dir} holds {cache.site.tower}/{cache.site.site} activations; eval needs "
                           "image embeddings: build it with 'clipsurgery embed MODEL --site embedding'")
    if cache.model_hash != encoder.identity:
        raise SurgeryError(f"cache {cache_dir} was made from another model (weights hash {cache.model_hash[:12]}, "
                           f"this model {encoder.identity[:12]}); embed with this model or drop --cache")
    if cache.source.get("preprocess") not in (None, preprocess_key(encoder.preprocess)):
        raise SurgeryError(f"cache {cache_dir} was made with other preprocessing than this model's; rebuild it")
    row_of: dict[str, tuple[int, int]] = {}  # sample key -> (shard, row)
    for shard, (info, sidecar) in enumerate(zip(cache.shards, read_part_sidecars(cache))):
        first = int(info.get("first_sample", 0))
        for row, sample in enumerate(cache.read_samples(shard).tolist()):
            row_of[sidecar["keys"][sample - first]] = (shard, row)
    rows, kept, skipped = [], [], []
    for i, name in enumerate(files):
        where = row_of.get(name) or row_of.get(os.path.splitext(name)[0])
        if where is None:
            skipped.append(SkippedImage(name, "not in the embedding cache"))
            continue
        rows.append(cache.read(where[0], where[1], where[1] + 1))
        kept.append(i)
    if not rows:
        raise SurgeryError(f"none of the {len(files)} labelled images is in the cache {cache_dir}; "
                           "check that it was embedded from the same images")
    return ImageEmbeddings(torch.cat(rows), torch.tensor(kept, dtype=torch.int64), skipped, from_cache=True)


def embed_images(encoder: Encoder, images_dir: str, files: Sequence[str], options: EmbedOptions | None = None,
                 progress: Progress | None = None) -> ImageEmbeddings:
    """Embed ``files`` under ``images_dir`` (unreadable ones are skipped and listed)."""
    return embed_images_multi([encoder], images_dir, files, options, progress)[0]


def embed_images_multi(encoders: Sequence[Encoder], images_dir: str, files: Sequence[str],
                       options: EmbedOptions | None = None, progress: Progress | None = None) -> list[ImageEmbeddings]:
    """Embed the same images with several encoders; images are decoded once for all encoders that
    share preprocessing and miss the cache."""
    opt = options or EmbedOptions()
    results: list[ImageEmbeddings | None] = [None] * len(encoders)
    cache_paths: list[str | None] = [None] * len(encoders)
    digest = data_hash(images_dir, files) if opt.cache_dir else ""
    for i, encoder in enumerate(encoders):
        if opt.cache_dir:
            key = hashlib.sha256(f"{encoder.identity}|{preprocess_key(encoder.preprocess)}|{digest}".encode()).hexdigest()[:32]
            cache_paths[i] = os.path.join(opt.cache_dir, f"images-{key}.safetensors")
            results[i] = _read_cache(cache_paths[i])
    pending = [i for i, r in enumerate(results) if r is None]
    while pending:
        prep = preprocess_key(encoders[pending[0]].preprocess)
        group = [i for i in pending if preprocess_key(encoders[i].preprocess) == prep]
        pending = [i for i in pending if i not in group]
        dataset = ImageFolderDataset(images_dir, files, image_transform(encoders[group[0]].preprocess),
                                     max_skipped_fraction=opt.max_skipped_fraction)
        chunks = {i: [] for i in group}
        indices, done = [], 0
        for batch, idx in dataset.batches(opt.batch_size, opt.num_workers):
            for i in group:
                chunks[i].append(encoders[i].encode_images(batch))
            indices.append(idx)
            done += len(idx)
            if progress:
                progress(done, len(dataset))
        for i in group:
            results[i] = ImageEmbeddings(torch.cat(chunks[i]), torch.cat(indices), list(dataset.skipped))
            if cache_paths[i]:
                os.makedirs(opt.cache_dir, exist_ok=True)
                write_safetensors({"embeddings": results[i].embeddings, "indices": results[i].indices}, cache_paths[i],
                                  {"skipped": [[s.file, s.reason] for s in results[i].skipped],
                                   "encoder": encoders[i].name})
    if progress and not any(r is not None and not r.from_cache for r in results):
        progress(len(files), len(files))
    return results  # type: ignore[return-value]


def embed_texts(encoder: Encoder, texts: Sequence[str], options: EmbedOptions | None = None,
                identity: str | None = None) -> torch.Tensor:
    """(n, D) float32 text embeddings, unnormalised; cached like images when a cache is set."""
    opt = options or EmbedOptions()
    cache_path = None
    if opt.cache_dir:
        digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        key = hashlib.sha256(f"{identity or encoder.identity}|{encoder.tokenizer}|{digest}".encode()).hexdigest()[:32]
        cache_path = os.path.join(opt.cache_dir, f"texts-{key}.safetensors")
        if os.path.isfile(cache_path):
            cached = _read_tensor(cache_path, "embeddings")
            if cached is not None and cached.shape[0] == len(texts):
                return cached
    tokens = tokenize(list(texts), encoder.tokenizer)  # (n, ctx)
    emb = torch.cat([encoder.encode_texts(chunk) for chunk in tokens.split(opt.batch_size)])
    if cache_path:
        os.makedirs(opt.cache_dir, exist_ok=True)
        write_safetensors({"embeddings": emb}, cache_path, {"encoder": encoder.name})
    return emb


def _read_tensor(path: str, name: str) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return fh.get_tensor(name)
    except Exception as exc:  # a damaged cache entry is recomputed, never trusted
        log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        return None


def _read_cache(path: str) -> ImageEmbeddings | None:
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            emb, idx = fh.get_tensor("embeddings"), fh.get_tensor("indices")
        skipped = [SkippedImage(f, r) for f, r in json.loads(meta.get("skipped", "[]"))]
    except Exception as exc:  # a damaged cache entry is recomputed, never trusted
        log.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        return None
    log.info("embeddings read from cache %s", path)
    return ImageEmbeddings(emb, idx, skipped, from_cache=True)
