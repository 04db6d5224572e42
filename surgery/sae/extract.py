"""``clipsurgery embed``: a CLIP's activations over an image source, on one process or many.

The source (a folder or WebDataset shards, :mod:`surgery.io.shards`) is cut into units; the units
are dealt to the ranks round-robin, and each unit becomes one cache part written by the rank that
read it::

    OUT/part-00007.safetensors   "acts" (n, D) float32, "sample" (n,) int64 (position in the unit),
                                 "token" (n,) int64 (token position; 0 = class token, and for embeddings)
    OUT/part-00007.json          the unit's keys, captions and shard metadata (labels), skipped images
    OUT/cache.json               the manifest (written last, by rank 0): model hash, site,
                                 preprocessing, data hash, rows per part, each part's first sample

A part is written atomically (sidecar first, then the tensors), so a killed run leaves whole parts
and temp files only: a rerun keeps the parts that are done and redoes the rest (resume). Rows are
shuffled within a part by a generator seeded with (seed, unit), so a training batch read as a
slice mixes inputs, and the cache is the same, row for row, whatever the number of ranks. The
manifest has the :mod:`surgery.sae.activations` schema, so ``sae train``/``sae neurons`` read it
as one cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from surgery.errors import CacheError, DataError
from surgery.io.checkpoint import write_safetensors
from surgery.io.fs import write_text_atomic
from surgery.io.images import DECODE_ERRORS, DEFAULT_MAX_PIXELS, decode_reason, open_image
from surgery.io.shards import DEFAULT_UNIT_IMAGES, ImageSource, ShardError, Unit, iter_units, read_unit
from surgery.runtime.distributed import Ranks, agree
from surgery.sae.activations import CACHE_JSON, CACHE_SCHEMA, ActivationCache, Site, capture, open_cache

log = logging.getLogger(__name__)

PART_SCHEMA = "clipsurgery.embed-part/1"
Progress = Callable[[int, int], None]  # (images done over all ranks, images in the source if known else 0)


@dataclass(frozen=True)
class ExtractOptions:
    batch_size: int = 64  # images per forward pass (part of a part's identity: bits can depend on it)
    unit_images: int = DEFAULT_UNIT_IMAGES  # images per part, for folders (a shard is one part)
    seed: int = 0  # row order within each part
    max_skipped_fraction: float = 0.05  # undecodable images over the whole job before refusing
    max_failed_shards: float = 0.05  # missing or damaged shards (fraction of shards) before refusing
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped before decoding (decompression bombs)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.unit_images < 1:
            raise DataError(f"batch_size and unit_images must be >= 1, got {self.batch_size}, {self.unit_images}")
        for name in ("max_skipped_fraction", "max_failed_shards"):
            if not 0 <= getattr(self, name) <= 1:
                raise DataError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")


@dataclass
class ExtractResult:
    cache: ActivationCache  # the whole cache, opened
    images: int  # inputs embedded (all ranks, this run and resumed parts)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of undecodable images
    failed_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason)
    reused_parts: int = 0  # parts a previous run had finished (all ranks)
    seconds: float = 0.0  # this rank's wall time


def part_name(unit: Unit) -> str:
    return f"part-{unit.index:05d}"


def extract(model: nn.Module, site: Site, source: ImageSource, out_dir: str, transform: Callable,
            options: ExtractOptions | None = None, *, ranks: Ranks | None = None, model_hash: str,
            preprocess: str, force: bool = False, progress: Progress | None = None) -> ExtractResult:
    """Embed ``source`` through ``model`` at ``site`` into the cache folder ``out_dir`` (see module doc).

    Every rank calls this with the same arguments; the ranks check they agree (model, site, data,
    options) before any work. ``transform``: PIL image -> (3, H, W). ``preprocess``: the
    preprocessing's identity (recorded; a resume with other preprocessing is refused).
    ``force``: delete an earlier run's parts first. Returns on every rank once the manifest exists.
    """
    opt = options or ExtractOptions()
    ranks = ranks or Ranks()
    start = time.perf_counter()
    units = source.units(opt.unit_images)
    stamp = {"model_hash": model_hash, "tower": site.tower, "site": site.site, "preprocess": preprocess,
             "seed": opt.seed, "batch_size": opt.batch_size, "max_pixels": opt.max_pixels}
    agree(ranks, {**{k: str(v) for k, v in stamp.items()}, "data": source.fingerprint(), "units": str(len(units)),
                  "out": os.path.abspath(out_dir)})
    if ranks.main:
        _prepare(out_dir, force)
    ranks.barrier()
    model.eval()
    done_images = reused = 0
    skipped: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    total = sum(len(u.files) for u in units)  # known for folders; shards: 0 (unknown until read)

    def advance(n: int) -> None:  # one bar on rank 0 counts every rank's images (a counter in the store)
        seen = ranks.add_counter("embed/images", n)
        if progress is not None and ranks.main:
            progress(seen, total)

    for unit in iter_units(units, ranks.rank, ranks.world):
        part = _finished_part(out_dir, unit, stamp)
        if part is not None:  # finished by an earlier run: its images and its skipped ones count as before
            reused += 1
            n = int(part["embedded"])
            sidecar = json.loads(Path(out_dir, part_name(unit) + ".json").read_text(encoding="utf-8"))
            skipped += [tuple(s) for s in sidecar.get("skipped", [])]
            advance(n)
        else:
            try:
                n, unit_skipped = _extract_unit(model, site, source, unit, out_dir, transform, opt, stamp, advance)
            except ShardError as exc:
                failed.append((unit.name, str(exc)))
                log.warning("%s; skipped", exc)
                continue
            skipped += unit_skipped
        done_images += n
    gathered = ranks.all_gather_objects((done_images, reused, skipped, failed))
    ranks.barrier()
    images = sum(g[0] for g in gathered)
    all_skipped = [s for g in gathered for s in g[2]]
    all_failed = sorted(f for g in gathered for f in g[3])
    _check_losses(units, source, images, all_skipped, all_failed, opt)
    if ranks.main:
        _write_manifest(out_dir, units, stamp, source, all_failed)
    ranks.barrier()
    return ExtractResult(open_cache(out_dir), images, all_skipped, all_failed, sum(g[1] for g in gathered),
                         time.perf_counter() - start)


# ----------------------------------------------------------------------------------------- units
def _extract_unit(model, site, source, unit, out_dir, transform, opt, stamp,
                  advance: Callable[[int], None]) -> tuple[int, list[tuple[str, str]]]:
    """Embed one unit and write its part; returns (inputs embedded, skipped (key, reason)).
    ``advance(n)`` after each forward pass of n images."""
    samples, content = read_unit(unit, source.root)
    skipped: list[tuple[str, str]] = []
    kept: list[int] = []  # positions in ``samples`` that were embedded
    acts_parts, id_parts, token_parts = [], [], []
    batch: list[torch.Tensor] = []
    positions: list[int] = []

    def flush() -> None:
        if not batch:
            return
        acts = capture(model, site, torch.stack(batch))  # (B, D), or (B, N, D) at the residual site
        b = acts.shape[0]
        n = acts.shape[1] if acts.dim() == 3 else 1
        ids = torch.arange(b).repeat_interleave(n)  # (B N,) input of each row, within the batch
        tokens = torch.arange(n).repeat(b)  # (B N,) token position of each row (0 = class token)
        acts = acts.reshape(b * n, -1)
        if not torch.isfinite(acts).all():
            raise CacheError(f"the model produced NaN or inf activations at {site.tower}/{site.site} on "
                             f"{unit.name}; check the weights and precision (use fp32)")
        acts_parts.append(acts.cpu())
        id_parts.append(torch.tensor(positions, dtype=torch.int64)[ids])
        token_parts.append(tokens)
        advance(b)
        batch.clear()
        positions.clear()

    for position, sample in enumerate(samples):
        try:
            image = open_image(sample.image if sample.image is not None else sample.path, opt.max_pixels)
        except DECODE_ERRORS as exc:
            skipped.append((f"{unit.name}:{sample.key}" if unit.kind == "tar" else sample.key, decode_reason(exc)))
            continue
        batch.append(transform(image))
        positions.append(position)
        kept.append(position)
        if len(batch) == opt.batch_size:
            flush()
    flush()
    if acts_parts:
        acts, ids, tokens = torch.cat(acts_parts), torch.cat(id_parts), torch.cat(token_parts)
    else:
        acts, ids, tokens = torch.empty(0, 0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(opt.seed * 1_000_003 + unit.index))
    name = part_name(unit)
    sidecar = {"schema": PART_SCHEMA, "unit": unit.name, "index": unit.index,
               "keys": [s.key for s in samples], "captions": [s.caption for s in samples],
               "meta": [s.meta for s in samples], "embedded": kept, "skipped": skipped}
    write_text_atomic(os.path.join(out_dir, name + ".json"), json.dumps(sidecar))
    _fault_point(unit)
    write_safetensors({"acts": acts[order].contiguous(), "sample": ids[order].contiguous(),
                       "token": tokens[order].contiguous()},
                      os.path.join(out_dir, name + ".safetensors"),
                      {**stamp, "schema": PART_SCHEMA, "unit": unit.name, "rows": int(acts.shape[0]),
                       "samples": len(samples), "embedded": len(kept), "content": content,
                       "d": int(acts.shape[1]) if acts.dim() == 2 else 0})
    return len(kept), skipped


#: Test hook: ``CLIPSURGERY_KILL_AT_PART=N`` SIGKILLs the process that is writing part N, between its
#: sidecar and its tensors (a real kill, mid-part, at a point a test can choose).
KILL_AT_PART_ENV = "CLIPSURGERY_KILL_AT_PART"


def _fault_point(unit: Unit) -> None:
    if os.environ.get(KILL_AT_PART_ENV) == str(unit.index):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _finished_part(out_dir: str, unit: Unit, stamp: dict) -> dict | None:
    """The metadata of ``unit``'s part when a run with the same settings finished it; None when there
    is none; a part made with other settings is refused (CacheError naming what differs)."""
    path = os.path.join(out_dir, part_name(unit) + ".safetensors")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(out_dir, part_name(unit) + ".json")):
        return None
    meta = _part_meta(path)
    differences = [k for k in stamp if meta.get(k) != _as_stored(stamp[k])]
    if meta.get("unit") != unit.name:
        differences.append(f"unit (part holds {meta.get('unit')})")
    if differences:
        raise CacheError(f"{out_dir} holds a part ({os.path.basename(path)}) made with other settings "
                         f"({', '.join(differences)}); pass --force to start over, or another --out")
    return meta


def _as_stored(value):
    """A metadata value as :func:`_part_meta` reads it back (strings holding JSON come back parsed)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _part_meta(path: str) -> dict:
    try:
        with safe_open(path, framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - a damaged part: say which, never a traceback
        raise CacheError(f"{path} is damaged ({str(exc)[:80]}); delete it and rerun (it will be redone)") from None
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _prepare(out_dir: str, force: bool) -> None:
    """Rank 0, before any work: the folder exists, a stale manifest and killed writes are gone."""
    os.makedirs(out_dir, exist_ok=True)
    if force:
        for path in Path(out_dir).glob("part-*"):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out_dir, CACHE_JSON))  # rewritten once every part exists
    # temp files of a killed write are removed when that part is written again (atomic_output)


