"""Run the app on uvicorn, with a graceful shutdown: on SIGTERM (or SIGINT) the server stops
accepting connections, refuses new requests on open ones (503), answers every request already in
flight, and returns normally (the CLI exits 0). A second SIGINT forces the exit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from surgery.errors import SurgeryError
from surgery.serve.app import create_app
from surgery.serve.batcher import BatchOptions
from surgery.serve.limits import ServeLimits
from surgery.serve.runtime import PROVIDERS, EncoderPair

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"  # loopback by default: put a proxy (or --host 0.0.0.0) in front deliberately
    port: int = 8000
    provider: str = "cpu"  # "cpu" | "cuda"
    threads: int | None = None  # ONNX Runtime intra-op threads per call (default: one per core / workers)
    # torch threads of this process: torch only runs the image transform's tiny tensor ops here, where a
    # thread pool costs more than it gives and contends with ONNX Runtime (31 ms vs 0.7 ms per 224 px image
    # with 2 threads vs 1 on a loaded 2-core machine)
    torch_threads: int = 1
    # ONNX Runtime's worker threads spin while idle between calls; that steals the cores the event loop
    # and image decoding need between batches (see benchmarks/bench_serve.py)
    spinning: bool = False
    batch: BatchOptions = field(default_factory=BatchOptions)
    limits: ServeLimits = field(default_factory=ServeLimits)
    graceful_timeout_s: float = 30.0  # in-flight requests still running after this are cancelled
    log_level: str = "info"  # uvicorn's access and server log

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise SurgeryError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if not 0 <= self.port <= 65535:
            raise SurgeryError(f"port {self.port} is outside 0-65535")
        if self.limits.max_items > self.batch.max_queue:  # such a request could never be queued
            self.limits.max_items = self.batch.max_queue


def build_app(path: str, options: ServeOptions | None = None):
    """The Starlette app for ``path`` (OUT.onnx, or one tower file)."""
    opt = options or ServeOptions()
    threads = opt.threads
    if threads is None and opt.batch.workers > 1:
        import os

        threads = max(1, (os.cpu_count() or 1) // opt.batch.workers)
    import torch

    torch.set_num_threads(opt.torch_threads)
    pair = EncoderPair(path, provider=opt.provider, threads=threads, spinning=opt.spinning)
    return create_app(pair, opt.batch, opt.limits)


def serve(path: str, options: ServeOptions | None = None) -> None:
    """Serve ``path`` until SIGTERM / SIGINT; returns after a graceful drain."""
    opt = options or ServeOptions()
    run_app(build_app(path, opt), opt)


def run_app(app, options: ServeOptions) -> None:
    """Run an app from :func:`build_app` on uvicorn until SIGTERM / SIGINT; returns after a graceful drain."""
    import uvicorn

    opt = options

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # uvicorn re-raises the signal after its drain: we exit 0
            app.state.serve.draining = True
            if self.should_exit and sig == 2:  # a second SIGINT: stop waiting
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, host=opt.host, port=opt.port, log_level=opt.log_level,
                            timeout_graceful_shutdown=opt.graceful_timeout_s, lifespan="on")
    server = _Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind (it has logged why)
        server.started = False
    if not server.started:
        raise SurgeryError(f"the server did not start on {opt.host}:{opt.port} (see the log above); is the port "
                           "in use? choose another --port")
