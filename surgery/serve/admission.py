"""Admission: a request is let in only when the work it brings fits, measured before the work starts.

The batcher's queue counts rows, but rows are cheap once they exist; what costs memory and CPU
is making them: decoding images (memory grows with the pixels in the headers, not with the bytes
sent: a 60 KB PNG can hold 36 million pixels) and tokenizing texts (CPU grows with the bytes).
Each has a budget of work in flight over all requests. A request is measured first (image
headers, UTF-8 length of its texts), then:

* it could never fit (needs more than the whole budget): 413, split the request;
* it does not fit now: 503 with Retry-After, before any pixel is decoded or any text tokenized;
* otherwise its share is held until its work ends (on its thread: a request cut off by the
  shutdown deadline still holds its share while its decode finishes).

A request bringing more than ``heavy_above`` units (a 2000 x 2000 image, 64 KB of text) is heavy:
heavy requests together may hold at most ``HEAVY_SHARE`` of a budget, so a flood of them never
leaves ordinary requests without room (and the app runs them on one thread of their own).

The event loop is the only place shares are taken and given back, so no lock is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from surgery.serve.limits import RequestError

HEAVY_SHARE = 0.75  # of a budget, at most, held by heavy requests together
HEAVY_PIXELS = 4_000_000  # a request decoding more pixels than this is heavy (a 2000 x 2000 image)
HEAVY_TEXT_BYTES = 64 * 1024  # a request tokenizing more UTF-8 bytes than this is heavy


@dataclass
class Budget:
    """``capacity`` units of one kind of work in flight at once."""
    what: str  # what the units measure, for messages: "image pixels being decoded"
    capacity: int
    heavy_above: int  # a request bringing more than this is heavy
    retry_after_s: int = 1
    used: int = 0  # by every admitted request
    heavy_used: int = 0  # by the heavy ones

    def take(self, amount: int) -> "Share":
        """Hold ``amount`` units, or raise RequestError 413 (never fits) / 503 (not now). The share says
        whether the request is heavy."""
        heavy = amount > self.heavy_above
        limit = int(self.capacity * HEAVY_SHARE) if heavy else self.capacity
        if amount > limit:
            raise RequestError(413, f"this request brings {amount:,} {self.what}; the server takes at most "
                                    f"{limit:,} at once: split the request", "request_too_large")
        if self.used + amount > self.capacity or (heavy and self.heavy_used + amount > limit):
            raise RequestError(503, f"the server is at capacity ({self.used:,} of {self.capacity:,} {self.what} in "
                                    "flight); retry after a moment", "busy",
                               {"Retry-After": str(self.retry_after_s)})
        self.used += amount
        if heavy:
            self.heavy_used += amount
        return Share(self, amount, heavy)

    def refuse_heavy_now(self) -> None:
        """503 when no heavy request could be admitted now: called before reading a body that can only
        hold a heavy request (so a flood of them costs no reading or parsing while the heavy share is full)."""
        if self.heavy_used + self.heavy_above + 1 > int(self.capacity * HEAVY_SHARE):
            raise RequestError(503, f"the server is at capacity for large requests ({self.heavy_used:,} {self.what} "
                                    "in flight); retry after a moment", "busy", {"Retry-After": str(self.retry_after_s)})


class Share:
    """Units held from a :class:`Budget`; :meth:`release` gives them back (once)."""

    def __init__(self, budget: Budget, amount: int, heavy: bool):
        self.budget, self.amount, self.heavy = budget, amount, heavy

    def release(self) -> None:
        if self.amount:
            self.budget.used -= self.amount
            if self.heavy:
                self.budget.heavy_used -= self.amount
            self.amount = 0
