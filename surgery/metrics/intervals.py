"""Uncertainty of before/after figures: paired bootstrap intervals over the items they average.

A budget such as "text->image Recall@5 may drop by at most 2 points" is a claim about a figure
measured on a sample (a world's ~60 distinct captions move t2i@5 in steps of 1.7 points). The
intervals here resample the items (captions, images, queries) with replacement, the same items
before and after (paired), and report the percentile interval of the change.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from surgery.errors import DataError

#: Resamples per interval, and the seed (the same report gives the same interval).
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    value: float  # the figure on the items as measured
    low: float  # the lower end of the central ``level`` interval
    high: float
    level: float = 0.95
    n: int = 0  # items resampled

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)

    def to_dict(self) -> dict:
        return asdict(self)


def _pairs(before: Sequence[float], after: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = torch.as_tensor(before, dtype=torch.float64), torch.as_tensor(after, dtype=torch.float64)
    if b.ndim != 1 or b.shape != a.shape or b.numel() == 0:
        raise DataError(f"paired figures need two equal, non-empty lists of items, got {tuple(b.shape)} and "
                        f"{tuple(a.shape)}")
    return b, a


def _draws(n: int, resamples: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=gen)  # (R, n) item indices


def _interval(value: float, samples: torch.Tensor, level: float, n: int) -> Interval:
    tail = (1.0 - level) / 2
    low, high = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(value, low, high, level, n)


def drop_interval(before: Sequence[float], after: Sequence[float], level: float = 0.95,
                  resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """mean(before) - mean(after) over paired items (e.g. per-caption hits, per-image correctness)."""
    b, a = _pairs(before, after)
    idx = _draws(b.numel(), resamples, seed)
    samples = b[idx].mean(1) - a[idx].mean(1)  # (R,)
    return _interval(float(b.mean() - a.mean()), samples, level, b.numel())


def ratio_interval(before: Sequence[float], after: Sequence[float], level: float = 0.95,
                   resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """mean(after) / mean(before) over paired items (e.g. per-query MaxSkew); 1 where before is 0."""
    b, a = _pairs(before, after)
    idx = _draws(b.numel(), resamples, seed)
    num, den = a[idx].mean(1), b[idx].mean(1)
    samples = torch.where(den > 0, num / den.clamp_min(1e-12), torch.ones_like(num))
    value = float(a.mean() / b.mean()) if float(b.mean()) > 0 else 1.0
    return _interval(value, samples, level, b.numel())
