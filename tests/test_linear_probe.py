"""Linear probes: a separable label is read perfectly, an unrelated one at chance, the fixed probe
follows the features it was trained on, and a retrained probe survives a partial edit."""
from __future__ import annotations

import pytest
import torch

from surgery.linear_probe import ProbeError, cross_validated_accuracy, fit_linear_probe, probe_accuracy


def _data(n=400, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=gen)
    x[:, 0] += 4.0 * (2 * y - 1)  # the label lives on feature 0, with a wide margin
    return x, y


def test_separable_label_is_read_and_unrelated_label_is_at_chance():
    x, y = _data()
    assert cross_validated_accuracy(x, y, 2) > 0.99
    noise = torch.randint(0, 2, (len(y),), generator=torch.Generator().manual_seed(1))
    assert abs(cross_validated_accuracy(x, noise, 2) - 0.5) < 0.1


def test_fixed_probe_loses_the_label_when_its_direction_is_removed_and_a_retrained_one_does_not_after_shrinking():
    x, y = _data()
    predict = fit_linear_probe(x[:200], y[:200], 2)
    assert probe_accuracy(predict, x[200:], y[200:]) > 0.99
    removed = x.clone()
    removed[:, 0] = 0  # the label's direction projected out
    assert abs(probe_accuracy(predict, removed[200:], y[200:]) - 0.5) < 0.1
    assert abs(cross_validated_accuracy(removed, y, 2) - 0.5) < 0.1
    shrunk = x.clone()
    shrunk[:, 0] *= 0.4  # a = 0.6 edit that keeps 40% of the direction
    assert cross_validated_accuracy(shrunk, y, 2) > 0.95  # the retrained probe rescales


def test_probe_matches_a_plain_logistic_regression_decision():
    """Reference: the same penalised objective minimised by plain gradient descent decides alike."""
    x, y = _data(n=200, d=4, seed=3)
    predict = fit_linear_probe(x, y, 2)
    xs = (x.double() - x.double().mean(0)) / x.double().std(0)
    w = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=0.5)
    for _ in range(3000):
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(xs @ w + b, y) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    assert torch.equal(predict(x), (xs @ w + b).argmax(1))


@pytest.mark.parametrize("x, y, n, message", [
    (torch.zeros(4, 2), torch.tensor([0, 1, 0]), 2, "features must be"),
    (torch.zeros(4, 2), torch.tensor([0, 1, 0, 2]), 2, "labels must lie"),
    (torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), 2, "NaN"),
])
def test_bad_input_is_refused(x, y, n, message):
    with pytest.raises(ProbeError, match=message):
        fit_linear_probe(x, y, n)


def test_folds_out_of_range_are_refused():
    x, y = _data(n=10)
    with pytest.raises(ProbeError, match="folds"):
        cross_validated_accuracy(x, y, 2, folds=1)
