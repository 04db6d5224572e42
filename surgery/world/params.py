"""WorldParams: everything that determines a planted-bias world (same params -> same images, byte for byte).

In the TRAIN split each concept ``c`` co-occurs with its assigned group ``c % n_groups`` with
probability ``bias_strength`` (the rest uniform over the other groups); the EVAL split is balanced.
``GENERATOR_VERSION`` is bumped whenever drawing changes, and is part of :meth:`WorldParams.hash`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from surgery.errors import DataError
from surgery.world.shapes import COLORS, SHAPES, TEXTURES

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
ATTRIBUTE_KINDS = ("color", "texture")
WORLD_JSON = "world.json"  # a generated split's parameters (written beside its images)
PARAMS_JSON = "world_params.json"  # the world's parameters stored beside a trained model
DEFAULT_CONCEPTS = ("circle", "square", "triangle", "cross", "ring", "star")
DEFAULT_GROUPS = {"color": ("red", "blue"), "texture": ("stripes", "dots")}


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
