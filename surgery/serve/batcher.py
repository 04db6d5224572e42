"""Dynamic batching: rows from concurrent requests share one ONNX Runtime call.

A request submits its rows (``(n, ...)``: n images or n token rows) and awaits its embeddings
``(n, D)``. When a worker is free, the batcher takes the oldest rows as soon as ``max_batch`` are
waiting or ``max_wait_s`` has passed since the batch could start (the oldest row's arrival, or the
moment the worker freed up if rows were already waiting), and runs them on a thread (``workers``
calls at once); a request's rows
may span batches and every caller gets exactly its own rows back, in order. At most ``max_queue``
rows wait: a request that does not fit is refused at once (:class:`QueueFull`) instead of
growing the queue without bound.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from surgery.errors import SurgeryError
from surgery.serve.threads import DaemonPool

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More rows would wait than the queue holds; the caller should answer 503 and retry later."""


class ShutDown(Exception):
    """The batcher stopped (the shutdown deadline passed) before these rows ran."""


@dataclass
class BatchOptions:
    max_batch: int = 32  # rows per ONNX Runtime call, at most
    max_wait_s: float = 0.005  # how long the oldest row waits for others before its batch runs
    max_queue: int = 1024  # rows waiting (not yet in a running batch), at most; a request that does not fit: 503
    workers: int = 1  # batches run at once (threads sharing one session)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise SurgeryError(f"max batch must be >= 1, got {self.max_batch}")
        if self.max_wait_s < 0:
            raise SurgeryError(f"max wait must be >= 0, got {self.max_wait_s}")
        if self.max_queue < 1:
            raise SurgeryError(f"max queue must be >= 1, got {self.max_queue}")
        if self.workers < 1:
            raise SurgeryError(f"workers must be >= 1, got {self.workers}")


class _Request:
    """One caller's rows: where its embeddings go and how many are still missing."""

    def __init__(self, n: int, future: asyncio.Future):
        self.n = n
        self.out: np.ndarray | None = None  # (n, D) once the first batch returns
        self.missing = n
        self.future = future


class Batcher:
    """One tower's batcher. ``run``: rows ``(B, ...)`` -> embeddings ``(B, D)`` (blocking; runs on a thread).
    ``on_batch(rows, seconds)`` and ``on_queue(depth)`` report to metrics."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], options: BatchOptions,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None):
        self.run, self.options = run, options
        self.on_batch = on_batch or (lambda n, s: None)
        self.on_queue = on_queue or (lambda n: None)
        self._pending: collections.deque = collections.deque()  # (row, request, index, arrival time)
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._pool = DaemonPool(options.workers, "clipsurgery-batch")
        self._flushing = False  # draining: run waiting rows at once

    @property
    def depth(self) -> int:
        """Rows waiting for a batch."""
        return len(self._pending)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.options.workers)
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings ``(n, D)`` of ``rows`` ``(n, ...)``; raises :class:`QueueFull` when they do not fit."""
        n = len(rows)
        if n == 0:
            raise ValueError("no rows")
        if self.depth + n > self.options.max_queue:
            raise QueueFull(f"{self.depth} rows are waiting (queue holds {self.options.max_queue})")
        loop = asyncio.get_running_loop()
        request = _Request(n, loop.create_future())
        now = loop.time()
        for i in range(n):
            self._pending.append((rows[i], request, i, now))
        self.on_queue(self.depth)
        self._arrived.set()
        return await request.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        opt = self.options
        while True:
            await self._slots.acquire()  # a free worker first: while all are busy, rows keep queueing
            free_since = loop.time()
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            # Hold the batch open for max_wait from when it could start: from the oldest row's arrival, or
            # from when a worker freed up if the rows were already waiting (under load, the callers just
            # answered send their next rows within moments; without this they would form the next batch
            # instead of this one, and batches would stay a fraction of the callers).
            deadline = max(self._pending[0][3], free_since) + opt.max_wait_s
            while len(self._pending) < opt.max_batch and loop.time() < deadline and not self._flushing:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            take = [self._pending.popleft() for _ in range(min(opt.max_batch, len(self._pending)))]
            self.on_queue(self.depth)
            task = loop.create_task(self._run_batch(take))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, take: list) -> None:
        loop = asyncio.get_running_loop()
        try:
            rows = np.stack([row for row, *_ in take])  # (B, ...)
            start = loop.time()
            try:
                out = await self._pool.run(self.run, rows)  # (B, D)
            except asyncio.CancelledError:  # the drain's deadline passed: the call is abandoned on its thread
                for _, request, _, _ in take:
                    if not request.future.done():
                        request.future.set_exception(ShutDown("the server shut down while these rows ran"))
                raise
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets the error, the loop goes on
                log.exception("batch of %d rows failed", len(take))
                for _, request, _, _ in take:
                    if not request.future.done():
                        request.future.set_exception(exc)
                return
            self.on_batch(len(take), loop.time() - start)
            for j, (_, request, i, _) in enumerate(take):
                if request.future.done():  # the caller went away, or an earlier batch failed
                    continue
                if request.out is None:
                    request.out = np.empty((request.n, out.shape[1]), dtype=out.dtype)
                request.out[i] = out[j]
                request.missing -= 1
                if request.missing == 0:
                    request.future.set_result(request.out)
        finally:
            self._slots.release()

    @property
    def abandoned(self) -> int:
        """Calls still running on their threads (after a drain cut short by its deadline)."""
        return self._pool.busy

    async def drain(self, stop: asyncio.Event | None = None) -> None:
        """Run every queued row at once and wait for the answers, or until ``stop`` is set (the
        shutdown deadline): rows still waiting then fail with :class:`ShutDown` and running calls are
        abandoned on their daemon threads. Then stop the loop."""
        self._flushing = True
        if self._arrived is not None:
            self._arrived.set()
        while (self._pending or self._running) and not (stop is not None and stop.is_set()):
            await asyncio.sleep(0.01)
        while self._pending:
            _, request, _, _ = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(ShutDown("the server shut down before these rows ran"))
        for task in list(self._running):
            task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown()
