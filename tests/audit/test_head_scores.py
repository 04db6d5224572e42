"""Per-head scores: a planted biased head ranks first; effect sizes match plain references and hand values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from surgery.audit.cav import CAVs
from surgery.audit.head_scores import (
    GroupAccuracyAccumulator,
    HeadScoreError,
    SeparationAccumulator,
    cav_separation,
    group_accuracy_from_head,
    group_logits,
    mean_rank,
    rank,
    rank_data,
    spearman,
    top_heads,
)
from surgery.errors import SurgeryError

N, L, H, D = 240, 3, 4, 8
PLANTED = (2, 1)


def _cavs_along(u: torch.Tensor, groups=("A", "B"), base: torch.Tensor | None = None) -> CAVs:
    base = torch.zeros_like(u) if base is None else base
    protos = torch.stack([base - u / 2, base + u / 2])
    return CAVs("g", tuple(groups), protos, protos - protos.mean(0, keepdim=True), "zero_shot")


def _planted_world(seed: int = 0, strength: float = 1.5):
    """Noise everywhere; head (2, 1) also carries +/- strength along the unit direction u by group."""
    g = torch.Generator().manual_seed(seed)
    contrib = torch.randn(N, L, H, D, generator=g)
    labels = torch.arange(N) % 2
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    contrib[:, PLANTED[0], PLANTED[1]] += strength * (2 * labels - 1)[:, None].float() * u
    return contrib, labels, u


def test_planted_head_ranks_first_in_both_scores():
    contrib, labels, u = _planted_world()
    sep = cav_separation(contrib, labels, _cavs_along(u))
    acc = group_accuracy_from_head(contrib, labels, torch.stack([-u, u]))
    assert sep.shape == acc.shape == (L, H) and sep.dtype == torch.float32
    assert rank(sep)[0] == PLANTED and rank(acc)[0] == PLANTED
    assert float(sep[PLANTED]) > 2.5  # d = 2 * 1.5 / 1
    assert float(acc[PLANTED]) > 0.9
    others = torch.ones(L, H, dtype=torch.bool)
    others[PLANTED] = False
    assert float(sep[others].max()) < 0.5 and float(acc[others].max()) < 0.65


def test_cohens_d_matches_plain_reference():
    contrib, labels, u = _planted_world(seed=1)
    labels = (torch.arange(N) % 3 == 0).long()  # imbalanced: 80 vs 160
    sep = cav_separation(contrib, labels, _cavs_along(u), signed=True)
    for l, h in [(0, 0), (1, 3), PLANTED]:
        x = (contrib[:, l, h].double() @ u.double()).numpy()
        a, b = x[labels.numpy() == 0], x[labels.numpy() == 1]
        pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        assert float(sep[l, h]) == pytest.approx((b.mean() - a.mean()) / pooled, rel=1e-5)


def test_cohens_d_hand_values_and_sign():
    # projections on e0: group 0 = [0, 2] (mean 1, var 2), group 1 = [4, 6] (mean 5, var 2) -> d = 4 / sqrt(2)
    contrib = torch.zeros(4, 1, 1, 2)
    contrib[:, 0, 0, 0] = torch.tensor([0.0, 2.0, 4.0, 6.0])
    contrib[:, 0, 0, 1] = torch.tensor([9.0, -9.0, 3.0, 1.0])  # off-direction: ignored
    labels = torch.tensor([0, 0, 1, 1])
    e0 = torch.tensor([1.0, 0.0])
    assert float(cav_separation(contrib, labels, _cavs_along(e0), signed=True)) == pytest.approx(2 * math.sqrt(2))
    assert float(cav_separation(contrib, 1 - labels, _cavs_along(e0), signed=True)) == pytest.approx(-2 * math.sqrt(2))
    assert float(cav_separation(contrib, 1 - labels, _cavs_along(e0))) == pytest.approx(2 * math.sqrt(2))
    # the CAV's offset and scale do not matter, only its direction
    assert float(cav_separation(contrib, labels, _cavs_along(5 * e0, base=torch.tensor([3.0, 4.0])))) == \
        pytest.approx(2 * math.sqrt(2))


def test_constant_head_scores_zero():
    contrib = torch.ones(6, 1, 2, 3)
    contrib[:, 0, 1] = torch.randn(6, 3)
    out = cav_separation(contrib, torch.tensor([0, 1] * 3), _cavs_along(torch.tensor([1.0, 0.0, 0.0])))
    assert float(out[0, 0]) == 0.0 and float(out[0, 1]) > 0.0


def _three_group_world(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    contrib = torch.randn(N, L, H, D, generator=g, dtype=torch.float64)
    labels = torch.arange(N) % 3
    protos = torch.randn(3, D, generator=g, dtype=torch.float64)
    contrib[:, PLANTED[0], PLANTED[1]] += 1.2 * protos[labels]
    cavs = CAVs("g", ("a", "b", "c"), protos, protos - protos.mean(0), "zero_shot")
    return contrib, labels, cavs


def test_eta_squared_matches_plain_reference():
    contrib, labels, cavs = _three_group_world()
    eta = cav_separation(contrib, labels, cavs)
    assert rank(eta)[0] == PLANTED
    q, _ = torch.linalg.qr(cavs.directions.T)  # (D, 3): columns span the (2-D) CAV subspace + 1 extra
    basis = q[:, :2]  # the directions sum to 0, so their span is 2-D and the first 2 QR columns cover it
    for l, h in [(0, 0), (1, 2), PLANTED]:
        y = (contrib[:, l, h] @ basis).numpy()
        grand = y.mean(0)
        between = sum((labels == g).sum().item() * ((y[labels.numpy() == g].mean(0) - grand) ** 2).sum()
                      for g in range(3))
        total = ((y - grand) ** 2).sum()
        assert float(eta[l, h]) == pytest.approx(between / total, rel=1e-5)
    # invariant to per-direction scaling (e.g. unit-normalised CAVs as the audit builds them)
    scale = torch.tensor([[2.0], [1.0], [0.3]], dtype=torch.float64)
    rescaled = cav_separation(contrib, labels, cavs.unit_directions() * scale)
    torch.testing.assert_close(rescaled, eta)


def test_eta_squared_relates_to_cohens_d_for_two_groups():
    contrib, labels, u = _planted_world(seed=3)
    labels = (torch.arange(N) % 4 == 0).long()
    cavs = _cavs_along(u)
    d = cav_separation(contrib, labels, cavs, "cohens_d").double()
    eta = cav_separation(contrib, labels, cavs, "eta_squared").double()
    n1 = int(labels.sum())
    w = n1 * (N - n1) / N
    torch.testing.assert_close(eta, w * d * d / (w * d * d + N - 2), rtol=1e-5, atol=1e-7)


def test_streaming_equals_one_shot():
    contrib, labels, cavs = _three_group_world(seed=4)
    basis = cavs.basis()
    proj = contrib @ basis  # (N, L, H, 2)
    acc = SeparationAccumulator(3)
    for chunk in range(0, N, 37):
        acc.update(proj[chunk:chunk + 37] + 100.0, labels[chunk:chunk + 37])  # a large offset: shift-stable
    torch.testing.assert_close(acc.result(), cav_separation(contrib, labels, cavs), rtol=1e-5, atol=1e-6)
    t = torch.randn(3, D, dtype=torch.float64)
    logits = group_logits(contrib, t)
    gacc = GroupAccuracyAccumulator(3)
    for chunk in range(0, N, 50):
        gacc.update(logits[chunk:chunk + 50], labels[chunk:chunk + 50])
    torch.testing.assert_close(gacc.result(), group_accuracy_from_head(contrib, labels, t))
    torch.testing.assert_close(gacc.result(balanced=True), group_accuracy_from_head(contrib, labels, t, balanced=True))


def test_group_accuracy_hand_values():
    # D = 2, groups along e0 (group 0) and e1 (group 1); text norms must not matter
    contrib = torch.tensor([[1.0, 0.2], [0.1, 3.0], [2.0, 1.0], [1.0, 1.0], [0.0, 0.0]])[:, None, None, :]
    labels = torch.tensor([0, 1, 1, 1, 1])
    texts = torch.tensor([[5.0, 0.0], [0.0, 0.5]])
    # predictions: 0, 1, 0, tie -> 0, zero -> 0  => correct: yes, yes, no, no, no
    acc = group_accuracy_from_head(contrib, labels, texts)
    assert float(acc) == pytest.approx(2 / 5)
    # balanced: recall group 0 = 1/1, group 1 = 1/4 -> 0.625
    assert float(group_accuracy_from_head(contrib, labels, texts, balanced=True)) == pytest.approx(0.625)


def test_group_accuracy_center_removes_constant_offset():
    contrib, labels, u = _planted_world(seed=5, strength=3.0)
    contrib[:, PLANTED[0], PLANTED[1]] += -30.0 * u  # everyone looks like group 0
    texts = torch.stack([-u, u])
    assert float(group_accuracy_from_head(contrib, labels, texts)[PLANTED]) == pytest.approx(0.5)
    assert float(group_accuracy_from_head(contrib, labels, texts, center=True)[PLANTED]) > 0.95


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": torch.zeros(N, dtype=torch.long)}, "one group only"),
        ({"labels": torch.arange(N - 1) % 2}, "239 entries"),
        ({"labels": torch.arange(N) % 3}, "outside \\[0, 1\\]"),
        ({"contrib": torch.zeros(N, L, D)}, "\\(N, L, H, D\\)"),
        ({"measure": "auc"}, "allowed: auto, cohens_d, eta_squared"),
    ],
)
def test_bad_input(kwargs, match):
    contrib, labels, u = _planted_world()
    args = {"contrib": contrib, "labels": labels, "cavs": _cavs_along(u)}
    args.update(kwargs)
    with pytest.raises(HeadScoreError, match=match) as info:
        cav_separation(**args)
    assert isinstance(info.value, SurgeryError) and "\n" not in str(info.value)


def test_bad_group_inputs():
    contrib, labels, _ = _three_group_world()
    with pytest.raises(HeadScoreError, match="cohens_d compares 2 groups"):
        cav_separation(contrib, labels, _three_group_world()[2], "cohens_d")
    with pytest.raises(HeadScoreError, match="\\(G >= 2, 8\\)"):
        group_accuracy_from_head(contrib, labels, torch.randn(3, 5))
    with pytest.raises(HeadScoreError, match="CAV directions must be"):
        cav_separation(contrib, labels, torch.randn(3, 5))


# ------------------------------------------------------------------------------------- ranks
def test_rank_orders_ties_and_nan():
    scores = torch.tensor([[1.0, 3.0], [2.0, 3.0]])
    assert rank(scores) == [(0, 1), (1, 1), (1, 0), (0, 0)]
    assert rank(scores, descending=False) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    with_nan = torch.tensor([[float("nan"), 1.0], [0.5, 2.0]])
    assert rank(with_nan) == [(1, 1), (0, 1), (1, 0), (0, 0)]
    assert rank(with_nan, descending=False) == [(1, 0), (0, 1), (1, 1), (0, 0)]
    assert top_heads(scores, 2) == [(0, 1), (1, 1)]


def test_rank_data_averages_ties():
    assert rank_data(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rank_data(torch.tensor([7.0, 7.0, 7.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_hand_values():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, torch.tensor([[1.0, 2.0], [4.0, 3.0]])) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman(a, -a) == pytest.approx(-1.0)
    tied = torch.tensor([[1.0, 2.0], [2.0, 3.0]])  # ranks 1, 2.5, 2.5, 4
    assert spearman(tied, a) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert math.isnan(spearman(torch.ones(2, 2), a))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (4, 5), generator=g).double()  # many ties
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    expected = stats.spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    assert spearman(a, b) == pytest.approx(float(expected), rel=1e-9)


def test_spearman_and_mean_rank_errors():
    with pytest.raises(HeadScoreError, match="differ in shape"):
        spearman(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(HeadScoreError, match="NaN"):
        spearman(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(HeadScoreError, match="at least one"):
        mean_rank([])


def test_mean_rank():
    a = torch.tensor([[3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 3.0, 2.0]])
    # ranks (1 = best): a -> 1, 2, 3; b -> 3, 1, 2; means 2, 1.5, 2.5
    assert mean_rank([a, b]) == [(0, 1), (0, 0), (0, 2)]
    assert np.array_equal(np.array(mean_rank([a])), np.array(rank(a)))
