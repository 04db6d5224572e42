"""A stand-in for :class:`surgery.serve.runtime.EncoderPair` whose work can be held on a gate: the
admission and shutdown tests need a request that is provably still decoding, tokenizing or inside
ONNX Runtime when the next thing happens, without timing anything.

Run as a script it serves the stub on a port with a graceful timeout (the shutdown test):

    python serve_stub.py PORT GRACEFUL_TIMEOUT_S MARKER_FILE
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

HOLD_LIMIT_S = 60.0  # a held call gives up after this (so a test run against code without the fix ends)


class StubPair:
    """Towers ``vision`` and ``text`` of 4-d embeddings. ``hold_pixels`` / ``hold_tokens`` /
    ``hold_embed``: the next call of that kind waits until :meth:`release` (or ``HOLD_LIMIT_S``);
    ``entered`` is set when a call starts waiting; ``marker``: a file written at that moment."""

    name = "stub"
    towers = ("vision", "text")

    def __init__(self, marker: str | None = None, hold_embed_forever: bool = False):
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.holding: dict[str, int] = {}  # kind -> hold calls with at least this many items
        self.marker, self.hold_embed_forever = marker, hold_embed_forever

    def hold(self, kind: str, min_items: int = 0) -> None:
        self.holding[kind] = min_items

    def release(self) -> None:
        self.holding.clear()
        self.gate.set()

    def _wait(self, kind: str, items: int = 1) -> None:
        if kind not in self.holding or items < self.holding[kind]:
            return
        self.entered.set()
        if self.marker:
            with open(self.marker, "w") as fh:
                fh.write(kind)
        self.gate.wait(HOLD_LIMIT_S)

    def pixels(self, image) -> np.ndarray:
        self._wait("pixels")
        return np.zeros((3, 8, 8), dtype=np.float32)

    def tokens(self, texts) -> np.ndarray:
        self._wait("tokens", len(texts))
        return np.ones((len(texts), 4), dtype=np.int64)

    def embed(self, tower: str, rows: np.ndarray) -> np.ndarray:
        if self.hold_embed_forever:
            self._wait("embed")
            threading.Event().wait()  # an ONNX Runtime call that never returns
        return np.ones((len(rows), 4), dtype=np.float32)

    def warm_up(self) -> None:
        pass

    def describe(self) -> dict:
        return {"id": self.name, "object": "model"}


def main() -> None:
    from surgery.serve.app import create_app
    from surgery.serve.server import ServeOptions, run_app

    port, timeout, marker = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    pair = StubPair(marker=marker, hold_embed_forever=True)
    pair.hold("embed")
    options = ServeOptions(port=port, graceful_timeout_s=timeout, log_level="warning")
    abandoned = run_app(create_app(pair, options.batch, options.limits), options)
    print(f"run_app returned; abandoned {abandoned}", flush=True)
    if abandoned:  # what the CLI does: calls cut off still run on daemon threads
        os._exit(0)


if __name__ == "__main__":
    main()
