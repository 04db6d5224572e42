"""A deterministic planted-bias world: shapes (standing in for occupations) drawn with a protected
attribute (colour or texture, standing in for demographic groups).

In the TRAIN split each concept ``c`` co-occurs with its assigned group ``c % n_groups`` with
probability ``bias_strength`` (the rest uniform over the other groups); captions mostly name the
concept only, so a CLIP trained on it learns the correlation without being told. The EVAL split is
balanced: every concept x group pair equally often. Nuisance variation: position, size, background
grey level, colour jitter, texture phase, pixel noise.

Rendering is numpy only: every shape is a signed distance function in normalised coordinates
(the shape spans about [-1, 1]), anti-aliased by coverage ``clip(0.5 - distance_in_pixels, 0, 1)``.
Same parameters + split + n -> identical bytes (``GENERATOR_VERSION`` is bumped whenever drawing
changes, and is part of :meth:`WorldParams.hash`).

On disk (:func:`write_split`): ``images/000000.png ...``, ``labels.csv`` (``file,concept,group``,
file relative to ``images/``), ``captions.csv`` (``file,caption``), ``world.json`` (params, split,
n) — the same formats :mod:`surgery.io` reads.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from surgery.errors import DataError
from surgery.io.captions import load_captions
from surgery.io.labels import load_labels
from surgery.world.params import GENERATOR_VERSION, WORLD_JSON, WorldParams
from surgery.world.prompts import CAPTION_TEMPLATES, describe
from surgery.world.shapes import COLORS, SHAPES, texture_pattern

logger = logging.getLogger(__name__)
SPLITS = ("train", "eval")
LABELS_CSV = "labels.csv"
CAPTIONS_CSV = "captions.csv"
IMAGES_DIR = "images"
_SPLIT_CODES = {"train": 0, "eval": 1}
DEFAULT_EVAL_SIZE = 1200  # balanced eval images when the caller does not say (rounded to the world's cells)
_CHUNK = 512  # images rendered per noise draw; part of the byte-level determinism contract


def split_dir(labels_path: str | Path, images_dir: str | Path) -> Path:
    """Where a written split keeps its ``world.json`` and ``captions.csv``: beside the labels CSV,
    or the images folder when the labels are a folder (UTKFace names)."""
    return Path(labels_path).parent if Path(labels_path).is_file() else Path(images_dir)


# ----------------------------------------------------------------------------------------- splits
@dataclass
class WorldSplit:
    """One generated split."""
    split: str  # "train" or "eval"
    params: WorldParams  # the parameters it was generated from
    images: np.ndarray  # (n, S, S, 3) uint8
    concepts: np.ndarray  # (n,) int64 index into params.concepts
    groups: np.ndarray  # (n,) int64 index into params.groups
    captions: list[str] = field(default_factory=list)  # n captions, one per image

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def files(self) -> list[str]:
        """File names (relative to ``images/``) used by :func:`write_split`."""
        return [f"{i:06d}.png" for i in range(len(self))]

    @property
    def concept_names(self) -> list[str]:
        return [self.params.concepts[c] for c in self.concepts]

    @property
    def group_names(self) -> list[str]:
        return [self.params.groups[g] for g in self.groups]  # type: ignore[index]


def _draw_labels(params: WorldParams, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Concept and group ids (n,) each: biased for train, balanced and shuffled for eval."""
    c_n, g_n = params.n_concepts, params.n_groups
    if split == "eval":
        cells = np.repeat(np.arange(c_n * g_n), n // (c_n * g_n))
        cells = rng.permutation(cells)
        return (cells // g_n).astype(np.int64), (cells % g_n).astype(np.int64)
    concepts = rng.integers(0, c_n, size=n)
    assigned = concepts % g_n
    keep = rng.random(n) < params.bias_strength
    other = (assigned + rng.integers(1, g_n, size=n)) % g_n  # uniform over the other groups
    return concepts.astype(np.int64), np.where(keep, assigned, other).astype(np.int64)


def _draw_captions(
    params: WorldParams, split: str, concepts: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> list[str]:
    p_group = params.group_in_caption if split == "train" else params.eval_group_in_caption
    templates = rng.integers(0, len(CAPTION_TEMPLATES), size=len(concepts))
    named = rng.random(len(concepts)) < p_group
    return [
        CAPTION_TEMPLATES[t].format(describe(params, int(c), int(g) if m else None))
        for t, c, g, m in zip(templates, concepts, groups, named)
    ]


def _render_chunk(
    params: WorldParams, concepts: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Images (k, S, S, 3) uint8 for the given labels, nuisance drawn from ``rng``."""
    k, s = len(concepts), params.image_size
    diam = rng.uniform(*params.size_range, size=k) * s  # shape diameter in pixels
    room = np.maximum((s - diam) / 2.0, 0.0)
    reach = np.minimum(params.position_jitter * s, room)
    cx = s / 2.0 + rng.uniform(-1.0, 1.0, size=k) * reach
    cy = s / 2.0 + rng.uniform(-1.0, 1.0, size=k) * reach
    background = rng.uniform(*params.background_range, size=k)
    jitter = rng.normal(0.0, params.color_jitter, size=(k, 3))
    phase = rng.integers(0, 5, size=(k, 2))
    ink, paper = rng.uniform(0.05, 0.2, size=k), rng.uniform(0.8, 0.95, size=k)
    noise = rng.standard_normal(size=(k, s, s, 3)) * params.noise_std

    half = (diam / 2.0)[:, None, None]  # (k, 1, 1)
    px = np.arange(s, dtype=np.float64)[None, None, :] + 0.5  # pixel centres (1, 1, S)
    py = np.arange(s, dtype=np.float64)[None, :, None] + 0.5  # (1, S, 1)
    u = (px - cx[:, None, None]) / half  # (k, 1, S) -> broadcast (k, S, S)
    v = -(py - cy[:, None, None]) / half
    u, v = np.broadcast_arrays(u, v)
    dist = np.empty((k, s, s))
    for c in np.unique(concepts):
        sel = concepts == c
        dist[sel] = SHAPES[params.concepts[c]](u[sel], v[sel]) * half[sel]  # distance in pixels
    alpha = np.clip(0.5 - dist, 0.0, 1.0) if params.antialias else (dist <= 0).astype(np.float64)

    fill = np.empty((k, s, s, 3))
    if params.attribute_kind == "color":
        base = np.array([COLORS[params.groups[g]] for g in groups])  # (k, 3)
        fill[:] = np.clip(base + jitter, 0.0, 1.0)[:, None, None, :]
    else:
        ix = np.arange(s)[None, None, :] + phase[:, 0, None, None]
        iy = np.arange(s)[None, :, None] + phase[:, 1, None, None]
        for g in np.unique(groups):
            sel = groups == g
            pattern = texture_pattern(params.groups[g], ix[sel], iy[sel])  # (k_g, S, S)
            grey = ink[sel, None, None] * pattern + paper[sel, None, None] * (1 - pattern)
            fill[sel] = grey[..., None]
    image = background[:, None, None, None] * (1 - alpha[..., None]) + fill * alpha[..., None] + noise
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def balanced_size(params: WorldParams, n: int = DEFAULT_EVAL_SIZE) -> int:
    """The multiple of concepts x groups nearest to ``n`` (at least one image per pair): a valid
    balanced eval split size (1200 for 6 shapes x 2 colours, 1206 for 6 x 3, 1200 for 5 x 4)."""
    cells = params.n_concepts * params.n_groups
    return max(cells, round(n / cells) * cells)


def check_eval_size(params: WorldParams, n: int, what: str = "eval n") -> int:
    """``n`` when it is a multiple of concepts x groups, else a DataError naming the nearest valid sizes."""
    cells = params.n_concepts * params.n_groups
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{what} must be a positive integer, got {n!r}")
    if n % cells:
        below, above = max(cells, n // cells * cells), (n // cells + 1) * cells
        raise DataError(f"{what}={n} is not a multiple of concepts x groups = {cells}; use {below} or {above} "
                        "so every pair appears equally often (or leave it out for the nearest valid size)")
    return int(n)


def generate(params: WorldParams, split: str, n: int) -> WorldSplit:
    """Generate ``n`` images of ``split`` ("train" or "eval").

    The eval split is balanced, so ``n`` must be a multiple of ``n_concepts * n_groups``.
    Deterministic: the random stream is seeded from ``(seed, split)``; labels and captions come
    first, then images in chunks of 512 with a stream per chunk.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")
    if split == "eval":
        check_eval_size(params, n)
    code = _SPLIT_CODES[split]
    rng = np.random.default_rng([params.seed, code])
    concepts, groups = _draw_labels(params, split, int(n), rng)
    captions = _draw_captions(params, split, concepts, groups, rng)
    images = np.empty((n, params.image_size, params.image_size, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        chunk_rng = np.random.default_rng([params.seed, code, 1 + start // _CHUNK])
        images[start:stop] = _render_chunk(params, concepts[start:stop], groups[start:stop], chunk_rng)
    logger.info("generated %d %s images (world %s)", n, split, params.hash()[:12])
    return WorldSplit(split=split, params=params, images=images, concepts=concepts, groups=groups, captions=captions)


# ------------------------------------------------------------------------------------------- disk
def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{str(out_dir)!r} exists and is not a folder; pick another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {str(out_dir)!r} is not empty; pick another or pass overwrite")
        if not (out_dir / WORLD_JSON).is_file():  # --force replaces only what this tool wrote
            raise DataError(f"output folder {str(out_dir)!r} holds files that `world generate` did not write "
                            f"(no {WORLD_JSON}); --force only replaces a world split: pick another --out")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_contents(split: WorldSplit, root: Path) -> None:
    images_dir = root / IMAGES_DIR
    images_dir.mkdir(parents=True)
    files = split.files
    for name, image in zip(files, split.images):
        Image.fromarray(image, mode="RGB").save(images_dir / name, format="PNG")
    concepts, groups = split.concept_names, split.group_names
    _write_csv(root / LABELS_CSV, ["file", "concept", "group"], [[f, c, g] for f, c, g in zip(files, concepts, groups)])
    _write_csv(root / CAPTIONS_CSV, ["file", "caption"], [[f, t] for f, t in zip(files, split.captions)])
    meta = {
        "format": "clipsurgery-world",
        "generator_version": GENERATOR_VERSION,
        "split": split.split,
        "n": len(split),
        "params": split.params.to_dict(),
        "hash": split.params.hash(),
    }
    (root / WORLD_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def write_split(split: WorldSplit, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``split`` to ``out_dir`` atomically (temp folder, then rename); returns ``out_dir``.

    Refuses a non-empty existing ``out_dir`` unless ``overwrite``; then the old folder is replaced
    only once the new one is complete.
    """
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    try:
        _write_contents(split, tmp)
        _prepare_out_dir(out_dir, overwrite)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("wrote %d %s images to %s", len(split), split.split, out_dir)
    return out_dir


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def read_split(out_dir: str | Path) -> WorldSplit:
    """Read a folder written by :func:`write_split` back into a :class:`WorldSplit`."""
    out_dir = Path(out_dir)
    meta_path = out_dir / WORLD_JSON
    if not meta_path.is_file():
        raise DataError(f"{str(out_dir)!r} has no {WORLD_JSON}; it is not a world split folder")
    meta = json.loads(meta_path.read_text())
    params = WorldParams.from_dict(meta["params"])
    table = load_labels(out_dir / LABELS_CSV, required=("concept", "group"),
                        allowed={"concept": params.concepts, "group": params.groups})  # type: ignore[dict-item]
    concepts, _ = table.codes("concept", params.concepts)
    groups, _ = table.codes("group", params.groups)  # type: ignore[arg-type]
    captions = load_captions(out_dir / CAPTIONS_CSV)
    images = np.stack([_read_png(out_dir / IMAGES_DIR / f) for f in table.files])  # (n, S, S, 3)
    texts = [captions[f][0] if f in captions else "" for f in table.files]
    return WorldSplit(split=str(meta["split"]), params=params, images=images, concepts=concepts, groups=groups,
                      captions=texts)
