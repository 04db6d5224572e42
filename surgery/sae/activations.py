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
import re
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
        try:
            if handle is None:  # memory-mapped; a slice reads only its rows
                handle = self._handles[shard] = safe_open(path, framework="pt")
            rows = handle.get_slice("acts")[start:stop if stop is not None else info["rows"]]
        except Exception as exc:  # noqa: BLE001 - changed on disk since the cache was opened: one line
            raise CacheError(f"{path} cannot be read ({str(exc)[:80]}); it changed since the cache was opened: "
                             "rebuild the cache") from None
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
    """Open a cache folder written by :func:`build_cache` or ``clipsurgery embed``.

    Everything is checked before a row is read, each failure a one-line CacheError: the manifest's
    keys and types; part files that are plain names inside the folder (no absolute path, no '..', no
    subfolder, no link out of it); each part's header (a truncated file is refused here) with
    ``acts`` of shape (rows, d) as the manifest says; and, where the part records them, the model
    hash, tower, site, row count and content hash the manifest holds for it (a part swapped in from
    another model or data set is refused).
    """
    meta_path = os.path.join(path, CACHE_JSON)
    if not os.path.isfile(meta_path):
        raise CacheError(_no_manifest(path))
    try:
        meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CacheError(f"{meta_path}: damaged ({type(exc).__name__}: {str(exc)[:80]}); delete the cache folder "
                         "and rebuild it") from None
    if not isinstance(meta, dict):
        raise CacheError(f"{meta_path}: not a cache manifest (a JSON object); rebuild the cache")
    if meta.get("schema") != CACHE_SCHEMA:
        raise CacheError(f"{meta_path}: schema {str(meta.get('schema'))[:40]!r}, this version reads {CACHE_SCHEMA}; "
                         "rebuild the cache")
    _check_manifest(meta, meta_path)
    for i, info in enumerate(meta["shards"]):
        _check_part(path, meta, info, i)
    return ActivationCache(path=path, model_hash=meta["model_hash"], site=Site(meta["tower"], meta["site"]),
                           d=meta["d"], rows=meta["rows"], shards=list(meta["shards"]),
                           samples=meta.get("samples") or 0, source=dict(meta.get("source") or {}))


_PART_FILE = re.compile(r"(part|shard)-\d{5,}\.safetensors")


def _no_manifest(path: str) -> str:
    """Why a folder without cache.json cannot be read: missing, unfinished, or something else."""
    if not os.path.exists(path):
        return f"cache folder {path} does not exist; build one with 'clipsurgery embed' (or 'sae train --images')"
    if not os.path.isdir(path):
        return f"{path} is a file, not a cache folder; pass the folder 'clipsurgery embed' wrote"
    with contextlib.suppress(OSError):
        names = os.listdir(path)
        if any(n.startswith("part-") and _PART_FILE.fullmatch(n) for n in names):
            return (f"{path} is an unfinished cache: it has parts but no {CACHE_JSON} ('clipsurgery embed' was "
                    "stopped or failed before it finished); rerun the same 'clipsurgery embed' command to finish it "
                    "(finished parts are kept)")
        if any(_PART_FILE.fullmatch(n) for n in names):
            return (f"{path} is an unfinished cache: it has shards but no {CACHE_JSON} (its build was stopped); "
                    "rerun the command that built it")
    return f"{path} is not an activation cache (no {CACHE_JSON}); build one with 'clipsurgery embed'"


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_manifest(meta: dict, where: str) -> None:
    """Types and ranges of a manifest's fields (CacheError naming the first that is wrong)."""
    def bad(what: str) -> CacheError:
        return CacheError(f"{where}: {what}; the manifest is damaged or was edited: delete the cache folder and "
                          "rebuild it")

    for key in ("model_hash", "tower", "site"):
        if not isinstance(meta.get(key), str):
            raise bad(f"'{key}' must be a string, got {type(meta.get(key)).__name__}")
    if meta["tower"] not in TOWER_NAMES or meta["site"] not in SITES:
        raise bad(f"unknown tower/site {meta['tower'][:20]!r}/{meta['site'][:20]!r}")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("'shards' must be a non-empty list of parts")
    if not _is_int(meta.get("d"), 1) or not _is_int(meta.get("rows")):
        raise bad(f"'d' and 'rows' must be whole numbers (d >= 1), got {meta.get('d')!r}, {meta.get('rows')!r}")
    if meta.get("samples") is not None and not _is_int(meta["samples"]):
        raise bad(f"'samples' must be a whole number, got {meta['samples']!r}")
    if meta.get("source") is not None and not isinstance(meta["source"], dict):
        raise bad("'source' must be an object")
    for i, info in enumerate(shards):
        if not isinstance(info, dict) or not isinstance(info.get("file"), str) or not _is_int(info.get("rows")):
            raise bad(f"shards[{i}] must be an object with 'file' (a name) and 'rows' (a whole number)")
        if info.get("first_sample") is not None and not _is_int(info["first_sample"]):
            raise bad(f"shards[{i}].first_sample must be a whole number")
        if info.get("samples") is not None and not _is_int(info["samples"]):
            raise bad(f"shards[{i}].samples must be a whole number")
        name = info["file"]
        if name in ("", ".", "..") or os.path.basename(name) != name or "\0" in name or "\\" in name \
                or len(name) > 255:
            raise bad(f"shards[{i}].file {name[:60]!r} is not a file name in the cache folder (an absolute path, "
                      "'..' or a subfolder)")
    if sum(info["rows"] for info in shards) != meta["rows"]:
        raise bad(f"'rows' is {meta['rows']} but the parts hold {sum(info['rows'] for info in shards)}")


