"""The balance edit's fit: the closed form against a plain dense solve, the constraints on the fit
data, what it does to a planted recognition gap, and bad input."""
from __future__ import annotations

import pytest
import torch

from surgery.debias.balance import (
    BalanceOptions,
    Draw,
    Texts,
    fit_balance,
    held_out_queries,
    max_skews,
    neighbourhood_means,
    neighbourhood_sizes,
)
from surgery.debias.balance_solve import least_change, second_moment
from surgery.errors import SurgeryError


def _dense_reference(a, b, sigma, c):
    """min vec(A)^T (Sigma kron I) vec(A) s.t. a_k^T A b_k = c_k, solved over all D*D entries."""
    dim = a.shape[1]
    rows = torch.stack([torch.outer(ak, bk).flatten() for ak, bk in zip(a, b)])  # (n, D*D), row-major vec(A)
    weight = torch.kron(torch.eye(dim, dtype=torch.float64), sigma)  # tr(A Sigma A^T) in row-major vec
    inv = torch.linalg.inv(weight)
    lam = torch.linalg.solve(rows @ inv @ rows.T, c)
    return (inv @ rows.T @ lam).reshape(dim, dim)


def test_least_change_equals_a_dense_constrained_solve():
    gen = torch.Generator().manual_seed(0)
    dim, n = 6, 4
    a, b = torch.randn(n, dim, generator=gen, dtype=torch.float64), torch.randn(n, dim, generator=gen, dtype=torch.float64)
    sigma = second_moment(torch.randn(20, dim, generator=gen), ridge=0.1)
    fit = least_change(a, b, sigma)
    reference = _dense_reference(a, b, sigma, -(a * b).sum(1))
    torch.testing.assert_close(fit.matrix(), reference, atol=1e-9, rtol=1e-7)
    assert fit.residual < 1e-9 and fit.rank <= n
    # every constraint a_k^T (I + A) b_k = 0 holds
    torch.testing.assert_close(((a @ (torch.eye(dim, dtype=torch.float64) + fit.matrix())) * b).sum(1),
                               torch.zeros(n, dtype=torch.float64), atol=1e-9, rtol=0)


def test_duplicate_and_empty_constraints_give_a_finite_regularised_fit():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    a, b = torch.cat([a, a[:1], torch.zeros(1, 5, dtype=torch.float64)]), torch.cat([b, b[:1], b[:1]])  # singular
    fit = least_change(a, b, second_moment(torch.randn(10, 5, generator=gen)))
    assert torch.isfinite(fit.u).all() and torch.isfinite(fit.v).all()
    assert fit.residual < 1e-6
    nothing = least_change(torch.zeros(2, 5), torch.randn(2, 5, generator=gen), torch.eye(5, dtype=torch.float64))
    assert nothing.rank == 0 and nothing.residual == 0.0


@pytest.mark.parametrize("a, b, message", [
    (torch.zeros(0, 4), torch.zeros(0, 4), "no constraints"),
    (torch.full((1, 4), float("nan")), torch.ones(1, 4), "NaN or infinite"),
    (torch.ones(2, 4), torch.ones(3, 4), "shapes do not fit"),
])
def test_least_change_refuses_bad_constraints(a, b, message):
    with pytest.raises(SurgeryError, match=message):
        least_change(a, b, torch.eye(4, dtype=torch.float64))


