"""Admission counts the work a request brings, not only its rows (issue 24): image pixels from the
headers and text bytes are measured before any decoding or tokenizing; a request that does not fit
now gets 503 with Retry-After, one that never fits 413, and the server's memory stays bounded."""
from __future__ import annotations

import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_stub import StubPair
from starlette.testclient import TestClient

from surgery.serve.app import create_app
from surgery.serve.batcher import BatchOptions
from surgery.serve.limits import ServeLimits

WAIT_S = 60  # how long a test waits for a held call to be reached (a guard against hanging, not a timing)
ANSWER_S = 20  # how long a request that needs no held call may take to be answered (the same kind of guard)


class _Call:
    """One request on a daemon thread. :meth:`result` waits at most ``timeout`` seconds and then fails
    the test: a request the server never answers (a broken admission lets it wait behind a held call)
    must fail the test, not hang it. (TestClient ignores httpx's timeout: the app runs in-process.)"""

    def __init__(self, fn, *args, **kwargs):
        self._box: dict = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self._box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to result()
            self._box["error"] = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"no answer within {timeout} s: the request is waiting (hung)")
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def _post(client: TestClient, url: str, **kwargs) -> httpx.Response:
    """A request that must be answered without waiting for a held call: within ANSWER_S, or the test fails."""
    return _Call(client.post, url, **kwargs).result(ANSWER_S)


def _get(client: TestClient, url: str) -> httpx.Response:
    return _Call(client.get, url).result(ANSWER_S)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _files(*sizes) -> list:
    return [("f", (f"{i}.png", _png(*size), "image/png")) for i, size in enumerate(sizes)]


@pytest.fixture
def held():
    """(client, stub): the app over a stub pair whose next held call waits for ``stub.release()``."""
    stub = StubPair()
    app = create_app(stub, BatchOptions(max_wait_s=0), ServeLimits(max_image_pixels=10_000))  # 20,000 px at once
    with TestClient(app) as client:
        for _ in range(600):
            if _get(client, "/readyz").status_code == 200:
                break
        yield client, stub
        stub.release()


def test_image_pixels_are_admitted_from_the_headers_before_decoding(held):
    client, stub = held
    stub.hold("pixels")
    first = _Call(client.post, "/v1/embeddings/image", files=_files((100, 100)))  # 10,000 px, held
    assert stub.entered.wait(WAIT_S)
    busy = _post(client, "/v1/embeddings/image", files=_files((100, 100), (100, 100)))  # 20,000: not now
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert busy.json()["error"]["code"] == "busy"
    never = _post(client, "/v1/embeddings/image", files=_files((100, 100), (100, 100), (100, 60)))  # 26,000
    assert never.status_code == 413 and never.json()["error"]["code"] == "request_too_large", never.text
    stub.release()
    assert first.result(WAIT_S).status_code == 200
    again = _post(client, "/v1/embeddings/image", files=_files((100, 100), (100, 100)))  # the share was given back
    assert again.status_code == 200 and len(again.json()["data"]) == 2


def test_text_bytes_are_admitted_before_tokenizing_and_heavy_requests_never_fill_the_budget(held):
    client, stub = held
    stub.hold("tokens", min_items=2)  # requests of one text go through
    big = {"texts": ["a" * 4096] * 256}  # 1 MiB (heavy): four fit in 3/4 of the default 6 MiB of text in flight
    gauge = 'clipsurgery_admitted_work{budget="bytes of text being tokenized"} 4.194304e+06'
    first = [_Call(client.post, "/v1/embeddings/text", json=big) for _ in range(4)]
    for _ in range(WAIT_S * 50):  # all four admitted and held (one tokenizing, three waiting for the heavy thread)
        if gauge in _get(client, "/metrics").text:
            break
        assert not any(f.done() for f in first), [f.result(0).text for f in first if f.done()]
        stub.gate.wait(0.02)
    else:
        raise AssertionError("the four requests were never admitted together")
    # with the heavy share full, a fifth is answered 503 at once (without the share it would wait, held, behind them)
    busy = _post(client, "/v1/embeddings/text", json=big)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy", busy.text
    # an ordinary request still finds room: heavy requests hold at most 3/4 of the budget
    assert _post(client, "/v1/embeddings/text", json={"texts": ["a dog"]}).status_code == 200
    stub.release()
    assert [f.result(WAIT_S).status_code for f in first] == [200] * 4
    assert _post(client, "/v1/embeddings/text", json=big).status_code == 200


@pytest.mark.parametrize("char", ["é", "🙂"])  # 2 and 4 UTF-8 bytes
def test_text_is_admitted_by_its_utf8_bytes_not_its_characters(char):
    """A budget of 1,000 bytes of text: 600 ASCII characters fit; 600 characters of 2 or 4 bytes each
    (1,200 or 2,400 bytes) never do, though they are as many characters."""
    app = create_app(StubPair(), BatchOptions(max_wait_s=0), ServeLimits(max_text_bytes=1000))
    with TestClient(app) as client:
        for _ in range(600):
            if _get(client, "/readyz").status_code == 200:
                break
        assert _post(client, "/v1/embeddings/text", json={"texts": ["e" * 600]}).status_code == 200
        width = len(char.encode("utf-8"))
        for url, body, size in [("/v1/embeddings/text", {"texts": [char * 600]}, 600 * width),
                                ("/v1/embeddings/text", {"texts": [char * 450, "e" * 150]}, 450 * width + 150),
                                ("/v1/embeddings", {"input": [char * 600]}, 600 * width)]:
            answer = _post(client, url, json=body)  # 600 characters, over 1,000 bytes
            assert answer.status_code == 413, (url, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] == "request_too_large"
            assert f"brings {size:,} bytes of text" in answer.text, answer.text


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_server_memory_stays_flat_over_many_distinct_long_texts(default_server):
    rng = np.random.default_rng(0)

    def request() -> dict:  # 64 texts of 4,096 characters of new 9-letter words: 262 KB, as in the issue
        letters = rng.integers(ord("a"), ord("z") + 1, size=(64, 4096), dtype=np.uint8)
        letters[:, 9::10] = ord(" ")
        return {"texts": [row.tobytes().decode() for row in letters]}

    server = default_server  # shared with other tests: the growth is measured over this test's own requests
    for _ in range(5):  # settle: sessions, allocator pools, the tokenizer's first words
        assert httpx.post(server.url + "/v1/embeddings/text", json=request(), timeout=120).status_code == 200
    before = _rss_kib(server.proc.pid)
    for _ in range(40):
        assert httpx.post(server.url + "/v1/embeddings/text", json=request(), timeout=120).status_code == 200
    grown = _rss_kib(server.proc.pid) - before
    # open_clip's cache kept ~5.4 MB per such request (40 requests: ~200 MB); bounded now
    assert grown < 40 * 1024, f"RSS grew {grown / 1024:.0f} MiB over 40 requests of new words"
    print(f"RSS grew {grown / 1024:.1f} MiB over 40 requests of new words")


def test_limits_are_checked():
    from surgery.errors import SurgeryError

    assert ServeLimits(max_image_pixels=1000).max_decode_pixels == 2000
    with pytest.raises(SurgeryError, match="below 4/3 of max_image_pixels"):
        ServeLimits(max_image_pixels=1000, max_decode_pixels=10)
    with pytest.raises(SurgeryError, match="max_aspect_ratio"):
        ServeLimits(max_aspect_ratio=0.5)
    assert np.isfinite(ServeLimits().max_aspect_ratio)
