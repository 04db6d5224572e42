"""Where an SAE reads a CLIP, and the on-disk activation cache it trains from.

Sites (both towers):

* ``residual`` — the residual stream after the last block, every token (seed 001): the input of
  the tower's final norm (``ln_post`` / ``ln_final``), captured by a forward hook on
  ``get_towers(model)[tower].final_norm``. Text rows are the tokens up to and including the
  end-of-text token (padding after it is dropped).
* ``embedding`` — the tower's output embedding (``encode_image`` / ``encode_text``, unnormalised).

Cache layout (a folder)::

    cache.json                 {"schema", "model_hash", "tower", "site", "d", "rows", "shards": [...]}
    shard-00000.safetensors    "acts" (n, D) float32, "sample" (n,) int64: which input each row came from

Rows are shuffled within a shard when it is written, so a training batch read as a contiguous
slice of a shard mixes inputs; reading a batch loads only that slice (memory bounded by the batch).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from surgery.errors import CacheError
from surgery.io.checkpoint import state_dict_hash, write_safetensors
from surgery.io.fs import atomic_output
from surgery.model.towers import get_towers
from surgery.sae.model import SITES, TOWER_NAMES, SAEError

log = logging.getLogger(__name__)

CACHE_JSON = "cache.json"
CACHE_SCHEMA = "clipsurgery.activations/1"
Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Site:
    tower: str = "vision"  # "vision" | "text"
    site: str = "residual"  # "residual" | "embedding"

    def __post_init__(self) -> None:
        if self.tower not in TOWER_NAMES:
            raise SAEError(f"unknown tower {self.tower!r}; allowed: {', '.join(TOWER_NAMES)}")
        if self.site not in SITES:
            raise SAEError(f"unknown site {self.site!r}; allowed: {', '.join(SITES)}")


# ------------------------------------------------------------------------------------------ capture
def site_width(model: nn.Module, site: Site) -> int:
    """Width D of the representation at ``site``."""
    view = get_towers(model)[site.tower]
    if site.site == "residual":
        return view.width
    proj = view.projection
    if proj is None:
        return view.width
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])


def eot_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: token positions up to and including the end-of-text token (argmax id)."""
    eot = tokens.argmax(dim=-1)  # (B,)
    return torch.arange(tokens.shape[1])[None, :] <= eot[:, None]


@torch.no_grad()
def capture(model: nn.Module, site: Site, inputs: torch.Tensor) -> torch.Tensor:
    """Activations at ``site`` for one batch: residual (B, N, D) (text: padding zeroed out by
    :func:`capture_rows`), embedding (B, D), float32 on the CPU. ``inputs``: images (B, 3, H, W) or
    tokens (B, ctx), on any device (moved to the model's)."""
    encode = model.encode_image if site.tower == "vision" else model.encode_text
    device = next(model.parameters()).device  # the model may sit on a GPU; activations come back to the CPU
    inputs = inputs.to(device)
    if site.site == "embedding":
        return encode(inputs).float().cpu()
    grabbed: list[torch.Tensor] = []
    norm = get_towers(model)[site.tower].final_norm
    handle = norm.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0].detach()))
    try:
        encode(inputs)
    finally:
        handle.remove()
    return grabbed[-1].float().cpu()


