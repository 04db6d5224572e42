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

The event loop is the only place shares are taken and given back, so no lock is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from surgery.serve.limits import RequestError


@dataclass
class Budget:
    """``capacity`` units of one kind of work in flight at once."""
    what: str  # what the units measure, for messages: "image pixels being decoded"
    capacity: int
    retry_after_s: int = 1
    used: int = 0

    def take(self, amount: int) -> "Share":
        """Hold ``amount`` units, or raise RequestError 413 (never fits) / 503 (not now)."""
        if amount > self.capacity:
            raise RequestError(413, f"this request brings {amount:,} {self.what}; the server takes at most "
                                    f"{self.capacity:,} at once: split the request", "request_too_large")
        if self.used + amount > self.capacity:
            raise RequestError(503, f"the server is at capacity ({self.used:,} of {self.capacity:,} {self.what} in "
                                    "flight); retry after a moment", "busy",
                               {"Retry-After": str(self.retry_after_s)})
        self.used += amount
        return Share(self, amount)


class Share:
    """Units held from a :class:`Budget`; :meth:`release` gives them back (once)."""

    def __init__(self, budget: Budget, amount: int):
        self.budget, self.amount = budget, amount

    def release(self) -> None:
        if self.amount:
            self.budget.used -= self.amount
            self.amount = 0
