"""Run the app on uvicorn, with a graceful shutdown: on SIGTERM (or SIGINT) the server stops
accepting connections, refuses new requests on open ones (503), answers every request already in
flight, and returns normally (the CLI exits 0). A request still running ``graceful_timeout_s``
after the signal is answered 503 and its work abandoned on its daemon thread, so the process
exits promptly whatever a request costs. A second SIGINT forces the exit.

:func:`build_app` opens and warms up the pair before anything listens: a pair that cannot serve
(tampered metadata, a graph ONNX Runtime rejects, two files of different models) is one
SurgeryError line at start-up, never a server stuck "warming up".
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from surgery.errors import SurgeryError
from surgery.serve.app import create_app
from surgery.serve.batcher import BatchOptions
from surgery.serve.limits import ServeLimits
from surgery.serve.runtime import PROVIDERS, EncoderPair

log = logging.getLogger(__name__)
UVICORN_GRACE_S = 5.0  # uvicorn's shutdown limit is ours plus this


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
    graceful_timeout_s: float = 30.0  # after SIGTERM, requests still running after this are answered 503
    log_level: str = "info"  # uvicorn's access and server log

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise SurgeryError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if not 0 <= self.port <= 65535:
            raise SurgeryError(f"port {self.port} is outside 0-65535")
        if not self.graceful_timeout_s >= 0:
            raise SurgeryError(f"graceful timeout must be >= 0 seconds, got {self.graceful_timeout_s}")
        if self.limits.max_items > self.batch.max_queue:  # such a request could never be queued
            self.limits.max_items = self.batch.max_queue


def build_app(path: str, options: ServeOptions | None = None):
    """The Starlette app for ``path`` (OUT.onnx, or one tower file)."""
    opt = options or ServeOptions()
    threads = opt.threads
    if threads is None and opt.batch.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // opt.batch.workers)
    import torch

    torch.set_num_threads(opt.torch_threads)
    pair = EncoderPair(path, provider=opt.provider, threads=threads, spinning=opt.spinning)
    pair.warm_up()
    return create_app(pair, opt.batch, opt.limits, warmed=True)


def serve(path: str, options: ServeOptions | None = None) -> int:
    """Serve ``path`` until SIGTERM / SIGINT; returns after a graceful drain (see :func:`run_app`)."""
    opt = options or ServeOptions()
    return run_app(build_app(path, opt), opt)


def run_app(app, options: ServeOptions) -> int:
    """Run an app from :func:`build_app` on uvicorn until SIGTERM / SIGINT; returns after a graceful
    drain, with the number of calls abandoned at the deadline (still running on daemon threads: the
    caller should end the process without waiting for them)."""
    import uvicorn

    opt = options
    state = app.state.serve

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # uvicorn re-raises the signal after its drain: we exit 0
            if not self.should_exit:
                state.begin_shutdown(opt.graceful_timeout_s)
            if self.should_exit and sig == 2:  # a second SIGINT: stop waiting
                self.force_exit = True
            self.should_exit = True

    # uvicorn's own limit (it cancels what still runs) comes after ours (which answers those requests 503)
    config = uvicorn.Config(app, host=opt.host, port=opt.port, log_level=opt.log_level,
                            timeout_graceful_shutdown=opt.graceful_timeout_s + UVICORN_GRACE_S, lifespan="on")
    server = _Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind (it has logged why)
        server.started = False
    if not server.started:
        raise SurgeryError(f"the server did not start on {opt.host}:{opt.port} (see the log above); is the port "
                           "in use? choose another --port")
    return state.abandoned