@torch.no_grad()
def capture_rows(model: nn.Module, site: Site, inputs: torch.Tensor, first_index: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the cache: (acts (n, D), sample (n,) int64 = first_index + position in batch)."""
    acts = capture(model, site, inputs)
    sample = torch.arange(first_index, first_index + acts.shape[0])
    if acts.dim() == 2:
        return acts, sample
    keep = eot_mask(inputs) if site.tower == "text" and acts.shape[:2] == inputs.shape[:2] else \
        torch.ones(acts.shape[:2], dtype=torch.bool)
    return acts[keep], sample[:, None].expand(acts.shape[:2])[keep]



# ------------------------------------------------------------------------------------------- cache
@dataclass
class ActivationCache:
    """A cache folder opened for reading."""
    path: str  # the folder
    model_hash: str  # state_dict_hash of the CLIP the rows came from
    site: Site  # where they were read
    d: int  # row width
    rows: int  # total rows
    shards: list[dict]  # [{"file", "rows"}] in order
    samples: int  # inputs (images / texts) the rows came from
    source: dict = field(default_factory=dict)  # what the inputs were: kind, data hash, preprocessing/tokenizer
    _handles: dict = field(default_factory=dict, repr=False, compare=False)  # shard -> open safetensors file

    def check_model(self, model_hash: str) -> None:
        """Refuse a cache made from another model."""
        if model_hash and self.model_hash != model_hash:
            raise CacheError(
                f"activation cache {self.path} was made from another model (weights hash {self.model_hash[:12]}, "
                f"this model {model_hash[:12]}); delete it or pass a new --cache folder"
            )

    def source_differences(self, source: dict) -> list[str]:
        """What differs between the cache's recorded inputs and ``source`` (empty: the same data)."""
        keys = sorted(set(self.source) | set(source))
        return [f"{k}: cached {str(self.source.get(k))[:16]!r}, now {str(source.get(k))[:16]!r}"
                for k in keys if self.source.get(k) != source.get(k)]

    def read(self, shard: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of one shard, (n, D) float32; checks they are finite."""
        from safetensors import safe_open

        info = self.shards[shard]
        path = os.path.join(self.path, info["file"])
        handle = self._handles.get(shard)
        if handle is None:  # memory-mapped; a slice reads only its rows
            handle = self._handles[shard] = safe_open(path, framework="pt")
        rows = handle.get_slice("acts")[start:stop if stop is not None else info["rows"]]
        if not torch.isfinite(rows).all():
            raise CacheError(f"{path}: activations contain NaN or inf (rows {start}..{stop}); "
                             "the model produced non-finite values: check its weights/precision and rebuild the cache")
        return rows.float()

    def read_samples(self, shard: int) -> torch.Tensor:
        """The ``sample`` ids (n,) of one shard: which input each row came from, numbered over the
        whole cache (a shard written by ``clipsurgery embed`` stores them from 0 and its
        ``first_sample`` in the manifest)."""
        from safetensors import safe_open

        with safe_open(os.path.join(self.path, self.shards[shard]["file"]), framework="pt") as fh:
            return fh.get_tensor("sample") + int(self.shards[shard].get("first_sample", 0))

    def read_tokens(self, shard: int) -> torch.Tensor:
        """The ``token`` positions (n,) of one shard's rows (caches written by ``clipsurgery embed``)."""
        from safetensors import safe_open

        with safe_open(os.path.join(self.path, self.shards[shard]["file"]), framework="pt") as fh:
            if "token" not in fh.keys():
                raise CacheError(f"{self.path} does not record token positions (written by an older version or "
                                 "by 'sae train'); rebuild it with 'clipsurgery embed', or reduce with max/mean")
            return fh.get_tensor("token")

    def sample_rows(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """About ``n`` rows (n', D) spread over the shards (for normalisation and b_dec init)."""
        out, need = [], n
        per = max(1, -(-n // len(self.shards)))
        for i, info in enumerate(self.shards):
            take = min(per, info["rows"], need)
            if take <= 0:
                break
            out.append(self.read(i, 0, take))  # rows are already shuffled within a shard
            need -= take
        return torch.cat(out)

    def iter_rows(self, chunk: int = 4096) -> Iterator[torch.Tensor]:
        """All rows in order, ``chunk`` at a time."""
        for i, info in enumerate(self.shards):
            for start in range(0, info["rows"], chunk):
                yield self.read(i, start, min(info["rows"], start + chunk))


def open_cache(path: str) -> ActivationCache:
    """Open a cache folder written by :func:`build_cache`."""
    meta_path = os.path.join(path, CACHE_JSON)
    if not os.path.isfile(meta_path):
        raise CacheError(f"{path} is not an activation cache (no {CACHE_JSON}); build one with build_cache / 'sae train'")
    try:
        meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CacheError(f"{meta_path}: damaged ({exc}); delete the cache folder and rebuild it") from None
    if meta.get("schema") != CACHE_SCHEMA:
        raise CacheError(f"{meta_path}: schema {meta.get('schema')!r}, this version reads {CACHE_SCHEMA}; rebuild the cache")
    for info in meta["shards"]:
        if not os.path.isfile(os.path.join(path, info["file"])):
            raise CacheError(f"{path}: shard {info['file']} is missing; delete the cache folder and rebuild it")
    return ActivationCache(path=path, model_hash=meta["model_hash"], site=Site(meta["tower"], meta["site"]),
                           d=int(meta["d"]), rows=int(meta["rows"]), shards=list(meta["shards"]),
                           samples=int(meta.get("samples", 0)), source=dict(meta.get("source") or {}))


def build_cache(model: nn.Module, site: Site, batches: Iterable[torch.Tensor], out_dir: str, *,
                shard_rows: int = 65536, seed: int = 0, total: int | None = None,
                progress: Progress | None = None, model_hash: str | None = None,
                source: dict | None = None) -> ActivationCache:
    """Run ``model`` over ``batches`` (images (B, 3, H, W) or tokens (B, ctx)) and write the cache.

    ``source`` records what the inputs were (kind, data hash, preprocessing or tokenizer), so a later
    run on other data can tell the cache is not its own (:meth:`ActivationCache.source_differences`).

    Shards hold at most ``shard_rows`` rows, shuffled (seeded) before writing; ``cache.json`` is
    written last, so an interrupted build leaves no readable cache. Non-finite activations abort.
    """
    if shard_rows < 1:
        raise SAEError(f"shard_rows must be >= 1, got {shard_rows}")
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out_dir, CACHE_JSON))  # a stale index must not describe new shards
    model_hash = model_hash or state_dict_hash(model)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict] = []
    buf_acts: list[torch.Tensor] = []
    buf_ids: list[torch.Tensor] = []
    buffered = done = 0
    d = None

    def flush() -> None:
        nonlocal buf_acts, buf_ids, buffered
        if not buffered:
            return
        acts, ids = torch.cat(buf_acts), torch.cat(buf_ids)
        order = torch.randperm(acts.shape[0], generator=gen)
        name = f"shard-{len(shards):05d}.safetensors"
        write_safetensors({"acts": acts[order].contiguous(), "sample": ids[order].contiguous()},
                          os.path.join(out_dir, name), {"clipsurgery.model_hash": model_hash})
        shards.append({"file": name, "rows": int(acts.shape[0])})
        buf_acts, buf_ids, buffered = [], [], 0

    for batch in batches:
        acts, ids = capture_rows(model, site, batch, first_index=done)
        if not torch.isfinite(acts).all():
            raise CacheError(f"the model produced NaN or inf activations at {site.tower}/{site.site} "
                             f"(inputs {done}..{done + len(batch)}); check the weights and precision (use fp32)")
        d = acts.shape[1]
        done += len(batch)
        while acts.shape[0]:
            room = shard_rows - buffered
            buf_acts.append(acts[:room])
            buf_ids.append(ids[:room])
            buffered += min(room, acts.shape[0])
            acts, ids = acts[room:], ids[room:]
            if buffered >= shard_rows:
                flush()
        if progress:
            progress(done, total or done)
    flush()
    if not shards:
        raise SAEError("no inputs to cache; the image folder or text list is empty")
    meta = {"schema": CACHE_SCHEMA, "model_hash": model_hash, "tower": site.tower, "site": site.site,
            "d": d, "rows": sum(s["rows"] for s in shards), "samples": done, "shards": shards,
            "source": source or {}}
    with atomic_output(os.path.join(out_dir, CACHE_JSON)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    log.info("cached %d rows (%d inputs) of %s/%s in %s", meta["rows"], done, site.tower, site.site, out_dir)
    return open_cache(out_dir)


# -------------------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def replaced(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the representation at ``site`` is replaced by ``fn(h)`` (on its last dim).

    residual: a forward pre-hook on the tower's final norm; vision embedding: a forward hook on
    ``model.visual``; text embedding: ``model.text`` (CustomTextCLIP) or ``encode_text`` wrapped.
    """
    if site.site == "residual":
        norm = get_towers(model)[site.tower].final_norm
        handle = norm.register_forward_pre_hook(lambda _m, args: (fn(args[0]),) + tuple(args[1:]))
        try:
            yield
        finally:
            handle.remove()
        return
    if site.tower == "vision":
        handle = model.visual.register_forward_hook(lambda _m, _a, out: fn(out))
        try:
            yield
        finally:
            handle.remove()
        return
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module):
        handle = text.register_forward_hook(lambda _m, _a, out: fn(out))
        try:
            yield
        finally:
            handle.remove()
        return
    original = model.encode_text

    def encode_text(tokens, normalize: bool = False):
        out = fn(original(tokens, normalize=False))
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    model.encode_text = encode_text
    try:
        yield
    finally:
        del model.encode_text  # the instance attribute; the class method shows again
