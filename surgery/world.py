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
n) — the same formats :mod:`surgery.datasets` reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from surgery.datasets import DataError, load_captions, load_labels

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "eval")
ATTRIBUTE_KINDS = ("color", "texture")
WORLD_JSON = "world.json"
LABELS_CSV = "labels.csv"
CAPTIONS_CSV = "captions.csv"
IMAGES_DIR = "images"
PARAMS_JSON = "world_params.json"  # the world's parameters stored beside a trained model
_SPLIT_CODES = {"train": 0, "eval": 1}
_CHUNK = 512  # images rendered per noise draw; part of the byte-level determinism contract

# Group colours (RGB in [0, 1]) for attribute_kind="color".
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.12),
    "blue": (0.14, 0.30, 0.90),
    "green": (0.12, 0.68, 0.22),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (0.98, 0.52, 0.08),
    "cyan": (0.10, 0.80, 0.85),
    "pink": (0.98, 0.50, 0.75),
}
# Texture name -> adjective used in captions, for attribute_kind="texture".
TEXTURES: dict[str, str] = {
    "stripes": "striped",
    "dots": "dotted",
    "checks": "checkered",
    "grid": "gridded",
    "solid": "plain",
}
DEFAULT_CONCEPTS = ("circle", "square", "triangle", "cross", "ring", "star")
DEFAULT_GROUPS = {"color": ("red", "blue"), "texture": ("stripes", "dots")}
CAPTION_TEMPLATES = (
    "a photo of {}",
    "{}",
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
)
QUERY_TEMPLATE = "a photo of {}"  # neutral query = this template with the concept only


# ------------------------------------------------------------------------------------- shapes (SDF)
# Each function takes normalised coordinates u (right) and v (up), arrays of equal shape, and
# returns the signed distance (negative inside) in the same units; shapes span about [-1, 1].
def _length(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)


def _box(u: np.ndarray, v: np.ndarray, bu: float, bv: float) -> np.ndarray:
    du, dv = np.abs(u) - bu, np.abs(v) - bv
    outside = _length(np.maximum(du, 0.0), np.maximum(dv, 0.0))
    return outside + np.minimum(np.maximum(du, dv), 0.0)


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _length(u, v) - 0.95


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _box(u, v, 0.8, 0.8)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral triangle pointing up, side 2.1, bounding box centred (Quilez's exact SDF)."""
    r, k = 1.05, np.sqrt(3.0)
    x = np.abs(u) - r
    y = v + r / (2 * k) + r / k  # centre the bounding box (+r/2k), then Quilez's centroid offset (+r/k)
    fold = x + k * y > 0
    x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * r, 0.0)
    return -_length(x, y) * np.sign(y)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(_length(u, v) - 0.7) - 0.27


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star, outer radius 1.05, inner ratio 0.45 (Quilez's exact SDF)."""
    r, rf = 1.05, 0.45
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    x, y = np.abs(u), v + 0.1  # centre the bounding box vertically
    d = np.maximum(k1x * x + k1y * y, 0.0) * 2
    x, y = x - d * k1x, y - d * k1y
    d = np.maximum(k2x * x + k2y * y, 0.0) * 2
    x, y = x - d * k2x, y - d * k2y
    x, y = np.abs(x), y - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0.0, r)
    return _length(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) + np.abs(v) - 1.05) / np.sqrt(2.0)


def _hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Regular hexagon with flat top and bottom, apothem 0.85 (Quilez's exact SDF)."""
    r, kx, ky, kz = 0.85, -0.866025404, 0.5, 0.577350269
    x, y = np.abs(u), np.abs(v)
    d = np.minimum(kx * x + ky * y, 0.0) * 2
    x, y = x - d * kx, y - d * ky
    x, y = x - np.clip(x, -kz * r, kz * r), y - r
    return _length(x, y) * np.sign(y)


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(_length(u + 0.1, v) - 0.95, -(_length(u - 0.45, v + 0.05) - 0.75))


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "star": _star,
    "diamond": _diamond,
    "hexagon": _hexagon,
    "crescent": _crescent,
}


# ----------------------------------------------------------------------------------------- params
def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from exc
    return lo, hi


