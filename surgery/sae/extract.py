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
and temp files only: a rerun keeps the parts that are done and redoes the rest (resume). Each part
records what it was made from (the unit's files, their sizes and mtimes, its content hash and its
sidecar's hash): a part whose source changed since (a shard replaced under the same name, a folder
that gained files so its units now name other files) is redone, never kept. Settings that differ
(model, site, preprocessing, batch size, ...) are refused, naming them, before anything in the
folder is touched; ``force`` removes only the tool's own ``part-NNNNN.{json,safetensors}`` and
``cache.json``. The cache folder may not be (or lie inside) the image folder. Rows are
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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from surgery.errors import CacheError, DataError
from surgery.io.checkpoint import write_safetensors
from surgery.io.fs import check_folder_writable, write_text_atomic
from surgery.io.images import DECODE_ERRORS, DEFAULT_MAX_PIXELS, decode_reason, open_image
from surgery.io.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_UNIT_IMAGES,
    LABEL_ERROR_KEY,
    ImageSource,
    ReadOptions,
    ShardError,
    Unit,
    content_hash,
    iter_units,
    read_unit,
)
from surgery.runtime.distributed import Ranks, agree
from surgery.sae.activations import CACHE_JSON, CACHE_SCHEMA, ActivationCache, Site, capture, open_cache

log = logging.getLogger(__name__)

PART_SCHEMA = "clipsurgery.embed-part/1"
#: The files ``embed`` writes in its folder (all that --force removes, besides cache.json).
PART_FILE = re.compile(r"part-\d{5,}\.(json|safetensors)")
Progress = Callable[[int, int], None]  # (images done over all ranks, images in the source if known else 0)


@dataclass(frozen=True)
class ExtractOptions:
    batch_size: int = 64  # images per forward pass (part of a part's identity: bits can depend on it)
    unit_images: int = DEFAULT_UNIT_IMAGES  # images per part, for folders (a shard is one part)
    seed: int = 0  # row order within each part
    max_skipped_fraction: float = 0.05  # undecodable images over the whole job before refusing
    max_failed_shards: float = 0.05  # missing or damaged shards (fraction of shards) before refusing
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped before decoding (decompression bombs)
    image_key: str | None = None  # tar member extension holding the image (jpg, seg.png); None: io.shards' rule
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a shard with a larger member (decompressed) is unreadable
    max_bad_labels: float = 0.05  # samples whose label JSON cannot be parsed (fraction) before refusing

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.unit_images < 1:
            raise DataError(f"batch_size and unit_images must be >= 1, got {self.batch_size}, {self.unit_images}")
        for name in ("max_skipped_fraction", "max_failed_shards", "max_bad_labels"):
            if not 0 <= getattr(self, name) <= 1:
                raise DataError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")
        self.read_options()  # checks image_key and max_member_bytes

    def read_options(self) -> ReadOptions:
        return ReadOptions(image_key=self.image_key, max_member_bytes=self.max_member_bytes)


