"""Where a stage runs: the device, the attention backend and the autocast dtype, resolved once.

``resolve_placement("auto")`` is CUDA when a device is visible, else the CPU. The attention
backend follows the device: ``triton`` on CUDA when the Triton kernels are importable, else
``sdpa`` (the CPU keeps ``sdpa``, as before; ``math`` stays the reference a caller asks for by
name). bf16 autocast is offered on CUDA only, and each stage decides where it applies it (only where
exactness allows: see :class:`Placement`). The CLI prints :meth:`Placement.describe`, one line
saying what ran.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from surgery.errors import SurgeryError
from surgery.model.attention import triton_importable, validate_backend

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    """A resolved (device, attention backend, autocast dtype).

    ``autocast`` is the dtype of ``torch.autocast`` where the stage allows it (bf16 on CUDA), or None
    (everything fp32). Callers that must stay exact (decompositions, parity checks, the measured
    head sets, activation caches) ignore it.
    """

    device: str  # "cpu" | "cuda" (or "cuda:N")
    backend: str  # attention backend: "triton" | "sdpa" | "math"
    autocast: torch.dtype | None = None  # None: fp32 everywhere

    def describe(self, stage: str) -> str:
        """One line: ``audit: device cuda, attention backend triton, bf16 autocast``."""
        precision = f"{_dtype_name(self.autocast)} autocast" if self.autocast is not None else "fp32"
        return f"{stage}: device {self.device}, attention backend {self.backend}, {precision}"

    def autocast_context(self):
        """``torch.autocast`` with this placement's dtype, or a no-op context when it has none."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.autocast)


def resolve_placement(device: str = "auto", *, backend: str = "auto", autocast: bool = True) -> Placement:
    """Resolve ``device`` (auto | cpu | cuda | cuda:N) and ``backend`` (auto | math | sdpa | triton).

    ``autocast``: allow bf16 autocast (CUDA only). Raises SurgeryError (one line) for an unknown
    device, ``cuda`` without a visible CUDA device, or ``triton`` on the CPU without the interpreter.
    """
    validate_backend(backend)
    name = _resolve_device(device)
    on_cuda = name.startswith("cuda")
    if backend == "auto":
        backend = "triton" if on_cuda and triton_importable() else "sdpa"
    elif backend == "triton" and not triton_importable():
        raise SurgeryError("attention backend triton: the Triton kernels are not importable here "
                           "(pip install triton); use --backend sdpa")
    dtype = torch.bfloat16 if (autocast and on_cuda) else None
    return Placement(device=name, backend=backend, autocast=dtype)


def _resolve_device(device: str) -> str:
    if not isinstance(device, str) or not (device in DEVICE_CHOICES or device.startswith("cuda:")):
        raise SurgeryError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if device == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise SurgeryError(f"--device {device}: no CUDA device is visible to PyTorch (torch.cuda.is_available() "
                           "is False); use --device cpu or auto")
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise SurgeryError(f"--device {device}: {torch.cuda.device_count()} CUDA device(s) visible; "
                               f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
