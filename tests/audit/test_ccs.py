"""Concept Consistency Score: embedding judge with a fake embedder, HTTP judge against a local server."""
from __future__ import annotations

import json
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from surgery.audit.ccs import (
    DEFAULT_LABELS,
    CCSBins,
    CCSVerdict,
    EmbeddingJudge,
    HttpJudge,
    Judge,
    JudgeError,
    ccs_level,
    concept_consistency,
    judge_heads,
    parse_judge_reply,
)
from surgery.errors import SurgeryError

# ------------------------------------------------------------------------------------- fake embedder
AXES = {"colors": 0, "animals": 1, "shapes": 2}
WORDS = {"red": 0, "blue": 0, "green": 0, "colors": 0, "dog": 1, "cat": 1, "animals": 1, "circle": 2, "shapes": 2}


class KeywordEmbed:
    """Each text -> sum of one-hot axes of its known words (3-D); counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                if w in WORDS:
                    out[i, WORDS[w]] += 1.0
        return out


VOCAB = {"colors": ("colors",), "animals": ("animals",), "shapes": ("shapes",)}


def test_embedding_judge_label_and_top1_matches():
    judge = EmbeddingJudge(embed_texts=KeywordEmbed(), label_vocabulary=VOCAB)
    v = judge.judge(["a red car", "a blue sky", "green grass", "a dog", "a circle"])
    # mean cosines: colors 3/5, animals 1/5, shapes 1/5
    assert v.label == "colors"
    assert v.matches == [True, True, True, False, False]
    assert v.score == 3 and v.level == "moderate"
    assert v.similarities == pytest.approx([1, 1, 1, 0, 0])


def test_label_is_highest_mean_cosine_not_majority():
    # 3 texts (2, 1, 0)/sqrt5 lean to colors (top-1 colors: cos .894 vs animals .447), 2 texts are pure animals.
    # Majority of top-1 labels: colors. Mean cosine: colors 3 * .894 / 5 = .537, animals (2 + 3 * .447) / 5 = .668.
    judge = EmbeddingJudge(embed_texts=KeywordEmbed(), label_vocabulary=VOCAB)
    v = judge.judge(["red red dog", "blue red cat", "green blue dog", "dog", "cat"])
    assert v.label == "animals"
    assert v.matches == [False, False, False, True, True]
    assert v.similarities == pytest.approx([1 / 5 ** 0.5] * 3 + [1.0, 1.0])


def test_threshold_rules():
    texts = ["red", "red dog", "red dog circle", "dog"]  # cos to colors: 1, .707, .577, 0
    base = dict(embed_texts=KeywordEmbed(), label_vocabulary=VOCAB)
    assert EmbeddingJudge(**base).judge(texts).matches == [True, True, True, False]
    assert EmbeddingJudge(**base, match_rule="threshold", threshold=0.6).judge(texts).matches == \
        [True, True, False, False]
    both = EmbeddingJudge(**base, match_rule="top1_and_threshold", threshold=0.5).judge(texts)
    assert both.matches == [True, True, True, False]


def test_list_vocabulary_and_cache():
    embed = KeywordEmbed()
    judge = EmbeddingJudge(embed_texts=embed, label_vocabulary=["colors", "animals", "shapes"])
    judge.judge(["a dog", "a cat"])
    judge.judge(["red"])
    assert embed.calls == 3  # labels embedded once, then one call per verdict
    assert judge.labels == ["colors", "animals", "shapes"]


def test_default_vocabulary_with_bag_of_words_embed():
    assert len(DEFAULT_LABELS) >= 40
    for needed in ("colors", "shapes", "textures", "people", "gender", "age", "ethnicity", "animals", "locations",
                   "food", "vehicles", "text", "numbers", "body parts", "materials", "lighting", "art style"):
        assert needed in DEFAULT_LABELS

    def bow(texts: list[str]) -> torch.Tensor:
        def vec(word: str) -> torch.Tensor:
            return torch.randn(64, generator=torch.Generator().manual_seed(zlib.crc32(word.encode())))
        return torch.stack([sum((vec(w) for w in t.lower().replace(",", "").split()), torch.zeros(64))
                            for t in texts])

    v = EmbeddingJudge(embed_texts=bow).judge(["animals", "a dog", "a cat", "a wild animal", "a car"])
    assert v.label == "animals"
    assert v.matches[:4] == [True, True, True, True] and v.matches[4] is False


def test_embedding_judge_bad_options():
    with pytest.raises(JudgeError, match="allowed: top1, threshold, top1_and_threshold"):
        EmbeddingJudge(embed_texts=KeywordEmbed(), match_rule="best")
    with pytest.raises(JudgeError, match="needs a threshold"):
        EmbeddingJudge(embed_texts=KeywordEmbed(), match_rule="threshold")
    with pytest.raises(JudgeError, match="at least 2 labels"):
        EmbeddingJudge(embed_texts=KeywordEmbed(), label_vocabulary=["colors"])
    with pytest.raises(JudgeError, match="in \\[-1, 1\\]"):
        EmbeddingJudge(embed_texts=KeywordEmbed(), threshold=3)
    judge = EmbeddingJudge(embed_texts=lambda texts: torch.zeros(1, 3), label_vocabulary=VOCAB)
    with pytest.raises(JudgeError, match="must return an \\(n, D\\) tensor"):
        judge.judge(["a", "b"])
    with pytest.raises(JudgeError, match="run TextSpan"):
        concept_consistency([], judge)


def test_levels_and_bins():
    assert [ccs_level(s) for s in range(6)] == ["low", "low", "low", "moderate", "moderate", "high"]
    assert [ccs_level(s, CCSBins(high=4, moderate=2)) for s in range(6)] == \
        ["low", "low", "moderate", "moderate", "high", "high"]
    with pytest.raises(JudgeError, match="moderate <= high"):
        CCSBins(high=2, moderate=3)


def test_judge_protocol_and_judge_heads():
    judge = EmbeddingJudge(embed_texts=KeywordEmbed(), label_vocabulary=VOCAB)
    assert isinstance(judge, Judge)
    out = judge_heads({(3, 1): ["red", "blue"], (3, 2): ["dog", "circle", "cat"]}, judge)
    assert out[(3, 1)].to_dict()["score"] == 2 and out[(3, 2)].label == "animals"
    assert set(out[(3, 1)].to_dict()) >= {"label", "score", "level", "matches", "descriptions", "judge"}


# ------------------------------------------------------------------------------------- HTTP judge
class _Handler(BaseHTTPRequestHandler):
    replies: list[tuple[int, bytes]] = []  # (status, body) served in order
    seen: list[dict] = []  # {"path", "headers", "body"} per request

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        type(self).seen.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        status, payload = type(self).replies.pop(0) if type(self).replies else (500, b"no reply queued")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server():
    """A chat-completions stand-in on 127.0.0.1 (ephemeral port); its loop ends on teardown or after 20 s."""
    _Handler.replies, _Handler.seen = [], []
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    httpd.timeout = 0.1
    stop = threading.Event()
    deadline = time.monotonic() + 20.0

    def loop() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            httpd.handle_request()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", _Handler
    finally:
        stop.set()
        thread.join(timeout=5)
        httpd.server_close()


def _chat(content: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def test_http_judge_round_trip(server, monkeypatch):
    url, handler = server
    monkeypatch.setenv("CS_TEST_JUDGE_KEY", "secret-123")
    handler.replies.append((200, _chat(json.dumps({"label": "colors", "matches": ["yes", "no", "YES"]}))))
    judge = HttpJudge(url, "tiny-llm", api_key_env="CS_TEST_JUDGE_KEY", timeout=5,
                      label_vocabulary=["colors", "shapes"])
    v = judge.judge(["a red car", "a dog", "a blue sky"])
    assert (v.label, v.matches, v.score, v.judge) == ("colors", [True, False, True], 2, "http:tiny-llm")
    req = handler.seen[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer secret-123"
    assert req["body"]["model"] == "tiny-llm" and req["body"]["temperature"] == 0.0
    user = req["body"]["messages"][-1]["content"]
    assert "1. a red car" in user and "3. a blue sky" in user and "colors, shapes" in user


def test_http_judge_fenced_reply_and_no_key(server, monkeypatch):
    url, handler = server
    monkeypatch.delenv("CS_TEST_JUDGE_KEY", raising=False)
    fenced = "```json\n" + json.dumps({"label": "animals", "matches": [True, True]}) + "\n```"
    handler.replies.append((200, _chat(fenced)))
    v = HttpJudge(url + "/chat/completions", "m", api_key_env="CS_TEST_JUDGE_KEY", timeout=5).judge(["a dog", "a cat"])
    assert v.label == "animals" and v.score == 2
    assert "Authorization" not in handler.seen[0]["headers"]
    assert handler.seen[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(
    "status, body, match",
    [
        (500, b"{}", "HTTP 500"),
        (200, b"<html>oops</html>", "did not return JSON"),
        (200, b'{"error": "x"}', "no choices"),
        (200, _chat("The concept is colours."), "not the requested JSON"),
        (200, _chat(json.dumps({"label": "colors", "matches": ["yes"]})), "1 matches for 2 descriptions"),
        (200, _chat(json.dumps({"label": "colors", "matches": ["yes", "maybe"]})), "'maybe'"),
        (200, _chat(json.dumps({"label": "", "matches": ["yes", "no"]})), "empty or non-text label"),
    ],
)
def test_http_judge_bad_replies(server, status, body, match):
    url, handler = server
    handler.replies.append((status, body))
    with pytest.raises(JudgeError, match=match) as info:
        HttpJudge(url, "m", api_key_env=None, timeout=5).judge(["a", "b"])
    assert isinstance(info.value, SurgeryError) and "\n" not in str(info.value)


def test_http_judge_unreachable():
    with socket.socket() as s:  # a free local port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match="cannot reach judge endpoint"):
        HttpJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, timeout=2).judge(["a"])


def test_http_judge_options():
    with pytest.raises(JudgeError, match="http\\(s\\) URL"):
        HttpJudge("ftp://127.0.0.1/v1", "m")
    with pytest.raises(JudgeError, match="model name"):
        HttpJudge("http://127.0.0.1/v1", " ")
    with pytest.raises(JudgeError, match="timeout"):
        HttpJudge("http://127.0.0.1/v1", "m", timeout=0)
    assert HttpJudge("http://127.0.0.1:9/v1/", "m").url == "http://127.0.0.1:9/v1/chat/completions"


def test_parse_judge_reply_strict():
    assert parse_judge_reply('{"label": " gender ", "matches": ["No", "yes"]}', 2) == ("gender", [False, True])
    with pytest.raises(JudgeError, match="exactly the keys"):
        parse_judge_reply('{"label": "x", "matches": ["yes"], "note": 1}', 1)
    with pytest.raises(JudgeError, match="not the requested JSON"):
        parse_judge_reply('Sure! {"label": "x", "matches": ["yes"]}', 1)


def test_verdict_score_counts_matches():
    v = CCSVerdict("x", ["a", "b", "c", "d", "e"], [True] * 5, "embedding")
    assert v.score == 5 and v.level == "high"


def test_default_judge_with_a_real_text_tower(tiny):
    import open_clip

    model, _ = tiny
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)

    def embed(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tok(texts))

    v = EmbeddingJudge(embed_texts=embed).judge(["a red car", "a blue sky", "a green leaf", "a yellow sun", "a dog"])
    assert v.label in DEFAULT_LABELS and 0 <= v.score <= 5 and len(v.similarities) == 5