def _planted(seed: int, n: int = 400, dim: int = 12, concepts: int = 3):
    """A world in miniature: each concept is recognised more strongly in its majority group
    (concept c's majority is group c % 2), the images also carry a group direction, and the
    queries are the concept directions. Returns (queries (C, D), draw)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)))[0]
    concept_dirs, group_dirs = basis[:concepts], basis[concepts:concepts + 2]
    c = torch.arange(n) % concepts
    g = (torch.arange(n) // concepts) % 2
    strength = torch.where(g == c % 2, 1.0, 0.6)[:, None]  # the majority group's stronger recognition
    x = strength * concept_dirs[c] + 0.5 * group_dirs[g] + 0.35 * torch.randn(n, dim, generator=gen)
    return concept_dirs.clone(), Draw(x, g)


def _texts(queries, seed=3):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(30, queries.shape[1], generator=gen)
    return Texts(queries, pool, torch.ones(len(pool)))


def test_the_text_fit_equalises_every_neighbourhood_and_cuts_a_planted_recognition_gap():
    queries, draw = _planted(0)
    draws = [draw, _planted(1)[1]]
    options = BalanceOptions(k=40)
    fit = fit_balance(_texts(queries), draws, 2, options)
    assert fit.map.residual < 1e-8
    assert min(fit.gaps_before) > 0.05  # the majority group scores higher near every query
    # constraints hold on the neighbourhoods the last iteration chose
    assert max(fit.gaps_after) < 0.02 * max(fit.gaps_before) + 1e-6
    before = max_skews(queries, draws, 2, 40)
    after = max_skews(fit.apply_texts(queries), draws, 2, 40)
    assert float(after.mean()) < 0.5 * float(before.mean())
    fresh = [_planted(7)[1]]  # and on images the fit never saw
    assert float(max_skews(fit.apply_texts(queries), fresh, 2, 40).mean()) < 0.5 * float(max_skews(queries, fresh, 2, 40).mean())
    assert fit.edit({"queries": ["a", "b", "c"], "groups": ["x", "y"]}).rank <= 3


def test_the_image_side_moves_the_images_not_the_texts():
    queries, draw = _planted(0)
    fit = fit_balance(_texts(queries), [draw], 2, BalanceOptions(side="image", k=40))
    assert torch.equal(fit.apply_texts(queries), queries)
    assert not torch.equal(fit.apply_images(draw.images), draw.images)
    assert fit.edit({}).tower == "vision"


def test_neighbourhoods_are_each_groups_nearest_images():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.2, 0.3]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    images = torch.eye(6)
    means = neighbourhood_means(scores, images, groups, [2, 1])  # group 0: its 2 best (0, 2); group 1: its best (3)
    torch.testing.assert_close(means[0, 0], (images[0] + images[2]) / 2)
    torch.testing.assert_close(means[0, 1], images[3])
    assert neighbourhood_sizes(torch.tensor([0] * 600 + [1] * 600), 2, 50, 2.0) == [50, 50]
    assert neighbourhood_sizes(torch.tensor([0] * 10 + [1] * 2), 2, 50, 2.0) == [10, 2]  # never more than a group has


def test_held_out_queries_are_measured_by_fits_that_never_saw_them():
    queries, draw = _planted(0, concepts=4)
    result = held_out_queries(_texts(queries), ["q0", "q1", "q2", "q3"], [draw], 2, BalanceOptions(k=40))
    assert [r["query"] for r in result.per_query] == ["q0", "q1", "q2", "q3"]
    assert result.cut is not None and result.cut < 0.9  # orthogonal concepts share nothing a fit could carry over
    assert held_out_queries(_texts(queries[:1]), ["q0"], [draw], 2, BalanceOptions(k=40)).cut is None


@pytest.mark.parametrize("change, message", [
    ({"groups": torch.zeros(400, dtype=torch.long)}, "two or more groups"),
    ({"n_groups": 3}, "group 2 has no images in probe draw 0"),
    ({"queries": torch.zeros(0, 12)}, "query list is empty"),
    ({"k": 1000}, "fewer than K=1000"),
])
def test_bad_balance_input_is_one_clear_error(change, message):
    queries, draw = _planted(0)
    groups = change.get("groups", draw.groups)
    n_groups = change.get("n_groups", int(groups.max()) + 1)
    with pytest.raises(SurgeryError, match=message):
        fit_balance(_texts(change.get("queries", queries)), [Draw(draw.images, groups)], n_groups,
                    BalanceOptions(k=change.get("k", 40)))


@pytest.mark.parametrize("kwargs, message", [
    ({"side": "audio"}, "side must be one of text, image"),
    ({"ridge": 0.0}, "ridge must be > 0"),
    ({"depth": 0.0}, "depth must be > 0"),
    ({"iterations": 0}, "iterations must be an integer >= 1"),
])
def test_balance_options_are_validated(kwargs, message):
    with pytest.raises(SurgeryError, match=message):
        BalanceOptions(**kwargs)