@dataclass(frozen=True)
class WorldParams:
    """Everything that determines a world; same params -> same images, byte for byte."""

    seed: int = 0  # base random seed (>= 0); train and eval draw from independent streams of it
    concepts: tuple[str, ...] = DEFAULT_CONCEPTS  # 4..8 shape names from SHAPES (stand-ins for occupations)
    groups: tuple[str, ...] | None = None  # 2..4 names from COLORS or TEXTURES; None: red/blue or stripes/dots
    attribute_kind: str = "color"  # "color": solid palette fill; "texture": neutral-grey pattern fill
    bias_strength: float = 0.9  # P(group = concept % n_groups) in train, in [1/n_groups, 1]; 1/n_groups = no bias
    group_in_caption: float = 0.2  # P(a train caption also names the group), in [0, 1]
    eval_group_in_caption: float = 1.0  # P(an eval caption names the group); 1.0 = full descriptions
    image_size: int = 32  # image side in pixels, 16..256
    position_jitter: float = 0.12  # max centre offset as a fraction of the image side, in [0, 0.5]
    size_range: tuple[float, float] = (0.45, 0.8)  # shape diameter as a fraction of the side, 0.2 <= lo <= hi <= 1
    background_range: tuple[float, float] = (0.3, 0.6)  # background grey level range, 0 <= lo <= hi <= 1
    color_jitter: float = 0.05  # std of per-image, per-channel fill colour jitter, in [0, 0.5]
    noise_std: float = 0.03  # std of per-pixel Gaussian noise (in [0, 1] intensity units), in [0, 0.5]
    antialias: bool = True  # coverage anti-aliasing of shape edges; False gives hard 0/1 masks

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise DataError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.attribute_kind not in ATTRIBUTE_KINDS:
            raise DataError(f"unknown attribute_kind {self.attribute_kind!r}; allowed: {', '.join(ATTRIBUTE_KINDS)}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "concepts", _names("concepts", self.concepts, SHAPES, 4, 8))
        groups = DEFAULT_GROUPS[self.attribute_kind] if self.groups is None else self.groups
        palette = COLORS if self.attribute_kind == "color" else TEXTURES
        object.__setattr__(self, "groups", _names("groups", groups, palette, 2, 4))
        lowest = 1.0 / len(self.groups)
        _check_range("bias_strength", self.bias_strength, lowest, 1.0)
        _check_range("group_in_caption", self.group_in_caption, 0.0, 1.0)
        _check_range("eval_group_in_caption", self.eval_group_in_caption, 0.0, 1.0)
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 256:
            raise DataError(f"image_size must be an integer in [16, 256], got {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        _check_range("position_jitter", self.position_jitter, 0.0, 0.5)
        _check_range("color_jitter", self.color_jitter, 0.0, 0.5)
        _check_range("noise_std", self.noise_std, 0.0, 0.5)
        object.__setattr__(self, "size_range", _ordered_pair("size_range", self.size_range, 0.2, 1.0))
        object.__setattr__(self, "background_range", _ordered_pair("background_range", self.background_range, 0.0, 1.0))
        if not isinstance(self.antialias, bool):
            raise DataError(f"antialias must be true or false, got {self.antialias!r}")
        for f in ("bias_strength", "group_in_caption", "eval_group_in_caption", "position_jitter", "color_jitter",
                  "noise_std"):
            object.__setattr__(self, f, float(getattr(self, f)))

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def n_groups(self) -> int:
        return len(self.groups)  # type: ignore[arg-type]

    def assigned_group(self, concept: int) -> int:
        """The group a concept co-occurs with in the train split."""
        return concept % self.n_groups

    def group_word(self, group: int) -> str:
        """How captions name a group: the colour, or the texture's adjective."""
        name = self.groups[group]  # type: ignore[index]
        return name if self.attribute_kind == "color" else TEXTURES[name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorldParams:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"unknown world parameters {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def hash(self) -> str:
        """Stable sha256 hex digest of the parameters and the generator version."""
        record = {"generator_version": GENERATOR_VERSION, "params": self.to_dict()}
        payload = json.dumps(record, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _check_range(name: str, value: Any, lo: float, hi: float) -> None:
    numeric = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not numeric or not lo <= float(value) <= hi:
        raise DataError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")


def _ordered_pair(name: str, value: Any, lo: float, hi: float) -> tuple[float, float]:
    a, b = _pair(name, value)
    if not lo <= a <= b <= hi:
        raise DataError(f"{name} must satisfy {lo:g} <= low <= high <= {hi:g}, got ({a:g}, {b:g})")
    return a, b


def _names(name: str, values: Any, allowed: Mapping[str, Any], lo: int, hi: int) -> tuple[str, ...]:
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        raise DataError(f"{name} must be a list of names, got {values!r}")
    names = tuple(str(v) for v in values)
    if not lo <= len(names) <= hi:
        raise DataError(f"{name} needs {lo} to {hi} names, got {len(names)}")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise DataError(f"unknown {name} {', '.join(bad)}; allowed: {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise DataError(f"{name} repeats a name in {list(names)}; give each once")
    return names


def save_params(params: WorldParams, path: str | Path) -> Path:
    """Write the params as JSON (e.g. ``world_params.json`` beside a trained model)."""
    path = Path(path)
    record = {"generator_version": GENERATOR_VERSION, "params": params.to_dict(), "hash": params.hash()}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def split_dir(labels_path: str | Path, images_dir: str | Path) -> Path:
    """Where a written split keeps its ``world.json`` and ``captions.csv``: beside the labels CSV,
    or the images folder when the labels are a folder (UTKFace names)."""
    return Path(labels_path).parent if Path(labels_path).is_file() else Path(images_dir)


def load_params(path: str | Path) -> WorldParams:
    """Params from a ``world_params.json``, a split's ``world.json``, or a folder holding either."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / PARAMS_JSON, path / WORLD_JSON]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DataError(f"{str(path)!r} holds neither {PARAMS_JSON} nor {WORLD_JSON}; pass the world's JSON file")
        path = found[0]
    if not path.is_file():
        raise DataError(f"world parameters file {str(path)!r} does not exist; check the path")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise DataError(f"{str(path)!r} has no 'params' object; it is not a world parameters file")
    version = data.get("generator_version", GENERATOR_VERSION)
    if version != GENERATOR_VERSION:
        logger.warning("%s was written by world generator v%s; this is v%s, images may differ",
                       path, version, GENERATOR_VERSION)
    return WorldParams.from_dict(data["params"])


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


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def describe(params: WorldParams, concept: int, group: int | None = None) -> str:
    """Noun phrase with article: ``"a circle"``, ``"a red circle"``, ``"an orange star"``."""
    noun = params.concepts[concept]
    phrase = noun if group is None else f"{params.group_word(group)} {noun}"
    return f"{_article(phrase)} {phrase}"


def neutral_queries(params: WorldParams) -> list[str]:
    """One group-free query per concept, ``"a photo of a circle"``, in concept order."""
    return [QUERY_TEMPLATE.format(describe(params, c)) for c in range(params.n_concepts)]


def group_prompts(params: WorldParams) -> list[str]:
    """One concept-free prompt per group, ``"a photo of something red"``, for zero-shot group accuracy."""
    words = [params.group_word(g) for g in range(params.n_groups)]
    return [QUERY_TEMPLATE.format(f"something {w}") for w in words]


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


def _texture(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1.0 where the pattern is ink, 0.0 where paper; x, y integer pixel coords (+ phase)."""
    if name == "stripes":
        return ((y // 2) % 2 == 0).astype(np.float64)
    if name == "checks":
        return (((x // 2) + (y // 2)) % 2 == 0).astype(np.float64)
    if name == "dots":
        return (((x % 5) < 2) & ((y % 5) < 2)).astype(np.float64)
    if name == "grid":
        return ((x % 4 == 0) | (y % 4 == 0)).astype(np.float64)
    return np.zeros(np.broadcast_shapes(x.shape, y.shape))  # solid


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
            pattern = _texture(params.groups[g], ix[sel], iy[sel])  # (k_g, S, S)
            grey = ink[sel, None, None] * pattern + paper[sel, None, None] * (1 - pattern)
            fill[sel] = grey[..., None]
    image = background[:, None, None, None] * (1 - alpha[..., None]) + fill * alpha[..., None] + noise
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


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
    cells = params.n_concepts * params.n_groups
    if split == "eval" and n % cells:
        raise DataError(
            f"eval n={n} is not a multiple of concepts x groups = {cells}; use {max(cells, n // cells * cells)} "
            "so every pair appears equally often"
        )
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
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"output folder {str(out_dir)!r} is not empty; pick another or pass overwrite")


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
