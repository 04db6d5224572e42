"""Linear probes: a separable label is read and an unrelated one is at chance; the fit minimises the
stated objective (coefficients equal a plain gradient-descent fit); a fixed probe misses a label
that a retrained one still reads; bad input is refused."""
from __future__ import annotations

import pytest
import torch

from surgery.metrics.linear_probe import (
    ProbeError,
    cross_validated_accuracy,
    fit_linear_probe,
    probe_accuracy,
    probe_loss,
)


def _data(n=400, d=8, margin=4.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=gen)
    x[:, 0] += margin * (2 * y - 1)  # the label lives on feature 0
    return x, y


def test_separable_label_is_read_and_unrelated_label_is_at_chance():
    x, y = _data()
    assert cross_validated_accuracy(x, y, 2) > 0.99
    noise = torch.randint(0, 2, (len(y),), generator=torch.Generator().manual_seed(1))
    assert abs(cross_validated_accuracy(x, noise, 2) - 0.5) < 0.1


def test_fit_equals_plain_gradient_descent_on_the_same_objective():
    """Overlapping classes (margin 0.5), so the coefficients are pinned by the objective, not by
    separability: L-BFGS and 20k steps of plain gradient descent reach the same minimiser."""
    x, y = _data(n=300, d=4, margin=0.5, seed=3)
    probe = fit_linear_probe(x, y, 2, weight_decay=1e-2)
    xs = (x.double() - x.double().mean(0)) / x.double().std(0)
    w = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=0.5)
    for _ in range(20000):
        opt.zero_grad()
        probe_loss(xs @ w + b, y, w, 1e-2).backward()
        opt.step()
    # softmax logits are defined up to a per-row constant: compare class differences
    torch.testing.assert_close(probe.weight[:, 1] - probe.weight[:, 0], (w[:, 1] - w[:, 0]).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.bias[1] - probe.bias[0], (b[1] - b[0]).detach(), atol=1e-5, rtol=0)
    assert 0.55 < probe_accuracy(probe, x, y) < 0.8  # overlapping: neither chance nor perfect


def test_fixed_probe_misses_a_shifted_label_that_a_retrained_probe_reads():
    x, y = _data()
    fixed = fit_linear_probe(x[:200], y[:200], 2)
    assert probe_accuracy(fixed, x[200:], y[200:]) > 0.99
    shifted = x.clone()
    shifted[:, 0] += 10.0  # an edit that moves every image past the fixed probe's threshold
    assert abs(probe_accuracy(fixed, shifted[200:], y[200:]) - 0.5) < 0.05
    assert cross_validated_accuracy(shifted, y, 2) > 0.99  # the label is still linearly there
    removed = x.clone()
    removed[:, 0] = torch.randn(len(y), generator=torch.Generator().manual_seed(2))  # the label's direction replaced
    assert abs(probe_accuracy(fixed, removed[200:], y[200:]) - 0.5) < 0.1
    assert abs(cross_validated_accuracy(removed, y, 2) - 0.5) < 0.1


@pytest.mark.parametrize("x, y, n, message", [
    (torch.zeros(4, 2), torch.tensor([0, 1, 0]), 2, "features must be"),
    (torch.zeros(4, 2), torch.tensor([0, 1, 0, 2]), 2, "labels must lie"),
    (torch.zeros(4, 2), torch.tensor([0.0, 1.0, 0.0, 1.0]), 2, "integer class ids"),
    (torch.zeros(1, 2), torch.tensor([0]), 2, "at least 2 rows"),
    (torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), 2, "NaN"),
])
def test_bad_input_is_refused(x, y, n, message):
    with pytest.raises(ProbeError, match=message):
        fit_linear_probe(x, y, n)


@pytest.mark.parametrize("n, folds", [(10, 1), (3, 2)])  # (3, 2): a fold trains on 1 row
def test_folds_that_leave_too_few_training_rows_are_refused(n, folds):
    x, y = _data(n=n)
    with pytest.raises(ProbeError, match="folds"):
        cross_validated_accuracy(x, y, 2, folds=folds)