def _check_losses(units, source, images, skipped, failed, opt) -> None:
    """Refuse (every rank alike) when too many shards or images were unusable."""
    if failed and len(failed) / len(units) > opt.max_failed_shards:
        raise DataError(f"{len(failed)} of {len(units)} shards are missing or damaged "
                        f"({len(failed) / len(units):.1%} > {opt.max_failed_shards:.1%}), e.g. {failed[0][1]}; "
                        "fix them or raise --max-failed-shards")
    seen = images + len(skipped)
    if skipped and len(skipped) / max(1, seen) > opt.max_skipped_fraction:
        raise DataError(f"{len(skipped)} of {seen} images are unreadable ({len(skipped) / seen:.1%} > "
                        f"{opt.max_skipped_fraction:.1%}), e.g. {skipped[0][0]!r}: {skipped[0][1]}; "
                        "fix the images or raise the threshold")
    if images == 0:
        raise DataError(f"no image of {source.spec!r} could be embedded; check the source")


def _write_manifest(out_dir, units, stamp, source, failed) -> None:
    failed_names = {name for name, _ in failed}
    parts, first, d = [], 0, None
    for unit in units:
        if unit.name in failed_names:
            continue
        meta = _part_meta(os.path.join(out_dir, part_name(unit) + ".safetensors"))
        if meta.get("rows"):
            d = int(meta["d"])
        parts.append({"file": part_name(unit) + ".safetensors", "rows": int(meta["rows"]), "first_sample": first,
                      "samples": int(meta["samples"]), "unit": unit.name, "content": meta["content"]})
        first += int(meta["samples"])
    data_hash = hashlib.sha256("".join(p["content"] for p in parts).encode()).hexdigest()
    manifest = {"schema": CACHE_SCHEMA, "model_hash": stamp["model_hash"], "tower": stamp["tower"],
                "site": stamp["site"], "d": d, "rows": sum(p["rows"] for p in parts if p["rows"]),
                "samples": first, "shards": [p for p in parts if p["rows"]],
                "source": {"kind": "images", "spec": source.spec, "data_hash": data_hash,
                           "preprocess": stamp["preprocess"]},
                "extract": {k: stamp[k] for k in ("seed", "batch_size", "max_pixels")},
                "failed_shards": [{"shard": n, "reason": r} for n, r in failed]}
    write_text_atomic(os.path.join(out_dir, CACHE_JSON), json.dumps(manifest, indent=1))


def read_part_sidecars(cache: ActivationCache) -> list[dict]:
    """Each part's sidecar (keys, captions, shard metadata), in cache order (embed caches only)."""
    out = []
    for info in cache.shards:
        path = os.path.join(cache.path, info["file"].replace(".safetensors", ".json"))
        if not os.path.isfile(path):
            raise CacheError(f"{cache.path} was not written by 'clipsurgery embed' (no {os.path.basename(path)}); "
                             "its inputs' keys and labels are not recorded")
        out.append(json.loads(Path(path).read_text(encoding="utf-8")))
    return out


__all__ = ["ExtractOptions", "ExtractResult", "extract", "part_name", "read_part_sidecars"]
