"""Layer 6 (beside debias): serving an exported pair over HTTP (dynamic batching, limits, metrics,
graceful shutdown) and writing a Triton Inference Server repository for fleets.
"""
from __future__ import annotations

from surgery.serve.app import create_app  # noqa: F401
from surgery.serve.batcher import Batcher, BatchOptions, QueueFull  # noqa: F401
from surgery.serve.limits import RequestError, ServeLimits  # noqa: F401
from surgery.serve.runtime import EncoderPair  # noqa: F401
from surgery.serve.server import ServeOptions, build_app, run_app, serve  # noqa: F401
from surgery.serve.triton_repo import write_triton_repository  # noqa: F401