@dataclass
class ExtractResult:
    cache: ActivationCache  # the whole cache, opened
    images: int  # inputs embedded (all ranks, this run and resumed parts)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of undecodable images
    failed_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason)
    bad_labels: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of unparsable label JSON
    reused_parts: int = 0  # parts a previous run had finished (all ranks)
    redone_parts: int = 0  # parts an earlier run had finished from sources that changed since (all ranks)
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
    check_cache_folder(out_dir, source)
    units = source.units(opt.unit_images)
    stamp = {"model_hash": model_hash, "tower": site.tower, "site": site.site, "preprocess": preprocess,
             "seed": opt.seed, "batch_size": opt.batch_size, "max_pixels": opt.max_pixels,
             "image_key": opt.image_key}
    agree(ranks, {**{k: str(v) for k, v in stamp.items()}, "data": source.fingerprint(), "units": str(len(units)),
                  "out": os.path.abspath(out_dir), "max_member_bytes": str(opt.max_member_bytes)})
    if not force:  # every rank alike, and before anything in the folder is removed
        _refuse_other_settings(out_dir, units, stamp)
    if ranks.main:
        _prepare(out_dir, force, units, stamp, source.root)
    ranks.barrier()
    model.eval()
    done_images = reused = redone = 0
    skipped: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    bad_labels: list[tuple[str, str]] = []
    total = sum(len(u.files) for u in units)  # known for folders; shards: 0 (unknown until read)

    def advance(n: int) -> None:  # one bar on rank 0 counts every rank's images (a counter in the store)
        seen = ranks.add_counter("embed/images", n)
        if progress is not None and ranks.main:
            progress(seen, total)

    for unit in iter_units(units, ranks.rank, ranks.world):
        state, part = part_state(out_dir, unit, stamp, source.root)
        if state == "done":  # finished by an earlier run: its images and its skipped ones count as before
            reused += 1
            n = int(part["embedded"])
            sidecar = json.loads(Path(out_dir, part_name(unit) + ".json").read_text(encoding="utf-8"))
            skipped += [tuple(s) for s in sidecar.get("skipped", [])]
            bad_labels += [tuple(b) for b in sidecar.get("bad_labels", [])]
            advance(n)
        else:
            if state == "changed":
                redone += 1
                log.warning("%s changed since its part was written; embedding it again", unit.name)
            try:
                n, unit_skipped, unit_bad = _extract_unit(model, site, source, unit, out_dir, transform, opt, stamp,
                                                          advance)
            except ShardError as exc:
                failed.append((unit.name, str(exc)))
                log.warning("%s; skipped", exc)
                continue
            skipped += unit_skipped
            bad_labels += unit_bad
        done_images += n
    gathered = ranks.all_gather_objects((done_images, reused, skipped, failed, bad_labels, redone))
    ranks.barrier()
    images = sum(g[0] for g in gathered)
    all_skipped = [s for g in gathered for s in g[2]]
    all_skipped += [(name, "file name is not UTF-8") for name in source.bad_names]
    all_failed = sorted(f for g in gathered for f in g[3])
    all_bad = [b for g in gathered for b in g[4]]
    _check_losses(units, source, images, all_skipped, all_failed, all_bad, opt)
    if ranks.main:
        _write_manifest(out_dir, units, stamp, source, all_failed, len(all_bad))
    ranks.barrier()
    return ExtractResult(open_cache(out_dir), images, all_skipped, all_failed, all_bad, sum(g[1] for g in gathered),
                         sum(g[5] for g in gathered), time.perf_counter() - start)


def check_cache_folder(out_dir: str, source: ImageSource) -> None:
    """Refuse a cache folder that is (or lies inside) the image folder, a file, or a place that
    cannot be written, before any work."""
    out = os.path.realpath(out_dir)
    roots = [source.root] if source.kind == "folder" else [source.spec] if os.path.isdir(source.spec) else []
    for root in roots:
        real = os.path.realpath(root)
        if out == real or out.startswith(real.rstrip(os.sep) + os.sep):
            raise DataError(f"--out {out_dir} is {'the' if out == real else 'inside the'} image folder {root}: the "
                            "cache's files would mix with the images; choose a folder outside it")
    check_folder_writable(out_dir)


# ----------------------------------------------------------------------------------------- units
def _extract_unit(model, site, source, unit, out_dir, transform, opt, stamp, advance: Callable[[int], None]
                  ) -> tuple[int, list[tuple[str, str]], list[tuple[str, str]]]:
    """Embed one unit and write its part; returns (inputs embedded, skipped (key, reason), label
    JSON that could not be parsed (key, reason)). ``advance(n)`` after each forward pass of n images."""
    sources = _sources_key(unit, source.root)  # before reading: a change while it is read shows next time
    samples, content = read_unit(unit, source.root, opt.read_options())
    skipped: list[tuple[str, str]] = []
    shown = (lambda s: f"{unit.name}:{s.key}") if unit.kind == "tar" else (lambda s: s.key)  # noqa: E731
    bad_labels = [(shown(s), s.meta[LABEL_ERROR_KEY]) for s in samples if LABEL_ERROR_KEY in s.meta]
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
        if sample.problem is not None:  # image members, but none that the rule (or --image-key) picks
            skipped.append((shown(sample), sample.problem))
            continue
        try:
            image = open_image(sample.image if sample.image is not None else sample.path, opt.max_pixels)
        except DECODE_ERRORS as exc:
            skipped.append((shown(sample), decode_reason(exc)))
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
               "meta": [s.meta for s in samples], "embedded": kept, "skipped": skipped, "bad_labels": bad_labels}
    sidecar_text = json.dumps(sidecar)
    write_text_atomic(os.path.join(out_dir, name + ".json"), sidecar_text)
    _fault_point(unit)
    write_safetensors({"acts": acts[order].contiguous(), "sample": ids[order].contiguous(),
                       "token": tokens[order].contiguous()},
                      os.path.join(out_dir, name + ".safetensors"),
                      {**stamp, "schema": PART_SCHEMA, "unit": unit.name, "rows": int(acts.shape[0]),
                       "samples": len(samples), "embedded": len(kept), "content": content,
                       "d": int(acts.shape[1]) if acts.dim() == 2 else 0, "files": _files_key(unit),
                       "sources": sources, "sidecar": hashlib.sha256(sidecar_text.encode()).hexdigest()})
    return len(kept), skipped, bad_labels


