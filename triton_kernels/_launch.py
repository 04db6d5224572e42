"""Launch helper: the autotuner's choice is cached per key, later calls launch the JIT kernel directly.

``@triton.autotune`` wraps every call in Python (argument binding, key building, config lookup,
``all_kwargs`` merging) before the JIT launcher runs. At ViT-B/16 sizes that host time rivals the
GPU work (benchmarks/RESULTS.md), so after the first call for a key the chosen ``triton.Config`` is
stored here and later calls go straight to ``kernel.fn.run`` with that config's meta-parameters
(BLOCK sizes, num_warps, num_stages, ...) and a precomputed grid tuple: the same compiled kernel the
autotuner would launch, without the wrapper.

The key holds everything the autotuner keys on: the kernel, ``AUTOTUNE_KEY`` (N, HEAD_DIM, CAUSAL)
and the dtype of every tensor argument (q/k/v dtype and the head mask's dtype; placeholders are
fixed), plus the device, so two GPUs never share an entry.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

_LOCK = threading.Lock()
_CONFIGS: dict[tuple, object] = {}  # key -> triton.Config chosen by the autotuner
_DIRECT = {"enabled": True}


@dataclass
class LaunchStats:
    autotuned: int = 0  # launches that went through the autotuner (and filled the cache)
    direct: int = 0  # launches that used a cached config without the autotuner


_STATS = LaunchStats()


def launch_key(kernel, n: int, head_dim: int, causal: bool, tensors: tuple[torch.Tensor, ...]) -> tuple:
    """(kernel name, N, d, causal, dtypes of the tensor arguments, device): one autotune decision."""
    first = tensors[0]
    return (kernel.base_fn.__name__, int(n), int(head_dim), bool(causal),
            tuple(str(t.dtype) for t in tensors), str(first.device))


def launch(kernel, key: tuple, grid: Callable[[dict], tuple[int, ...]], args: tuple, kwargs: dict) -> None:
    """Run ``kernel`` (an ``@triton.autotune`` wrapper) on ``args``/``kwargs``.

    ``grid(meta)`` maps a config's meta-parameters to the launch grid. First call for ``key``: through
    the autotuner, whose choice (``best_config``) is stored. Later calls (unless direct launch is off):
    ``kernel.fn.run`` with the stored config, no autotuner.
    """
    config = _CONFIGS.get(key) if _DIRECT["enabled"] else None
    if config is None:
        kernel[grid](*args, **kwargs)
        with _LOCK:
            _CONFIGS.setdefault(key, kernel.best_config)
            _STATS.autotuned += 1
        return
    meta = config.all_kwargs()
    kernel.fn.run(*args, grid=grid(meta), warmup=False, **kwargs, **meta)
    _STATS.direct += 1


def clear_launch_cache() -> None:
    """Forget every cached config (and the counters); the next call per key goes through the autotuner."""
    with _LOCK:
        _CONFIGS.clear()
        _STATS.autotuned = _STATS.direct = 0


def launch_cache() -> dict[tuple, dict]:
    """A copy of the cache: key -> the chosen config's meta-parameters (BLOCK sizes, num_warps, ...)."""
    with _LOCK:
        return {key: dict(config.all_kwargs()) for key, config in _CONFIGS.items()}


def launch_stats() -> LaunchStats:
    """Counters since the last clear: launches through the autotuner vs direct launches."""
    return LaunchStats(_STATS.autotuned, _STATS.direct)


@contextlib.contextmanager
def direct_launch(enabled: bool) -> Iterator[None]:
    """Turn the cached direct launch on or off for a ``with`` block (off: every call autotuned path)."""
    before = _DIRECT["enabled"]
    _DIRECT["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _DIRECT["enabled"] = before
