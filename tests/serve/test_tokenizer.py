"""The server's tokenizer (issue 24): token for token open_clip's, with bounded work and memory.

open_clip's BPE is quadratic in a word's length and caches every distinct word it sees, so long
texts made the server spend a minute of CPU per request and grow 5 MB per request for good."""
from __future__ import annotations

import random
import string

import numpy as np
import open_clip
import pytest

from surgery.errors import SurgeryError
from surgery.serve import tokenizer as serve_tokenizer
from surgery.serve.tokenizer import CACHE_ENTRIES, ServeTokenizer, check_tokenizer


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + "aaeeiioo     ,.!?'-" + "0123" + "éßüñ" + "日本語한국" + "\u0301"
    texts = ["a photo of a dog", "  spaces   everywhere ", "It's the DOG's &amp; cat's &lt;toy&gt;",
             "<|startoftext|> hi <|endoftext|>", "x", "🙂🙂 emoji 🙂", "tab\tand\nnewline", "ﬁne ligature"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(n)]
    texts += ["".join(rng.choice("ab") for _ in range(rng.randint(1, 200))) for _ in range(n // 4)]  # repeats
    texts += ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(200, 1500)))
              for _ in range(8)]  # one long word each: where open_clip's loop is quadratic
    return texts


@pytest.mark.parametrize("context", [16, 77])
def test_equal_to_open_clip_token_for_token(context):
    texts = _texts(context, 200)
    want = open_clip.tokenize(texts, context_length=context).numpy()
    np.testing.assert_array_equal(ServeTokenizer(context)(texts), want)


def test_the_cache_fills_is_cleared_at_its_limit_and_open_clips_own_cache_is_not_used():
    """Distinct short words, one per text (so every one is encoded and cached: a text of many words
    stops at the context), past the cache's limit twice: it reaches the limit, is cleared there and
    never holds more, and the tokens stay open_clip's."""
    tok = ServeTokenizer(77)
    shared = len(open_clip.tokenizer._tokenizer.cache)
    rng = random.Random(0)
    letters = string.ascii_lowercase
    words = list({"".join(rng.choice(letters) for _ in range(9)) for _ in range(2 * CACHE_ENTRIES + 500)})
    assert len(words) > 2 * CACHE_ENTRIES  # distinct (26^9 choices: a repeat is rare)
    sizes = []
    for start in range(0, len(words), 1000):
        tok(words[start:start + 1000])
        sizes.append(tok.cache_size)
        assert tok.cache_size <= CACHE_ENTRIES, f"the cache holds {tok.cache_size} words, over {CACHE_ENTRIES}"
    assert max(sizes) == CACHE_ENTRIES  # it filled (every word up to the limit was cached) ...
    assert any(b < a for a, b in zip(sizes, sizes[1:]))  # ... and was cleared there, not frozen
    assert len(open_clip.tokenizer._tokenizer.cache) == shared
    sample = words[-300:] + words[:300]  # cached and evicted words give the same tokens
    np.testing.assert_array_equal(tok(sample), open_clip.tokenize(sample).numpy())


def test_only_the_words_that_fit_the_context_are_encoded(monkeypatch):
    calls = []
    real = serve_tokenizer.bpe
    monkeypatch.setattr(serve_tokenizer, "bpe", lambda word, ranks: calls.append(word) or real(word, ranks))
    text = " ".join(f"w{i}x" for i in range(5000))  # 10,000 words (letters and digits split)
    ServeTokenizer(16)([text])
    assert len(calls) <= 14  # at most ctx - 2 words (each is at least one token)


def test_only_the_builtin_tokenizer_is_accepted_from_metadata():
    assert check_tokenizer({"name": "openai-clip-bpe", "context_length": 77}, "f.onnx") == ("openai-clip-bpe", 77)
    for bad, needle in [({"name": "hf-hub:x/y", "context_length": 77}, "never downloads"),
                        ({"name": "openai-clip-bpe", "context_length": "77"}, "context length"),
                        ({"name": "openai-clip-bpe", "context_length": 10**9}, "context length"),
                        (["openai-clip-bpe"], "not a JSON object")]:
        with pytest.raises(SurgeryError, match=needle):
            check_tokenizer(bad, "f.onnx")
