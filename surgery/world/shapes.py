"""What the world draws: shapes as signed distance functions, group colours and textures.

Every shape takes normalised coordinates (the shape spans about [-1, 1]) and returns the signed
distance (negative inside); rendering anti-aliases by coverage ``clip(0.5 - distance_in_pixels, 0, 1)``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

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


def texture_pattern(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
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
