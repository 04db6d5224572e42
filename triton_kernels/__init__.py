"""Triton kernels for clipsurgery: fused attention with a per-head mask (forward and backward).

Importing this package never queries a device. Set ``TRITON_INTERPRET=1`` *before* importing it
to run the kernels on CPU tensors (Triton reads it when the kernels are decorated). Without Triton
installed, ``triton_available()`` is False and ``masked_attention`` raises TritonAttentionUnsupported.

Launch cost: the first call per (kernel, N, d, causal, dtypes, device) goes through the autotuner;
its choice is cached and later calls launch the JIT kernel directly (``launch_cache``,
``clear_launch_cache``, ``launch_stats``, ``direct_launch(False)`` to compare with the autotuned path).
"""

from triton_kernels._launch import LaunchStats, clear_launch_cache, direct_launch, launch_cache, launch_stats
from triton_kernels._support import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    TritonAttentionUnsupported,
    check_supported,
    triton_available,
)

try:
    from triton_kernels.masked_attention import MaskedAttentionFunction, masked_attention
except ImportError as _err:  # triton not installed
    _IMPORT_ERROR = _err
    MaskedAttentionFunction = None

    def masked_attention(*args, **kwargs):
        raise TritonAttentionUnsupported(f"triton masked attention: triton is not importable ({_IMPORT_ERROR})")


__all__ = [
    "LaunchStats",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "MaskedAttentionFunction",
    "TritonAttentionUnsupported",
    "check_supported",
    "clear_launch_cache",
    "direct_launch",
    "launch_cache",
    "launch_stats",
    "masked_attention",
    "triton_available",
]