def _check_part(path: str, meta: dict, info: dict, i: int) -> None:
    """One part against the manifest: inside the folder, readable, shapes and stamps as recorded."""
    from safetensors import safe_open

    file = os.path.join(path, info["file"])
    if not os.path.isfile(file):
        raise CacheError(f"{path}: part {info['file']} is missing; delete the cache folder and rebuild it")
    if os.path.dirname(os.path.realpath(file)) != os.path.realpath(path):
        raise CacheError(f"{path}: part {info['file']} links outside the cache folder; a cache keeps its parts "
                         "inside it")
    try:
        with safe_open(file, framework="pt") as fh:
            stamp = fh.metadata() or {}
            names = set(fh.keys())
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in ("acts", "sample", "token") if k in names}
    except Exception as exc:  # noqa: BLE001 - truncated, not safetensors: say which, never a traceback
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise CacheError(f"{path}: part {info['file']} is damaged ({reason}); "
                         "it may have been cut short (a full disk): rerun 'clipsurgery embed' (the part is redone) or "
                         "rebuild the cache") from None
    rows, d = info["rows"], meta["d"]
    if "acts" not in shapes or "sample" not in shapes:
        raise CacheError(f"{path}: part {info['file']} has no 'acts'/'sample' tensors; rebuild the cache")
    if shapes["acts"] != [rows, d] or shapes["sample"] != [rows] or shapes.get("token", [rows]) != [rows]:
        raise CacheError(f"{path}: part {info['file']} holds acts of shape {shapes['acts']}, the manifest says "
                         f"[{rows}, {d}]: the part does not belong to this cache; rebuild it")
    recorded = {k: _stored(stamp[k]) for k in ("model_hash", "clipsurgery.model_hash", "tower", "site", "rows",
                                                "content", "unit") if k in stamp}
    expected = {"model_hash": meta["model_hash"], "clipsurgery.model_hash": meta["model_hash"],
                "tower": meta["tower"], "site": meta["site"], "rows": rows, "content": info.get("content"),
                "unit": info.get("unit")}
    differ = [k.replace("clipsurgery.", "") for k, v in recorded.items()
              if expected[k] is not None and v != expected[k] and stamp[k] != expected[k]]
    if differ:
        what = ("another model" if any("model_hash" in k for k in differ) else
                "other data" if "content" in differ or "unit" in differ else "other settings")
        raise CacheError(f"{path}: part {info['file']} was made from {what} than the manifest records "
                         f"({', '.join(differ)} differ): the cache mixes parts of different runs; rebuild it")


def _stored(value: str):
    """A safetensors metadata value as written by write_safetensors (JSON for non-strings)."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value


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