#: Test hook: ``CLIPSURGERY_KILL_AT_PART=N`` SIGKILLs the process that is writing part N, between its
#: sidecar and its tensors (a real kill, mid-part, at a point a test can choose).
KILL_AT_PART_ENV = "CLIPSURGERY_KILL_AT_PART"


def _fault_point(unit: Unit) -> None:
    if os.environ.get(KILL_AT_PART_ENV) == str(unit.index):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def part_state(out_dir: str, unit: Unit, stamp: dict, root: str = "") -> tuple[str, dict | None]:
    """What an earlier run left for ``unit``: ("missing", None), ("done", part metadata) when the
    part is whole and its source unchanged, or ("changed", metadata) when it must be redone (the
    unit's files, or their bytes, differ from what the part was made from; or the part or its
    sidecar is damaged or does not match). A part made with other settings raises CacheError
    (:func:`_refuse_other_settings`)."""
    path = os.path.join(out_dir, part_name(unit) + ".safetensors")
    sidecar_path = os.path.join(out_dir, part_name(unit) + ".json")
    if not os.path.isfile(path) or not os.path.isfile(sidecar_path):
        return "missing", None
    try:
        meta = _part_meta(path)
    except CacheError:  # damaged (not by us: parts are written atomically): the tool's own file, redone
        return "changed", None
    _check_settings(out_dir, path, meta, unit, stamp)
    try:
        sidecar = Path(sidecar_path).read_bytes()
    except OSError:
        return "changed", meta
    if "sidecar" in meta and hashlib.sha256(sidecar).hexdigest() != meta["sidecar"]:
        return "changed", meta  # killed between a new sidecar and its tensors
    if "files" in meta:
        if meta["files"] != _files_key(unit):
            return "changed", meta  # a folder unit that now names other files
    elif unit.kind == "folder":  # a part from before "files" was recorded: its sidecar lists them
        try:
            if json.loads(sidecar).get("keys") != list(unit.files):
                return "changed", meta
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return "changed", meta
    if meta.get("sources") is not None and meta.get("sources") == _sources_key(unit, root):
        return "done", meta
    try:  # sizes or mtimes differ (or were not recorded): the bytes decide
        same = content_hash(unit, root) == meta.get("content")
    except OSError:
        return "changed", meta  # the source is gone: redoing it reports it missing
    return ("done" if same else "changed"), meta


def _refuse_other_settings(out_dir: str, units: list[Unit], stamp: dict) -> None:
    """Raise CacheError naming the differences when a part in ``out_dir`` was made with other
    settings (reads part headers only; changes nothing)."""
    for unit in units:
        path = os.path.join(out_dir, part_name(unit) + ".safetensors")
        if os.path.isfile(path):
            try:
                meta = _part_meta(path)
            except CacheError:
                continue  # damaged: redone
            _check_settings(out_dir, path, meta, unit, stamp)


def _check_settings(out_dir: str, path: str, meta: dict, unit: Unit, stamp: dict) -> None:
    differences = [k for k in stamp if meta.get(k) != _as_stored(stamp[k])]
    if meta.get("unit") != unit.name:
        differences.append(f"unit (part holds {meta.get('unit')})")
    if differences:
        raise CacheError(f"{out_dir} holds a part ({os.path.basename(path)}) made with other settings "
                         f"({', '.join(differences)}); nothing was changed: pass --force to start over, or "
                         "another --out")


def _files_key(unit: Unit) -> str | None:
    """Folder units: a hash of the file names the unit holds (a folder that gained files shifts them)."""
    if unit.kind != "folder":
        return None
    return hashlib.sha256("\0".join(unit.files).encode()).hexdigest()


