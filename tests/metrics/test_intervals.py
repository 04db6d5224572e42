"""Paired bootstrap intervals (surgery.metrics.intervals) against their definitions."""
from __future__ import annotations

import pytest
import torch

from surgery.errors import DataError
from surgery.metrics.intervals import drop_interval, ratio_interval


def test_a_constant_difference_has_a_point_interval_and_the_value_is_the_plain_mean_difference():
    before = [1.0, 0.0, 1.0, 1.0]
    after = [0.5, -0.5, 0.5, 0.5]
    iv = drop_interval(before, after)
    assert iv.value == pytest.approx(0.5) and iv.low == pytest.approx(0.5) and iv.high == pytest.approx(0.5)


def test_the_interval_is_paired_and_shrinks_like_one_over_root_n():
    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (100, 1600):
        before = (torch.rand(n, generator=gen) < 0.7).double()
        flip = torch.rand(n, generator=gen) < 0.1
        after = torch.where(flip, 1 - before, before)
        iv = drop_interval(before.tolist(), after.tolist())
        assert iv.low <= iv.value <= iv.high and iv.n == n
        widths.append(iv.high - iv.low)
        # paired: the same items shifted by a shared offset change nothing
        shifted = drop_interval((before + 5).tolist(), (after + 5).tolist())
        assert shifted.low == pytest.approx(iv.low) and shifted.high == pytest.approx(iv.high)
    assert 3.0 < widths[0] / widths[1] < 5.5  # sqrt(16) = 4


def test_the_ratio_interval_contains_the_ratio_of_means_and_is_reproducible():
    before, after = [0.6, 0.7, 0.5, 0.9, 0.3], [0.1, 0.3, 0.2, 0.1, 0.2]
    iv = ratio_interval(before, after)
    assert iv.value == pytest.approx(sum(after) / sum(before))
    assert iv.low <= iv.value <= iv.high
    assert ratio_interval(before, after) == iv


def test_unpaired_or_empty_inputs_are_refused():
    with pytest.raises(DataError, match="equal, non-empty"):
        drop_interval([1.0, 0.0], [1.0])
    with pytest.raises(DataError, match="equal, non-empty"):
        ratio_interval([], [])
