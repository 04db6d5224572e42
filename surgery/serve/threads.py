"""Blocking work (image decoding, tokenizing, ONNX Runtime calls) on threads that never hold the
process: a call still running when the server shuts down is abandoned, not waited for.

``concurrent.futures`` and anyio join their worker threads at exit (and anyio's ``run_sync``
cannot be cancelled while its thread runs), so one call stuck past the shutdown deadline would
keep the process up for as long as it runs. Here the threads are daemons, and a caller that
stops waiting (its task cancelled) gets control back at once; the thread finishes on its own
and its result is dropped.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from typing import Any, Callable


class DaemonPool:
    """``await pool.run(fn, *args)``: ``fn(*args)`` on one of ``workers`` daemon threads."""

    def __init__(self, workers: int, name: str, nice: int = 0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.name, self.nice = workers, name, nice
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.busy = 0  # calls running now (read by the shutdown: were any abandoned?)

    async def run(self, fn: Callable[..., Any], *args: Any, on_done: Callable[[], None] | None = None) -> Any:
        """The result of ``fn(*args)``; ``on_done`` runs on the event loop when the call ends (also when
        the caller stopped waiting: release what the call held then, not before)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._start()
        self._jobs.put((fn, args, loop, future, on_done))
        return await future

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        if self.nice:  # Linux: a thread's own scheduling priority (other systems: the call fails, nothing changes)
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, loop, future, on_done = job
            with self._lock:
                self.busy += 1
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                result, error = None, exc
            finally:
                with self._lock:
                    self.busy -= 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, result, error, on_done)

    def shutdown(self) -> None:
        """Let idle threads end; running calls are not waited for (their threads are daemons)."""
        for _ in self._threads:
            self._jobs.put(None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None, on_done) -> None:
    if on_done is not None:
        on_done()
    if future.done():  # the caller was cancelled (a shutdown cut it off): drop the result
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