def _sources_key(unit: Unit, root: str) -> str | None:
    """A hash of the unit's source files' names, sizes and mtimes (None when one is missing): equal
    keys mean the part can be kept without reading the sources again."""
    names = [unit.name] if unit.kind == "tar" else [os.path.join(root, f) for f in unit.files]
    digest = hashlib.sha256()
    for name in names:
        try:
            st = os.stat(name)
        except OSError:
            return None
        digest.update(f"{os.path.basename(name)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


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


def _prepare(out_dir: str, force: bool, units: list[Unit], stamp: dict, root: str) -> None:
    """Rank 0, before any work (settings already checked): the folder exists; with ``force`` the
    tool's own parts are gone (nothing else); the manifest is removed when a part will be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create {out_dir} ({(exc.strerror or str(exc)).lower()}); choose another --out") \
            from None
    if force:
        for entry in os.scandir(out_dir):
            if PART_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
    needs_work = force or any(part_state(out_dir, u, stamp, root)[0] != "done" for u in units)
    if needs_work:  # a stale manifest must not describe new parts; rewritten once every part exists
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, CACHE_JSON))
    # temp files of a killed write are removed when that part is written again (atomic_output)


def _check_losses(units, source, images, skipped, failed, bad_labels, opt) -> None:
    """Refuse (every rank alike) when too many shards, images or labels were unusable."""
    if failed and len(failed) / len(units) > opt.max_failed_shards:
        raise DataError(f"{len(failed)} of {len(units)} shards are missing or damaged "
                        f"({len(failed) / len(units):.1%} > {opt.max_failed_shards:.1%}), e.g. {failed[0][1]}; "
                        "fix them or raise --max-failed-shards")
    seen = images + len(skipped)
    if skipped and len(skipped) / max(1, seen) > opt.max_skipped_fraction:
        raise DataError(f"{len(skipped)} of {seen} images are unreadable ({len(skipped) / seen:.1%} > "
                        f"{opt.max_skipped_fraction:.1%}), e.g. '{skipped[0][0]}': {skipped[0][1]}; "
                        "fix the images or raise --max-skipped-images")
    if images == 0:
        raise DataError(f"no image of {source.spec!r} could be embedded; check the source")
    if bad_labels and len(bad_labels) / max(1, seen) > opt.max_bad_labels:
        raise DataError(f"{len(bad_labels)} of {seen} samples have label JSON that cannot be parsed "
                        f"({len(bad_labels) / seen:.1%} > {opt.max_bad_labels:.1%}), e.g. '{bad_labels[0][0]}'; "
                        "fix the JSON or raise --max-bad-labels")


def _write_manifest(out_dir, units, stamp, source, failed, bad_labels: int = 0) -> None:
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
                "extract": {k: stamp[k] for k in ("seed", "batch_size", "max_pixels", "image_key")},
                "failed_shards": [{"shard": n, "reason": r} for n, r in failed], "bad_labels": bad_labels}
    write_text_atomic(os.path.join(out_dir, CACHE_JSON), json.dumps(manifest, indent=1))


def read_part_sidecars(cache: ActivationCache) -> list[dict]:
    """Each part's sidecar (keys, captions, shard metadata), in cache order (embed caches only).

    A sidecar must be the one its part was written with (the part records its hash) and list one
    key and one metadata entry per sample; otherwise CacheError (one line naming the file)."""
    out = []
    for info in cache.shards:
        part = os.path.join(cache.path, info["file"])
        path = os.path.splitext(part)[0] + ".json"
        if not os.path.isfile(path):
            raise CacheError(f"{cache.path} was not written by 'clipsurgery embed' (no {os.path.basename(path)}); "
                             "its inputs' keys and labels are not recorded")
        try:
            raw = Path(path).read_bytes()
            sidecar = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CacheError(f"{path} is damaged ({type(exc).__name__}); rebuild the cache with "
                             "'clipsurgery embed --force'") from None
        recorded = _part_meta(part).get("sidecar")
        if recorded is not None and hashlib.sha256(raw).hexdigest() != recorded:
            raise CacheError(f"{path} is not the sidecar its part {info['file']} was written with (hash differs): "
                             "the cache mixes files of different runs; rebuild it with 'clipsurgery embed --force'")
        keys = sidecar.get("keys") if isinstance(sidecar, dict) else None
        metas = sidecar.get("meta") if isinstance(sidecar, dict) else None
        if not isinstance(keys, list) or not isinstance(metas, list) or len(keys) != len(metas) \
                or len(keys) != int(info.get("samples", len(keys))) \
                or not all(m is None or isinstance(m, dict) for m in metas):
            raise CacheError(f"{path} does not list one key and one metadata object per sample of "
                             f"{info['file']}; rebuild the cache with 'clipsurgery embed --force'")
        out.append(sidecar)
    return out


__all__ = ["ExtractOptions", "ExtractResult", "extract", "part_name", "read_part_sidecars"]
