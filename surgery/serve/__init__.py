"""Layer 6 (beside debias): serving an exported pair over HTTP (dynamic batching, limits, metrics,
graceful shutdown) and writing a Triton Inference Server repository for fleets.

The HTTP server needs the ``serve`` extra (Starlette, uvicorn, prometheus-client): its names are
imported on first use, so ``import surgery.serve`` (and every other command) works without it.
"""
from __future__ import annotations

import importlib

from surgery.serve.batcher import Batcher, BatchOptions, QueueFull  # noqa: F401
from surgery.serve.limits import RequestError, ServeLimits  # noqa: F401
from surgery.serve.runtime import EncoderPair  # noqa: F401
from surgery.serve.triton_repo import write_triton_repository  # noqa: F401

_NEED_EXTRA = {"create_app": "surgery.serve.app", "ServeOptions": "surgery.serve.server",
               "build_app": "surgery.serve.server", "run_app": "surgery.serve.server", "serve": "surgery.serve.server"}


def __getattr__(name: str):
    if name in _NEED_EXTRA:
        return getattr(importlib.import_module(_NEED_EXTRA[name]), name)
    raise AttributeError(f"module 'surgery.serve' has no attribute {name!r}")
