"""The dynamic batcher in-process: rows from concurrent requests share calls, every caller gets
its own rows in order, a full queue refuses at once, a failed call fails only its callers."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from surgery.errors import SurgeryError
from surgery.serve.batcher import Batcher, BatchOptions, QueueFull


def _double(calls):
    def run(rows):  # rows (B, 2) -> (B, 2)
        calls.append(len(rows))
        return rows * 2.0
    return run


def test_rows_of_concurrent_requests_share_calls_and_come_back_to_their_callers():
    calls = []

    async def main():
        batcher = Batcher(_double(calls), BatchOptions(max_batch=4, max_wait_s=0.5))
        batcher.start()
        sizes = [1, 3, 2, 5, 1]  # 12 rows: requests span batches of 4
        requests = [np.arange(2 * n, dtype=np.float32).reshape(n, 2) + 100 * k for k, n in enumerate(sizes)]
        got = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.drain()
        return requests, got

    requests, got = asyncio.run(main())
    for sent, back in zip(requests, got):
        np.testing.assert_array_equal(back, sent * 2.0)
    assert calls == [4, 4, 4]


def test_a_request_that_does_not_fit_the_queue_is_refused_at_once():
    async def main():
        batcher = Batcher(_double([]), BatchOptions(max_batch=8, max_wait_s=0.2, max_queue=3))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.zeros((2, 2), dtype=np.float32)))
        await asyncio.sleep(0)  # the first request's rows are queued (waiting for company)
        with pytest.raises(QueueFull):
            await batcher.submit(np.zeros((2, 2), dtype=np.float32))
        fits = await batcher.submit(np.ones((1, 2), dtype=np.float32))
        result = await first
        await batcher.drain()
        return fits, result

    fits, result = asyncio.run(main())
    np.testing.assert_array_equal(fits, np.full((1, 2), 2.0))
    assert result.shape == (2, 2)


def test_a_failed_call_fails_its_callers_and_the_batcher_goes_on():
    state = {"fail": True}

    def run(rows):
        if state.pop("fail", False):
            raise RuntimeError("boom")
        return rows + 1.0

    async def main():
        batcher = Batcher(run, BatchOptions(max_batch=8, max_wait_s=0.0))
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(np.zeros((2, 1), dtype=np.float32))
        after = await batcher.submit(np.zeros((1, 1), dtype=np.float32))
        await batcher.drain()
        return after

    np.testing.assert_array_equal(asyncio.run(main()), np.ones((1, 1)))


@pytest.mark.parametrize("field,value", [("max_batch", 0), ("max_wait_s", -1.0), ("max_queue", 0), ("workers", 0)])
def test_bad_options_are_refused(field, value):
    with pytest.raises(SurgeryError, match=field.split("_")[-1] if field != "max_wait_s" else "wait"):
        BatchOptions(**{field: value})
