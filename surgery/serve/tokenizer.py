"""The server's tokenizer: CLIP's byte-level BPE (open_clip's ``SimpleTokenizer``), token for token,
with its work and memory bounded whatever a client sends.

open_clip's tokenizer has two costs a hostile client can drive: its BPE loop is quadratic in a
word's length (one 4,096-letter word: 1.6 s of CPU), and its cache keeps every distinct word it
ever saw (about 5 MB more per 261 KB request of new words, never freed). Here:

* BPE merges the lowest-ranked pair first with a heap over a linked list of symbols: O(n log n)
  per word. CLIP's merge table creates every symbol at a lower rank than any merge that uses it,
  so merging pairs one at a time in (rank, position) order gives exactly open_clip's result
  (which merges every occurrence of the lowest-ranked pair per pass); tests/serve/test_tokenizer.py
  checks it against open_clip on random and adversarial words.
* Only short words (the common ones) are cached, in a dict of bounded size (cleared when full).
* Words are encoded only until the context is full: open_clip keeps ``[sot] + tokens[:ctx-2] +
  [eot]``, so the rest of a long text never needs its BPE. The text is still cleaned whole (ftfy
  may change any part of it), which is linear.

Only tokenizers the tool ships are accepted from a file's metadata: a name read from a file is
never downloaded (a tampered file must not make the server fetch code or data from a hub).
"""
from __future__ import annotations

import heapq

import numpy as np
import open_clip.tokenizer as oc_tokenizer

from surgery.errors import SurgeryError

BUILTIN = "openai-clip-bpe"  # the only tokenizer the server runs: CLIP's BPE, shipped inside open_clip
CACHE_WORD_CHARS = 32  # words up to this long are cached (longer ones are rare and cost O(n log n) anyway)
CACHE_ENTRIES = 20_000  # cached words, at most (a few MB); the cache is cleared when full
MAX_CONTEXT = 4096  # a context length above this in a file's metadata is refused (CLIP uses 77)

_BASE: oc_tokenizer.SimpleTokenizer | None = None


def _base() -> oc_tokenizer.SimpleTokenizer:
    global _BASE
    if _BASE is None:  # loading the merge table costs ~0.3 s: once per process
        _BASE = oc_tokenizer.SimpleTokenizer()
    return _BASE


def check_tokenizer(info: object, where: str) -> tuple[str, int]:
    """``(name, context_length)`` of a file's tokenizer record, or one SurgeryError line."""
    if not isinstance(info, dict):
        raise SurgeryError(f"{where}: the tokenizer metadata is not a JSON object; export the pair again")
    name, ctx = info.get("name", BUILTIN), info.get("context_length")
    if name != BUILTIN:
        raise SurgeryError(f"{where}: tokenizer {name!r} is not one the server ships (it serves {BUILTIN!r} only and "
                           "never downloads a tokenizer named in a file); export the pair again")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 2 <= ctx <= MAX_CONTEXT:
        raise SurgeryError(f"{where}: tokenizer context length {ctx!r} is not a whole number in 2-{MAX_CONTEXT}; "
                           "export the pair again")
    return name, ctx


class ServeTokenizer:
    """``tokenizer(texts) -> (n, ctx) int64``, equal to ``open_clip.tokenize(texts, context_length=ctx)``."""

    def __init__(self, context_length: int):
        base = _base()
        self.context_length = int(context_length)
        self._clean, self._pattern = base.clean_fn, base.pat
        self._byte_encoder, self._encoder, self._ranks = base.byte_encoder, base.encoder, base.bpe_ranks
        self._sot, self._eot = base.sot_token_id, base.eot_token_id
        self._cache: dict[str, list[int]] = {}

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def __call__(self, texts: list[str]) -> np.ndarray:
        ctx = self.context_length
        out = np.zeros((len(texts), ctx), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self._sot, *self.encode(text, ctx - 2), self._eot]  # open_clip's truncation, built directly
            out[i, :len(ids)] = ids
        return out

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """The BPE ids of ``text`` (open_clip's ``encode``), stopping once ``limit`` ids are found."""
        ids: list[int] = []
        for match in self._pattern.finditer(self._clean(text)):
            if limit is not None and len(ids) >= limit:
                break
            word = "".join(self._byte_encoder[b] for b in match.group().encode("utf-8"))
            ids.extend(self._word_ids(word))
        return ids if limit is None else ids[:limit]

    def _word_ids(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = [self._encoder[symbol] for symbol in bpe(word, self._ranks)]
        if len(word) <= CACHE_WORD_CHARS:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[word] = ids
        return ids


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """open_clip's ``SimpleTokenizer.bpe(word).split(' ')`` in O(n log n): the word's symbols (its
    last one marked ``</w>``) merged lowest-ranked pair first, leftmost first among equal ranks."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    n = len(symbols)
    nxt = list(range(1, n)) + [-1]
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        rank = ranks.get((symbols[i], symbols[i + 1]))
        if rank is not None:
            heap.append((rank, i, symbols[i], symbols[i + 1]))
    heapq.heapify(heap)
    alive = [True] * n
    while heap:
        rank, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if not alive[i] or j < 0 or symbols[i] != left or symbols[j] != right:
            continue  # stale: one side was merged since (a symbol only grows, so it never matches again)
        symbols[i] = left + right
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        for a, b in ((prv[i], i), (i, nxt[i])):
            if a >= 0 and b >= 0:
                rank = ranks.get((symbols[a], symbols[b]))
                if rank is not None:
                    heapq.heappush(heap, (rank, a, symbols[a], symbols[b]))
    return [symbols[i] for i in range(n) if alive[i]]
