"""Metric values pinned against arithmetic done by hand (written out in the comments)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from surgery.errors import DataError
from surgery.io.queries import NEUTRAL_QUERIES, load_queries
from surgery.metrics.bias import (
    BiasConventions,
    bias_summary,
    cramers_v,
    desired_distribution,
    max_skew_at_k,
    min_skew_at_k,
    ndkl,
    skew_at_k,
)
from surgery.metrics.retrieval import recall_at_k, retrieval_recall
from surgery.metrics.zero_shot import class_embeddings, zero_shot_accuracy, zero_shot_predict
from surgery.world.params import WorldParams
from surgery.world.prompts import neutral_queries

# One gallery of 6 images; group of each image:
GROUPS = [0, 0, 1, 0, 1, 1]
# Query 0 ranks images 0, 1, 2, 3, 4, 5 -> top-3 groups (0, 0, 1).
Q0 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
# Query 1 ranks images 2, 4, 5, 3, 1, 0 -> top-3 groups (1, 1, 1).
Q1 = [0.1, 0.2, 0.9, 0.3, 0.8, 0.7]


def test_skew_uniform_target():
    # top-3 of Q0: counts (2, 1) -> p_top = (2/3, 1/3); uniform p_desired = (1/2, 1/2)
    # Skew_0 = ln((2/3)/(1/2)) = ln(4/3) = 0.287682; Skew_1 = ln((1/3)/(1/2)) = ln(2/3) = -0.405465
    skew = skew_at_k([Q0], GROUPS, k=3, n_groups=2)
    assert skew.shape == (1, 2)
    torch.testing.assert_close(skew, torch.tensor([[0.287682, -0.405465]], dtype=torch.float64), atol=1e-6, rtol=0)
    assert max_skew_at_k([Q0], GROUPS, 3, 2).tolist() == pytest.approx([math.log(4 / 3)])
    assert min_skew_at_k([Q0], GROUPS, 3, 2).tolist() == pytest.approx([math.log(2 / 3)])


def test_skew_smoothing_of_empty_group():
    # top-2 of Q0: groups (0, 0) -> counts (2, 0).
    # Skew_0 = ln((2/2)/(1/2)) = ln 2 = 0.693147.
    # default zero_count 1: p_top(1) = 1/K = 1/2 -> Skew_1 = ln((1/2)/(1/2)) = 0.
    # zero_count 0.5:       p_top(1) = 0.5/2 = 1/4 -> Skew_1 = ln((1/4)/(1/2)) = ln(1/2) = -0.693147.
    default = skew_at_k([Q0], GROUPS, 2, 2)
    half = skew_at_k([Q0], GROUPS, 2, 2, zero_count=0.5)
    assert default[0].tolist() == pytest.approx([0.693147, 0.0], abs=1e-6)
    assert half[0].tolist() == pytest.approx([0.693147, -0.693147], abs=1e-6)
    with pytest.raises(DataError, match="zero_count"):
        skew_at_k([Q0], GROUPS, 2, 2, zero_count=0)


def test_skew_dataset_and_explicit_target():
    groups = [0, 0, 1, 0, 0, 1]  # dataset shares (4/6, 2/6)
    # top-3 of Q0: groups (0, 0, 1) -> p_top = (2/3, 1/3) = the dataset shares -> Skew = (0, 0)
    assert skew_at_k([Q0], groups, 3, 2, target="dataset")[0].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    # top-2: counts (2, 0) -> Skew_0 = ln(1/(2/3)) = ln 1.5; Skew_1 = ln((1/2)/(1/3)) = ln 1.5 (smoothed)
    assert skew_at_k([Q0], groups, 2, 2, target="dataset")[0].tolist() == pytest.approx([math.log(1.5)] * 2)
    # explicit target (0.25, 0.75), top-3 p_top (2/3, 1/3): ln(8/3) = 0.980829, ln(4/9) = -0.810930
    skew = skew_at_k([Q0], groups, 3, 2, target=[0.25, 0.75])
    assert skew[0].tolist() == pytest.approx([0.980829, -0.810930], abs=1e-6)
    assert desired_distribution(groups, 2, "dataset").tolist() == pytest.approx([4 / 6, 2 / 6])


def test_max_skew_mean_vs_sum_over_queries():
    # Q0 top-3: MaxSkew = ln(4/3) = 0.287682 (above).
    # Q1 top-3: groups (1, 1, 1): Skew_1 = ln(1/(1/2)) = ln 2 = 0.693147, Skew_0 = ln((1/3)/(1/2)) (smoothed)
    #   -> MaxSkew = ln 2.
    # mean = (0.287682 + 0.693147) / 2 = 0.490415; sum = 0.980829
    per_query = max_skew_at_k([Q0, Q1], GROUPS, 3, 2)
    assert per_query.tolist() == pytest.approx([0.287682, 0.693147], abs=1e-6)
    assert max_skew_at_k([Q0, Q1], GROUPS, 3, 2, reduce="mean") == pytest.approx(0.490415, abs=1e-6)
    assert max_skew_at_k([Q0, Q1], GROUPS, 3, 2, reduce="sum") == pytest.approx(0.980829, abs=1e-6)
    # MinSkew of Q1 = ln((1/3)/(1/2)) = ln(2/3) = -0.405465 (smoothed empty group 0)
    assert min_skew_at_k([Q0, Q1], GROUPS, 3, 2).tolist() == pytest.approx([-0.405465, -0.405465], abs=1e-6)
    with pytest.raises(DataError, match="allowed: none, mean, sum"):
        max_skew_at_k([Q0], GROUPS, 3, 2, reduce="median")


def test_ties_break_to_lower_gallery_index():
    # all scores equal: the top-1 is image 0 (group 1), so Skew_1 = ln(1/(1/2)) = ln 2
    skew = skew_at_k([[1.0, 1.0, 1.0, 1.0]], [1, 0, 0, 0], 1, 2)
    assert skew[0, 1].item() == pytest.approx(math.log(2))


def test_ndkl_hand_computed():
    # Q0 top-3 groups (0, 0, 1), uniform target (1/2, 1/2), KL in nats:
    #   i=1: D=(1, 0):     KL = 1*ln(1/0.5) = ln 2 = 0.693147,      discount 1/log2(2) = 1
    #   i=2: D=(1, 0):     KL = ln 2 = 0.693147,                      discount 1/log2(3) = 0.630930
    #   i=3: D=(2/3, 1/3): KL = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.056633, discount 1/log2(4) = 0.5
    #   Z = 1 + 0.630930 + 0.5 = 2.130930
    #   NDKL = (0.693147 + 0.693147*0.630930 + 0.056633*0.5) / 2.130930 = 1.158791 / 2.130930 = 0.543796
    assert ndkl([Q0], GROUPS, 3, 2).tolist() == pytest.approx([0.543796], abs=1e-6)
    # alternating ranking (0, 1): i=1 ln 2 * 1, i=2 D=(1/2, 1/2) KL 0 -> ln 2 / (1 + 0.630930) = 0.425001
    assert ndkl([[0.9, 0.1, 0.8, 0.0]], [0, 0, 1, 1], 2, 2).tolist() == pytest.approx([0.425001], abs=1e-6)
    # mean vs sum over [Q0, Q0]
    assert ndkl([Q0, Q0], GROUPS, 3, 2, reduce="mean") == pytest.approx(0.543796, abs=1e-6)
    assert ndkl([Q0, Q0], GROUPS, 3, 2, reduce="sum") == pytest.approx(1.087592, abs=1e-6)


def test_cramers_v_plain_and_bias_corrected():
    # perfect association -> 1
    assert cramers_v([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    # table pred x group = [[3, 1], [1, 3]], n = 8, all margins 4 -> E = 2 everywhere
    # chi2 = 4 * (1^2 / 2) = 2; phi2 = 2/8 = 0.25; V = sqrt(0.25 / 1) = 0.5
    pred = [0, 0, 0, 0, 1, 1, 1, 1]
    grp = [0, 0, 0, 1, 0, 1, 1, 1]
    assert cramers_v(pred, grp) == pytest.approx(0.5)
    # Bergsma: phi2 = 0.25 - 1*1/7 = 0.107143; r~ = c~ = 2 - 1/7 = 1.857143; V = sqrt(0.107143/0.857143) = 0.353553
    assert cramers_v(pred, grp, bias_correction=True) == pytest.approx(0.353553, abs=1e-6)
    # one predicted label for everyone -> 0 by convention
    assert cramers_v([3, 3, 3, 3], [0, 1, 0, 1]) == 0.0
    with pytest.raises(DataError, match="only one group"):
        cramers_v([0, 1, 0], [2, 2, 2])


def test_recall_is_hit_at_k():
    sim = [
        [0.9, 0.1, 0.5, 0.3],  # positive 2 ranks 2nd
        [0.2, 0.8, 0.1, 0.0],  # positive 1 ranks 1st
        [0.1, 0.2, 0.3, 0.4],  # positives {0, 2}: 2 ranks 2nd, 0 ranks 4th
    ]
    positives = [[2], [1], [0, 2]]
    # hit@1: only query 1 -> 1/3. hit@2: all three (query 2 counts though only 1 of its 2 positives is in) -> 1
    assert recall_at_k(sim, positives, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, positives, 2) == pytest.approx(1.0)
    assert recall_at_k(sim[:2], torch.tensor([2, 1]), 1) == pytest.approx(0.5)
    with pytest.raises(DataError, match="K=5 is larger than the gallery of 4"):
        recall_at_k(sim, positives, 5)
    with pytest.raises(DataError, match="no positive"):
        recall_at_k(sim, [[2], [1], []], 1)


def test_retrieval_recall_both_directions():
    images = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # image 2 has no caption
    texts = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    owner = [0, 1, 0]
    # t2i: t0 -> e0 (cos 1) hit; t1 -> e1 hit; t2 -> e2 (cos 1) miss at 1, then e0/e1 tie (0.707) -> e0 hit at 2
    #   t2i@1 = 2/3, t2i@2 = 1
    # i2t (queries e0, e1 only): e0 -> t0 (cos 1) hit; e1 -> t1 hit -> i2t@1 = 1
    out = retrieval_recall(texts, images, owner, ks=(1, 2))
    assert out["t2i@1"] == pytest.approx(2 / 3)
    assert out["t2i@2"] == pytest.approx(1.0)
    assert out["i2t@1"] == pytest.approx(1.0)
    assert out["n_image_queries"] == 2


def test_retrieval_recall_merges_identical_captions():
    # Four images, two of them described by the same caption "a" (texts t0, t1 are identical).
    images = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]]
    texts = [[0.8, 0.6], [0.8, 0.6], [0.0, 1.0]]
    owner = [1, 0, 2]  # "a" describes images 1 and 0; "b" describes image 2
    # cosines of "a" (0.8, 0.6): e3 0.96, e1 0.86, e0 0.80, e2 0.60 -> order e3, e1, e0, e2
    # plain: t0 (positive e1) at rank 2 -> hit@2; t1 (positive e0) at rank 3 -> miss; t2 -> e2 rank 1
    plain = retrieval_recall(texts, images, owner, ks=(1, 2))
    assert plain["t2i@2"] == pytest.approx(2 / 3)
    assert plain["n_text_queries"] == 3
    # merged: query "a" has positives {e0, e1}: best is e1 at rank 2 -> hit@2 only; "b" -> e2 at rank 1
    merged = retrieval_recall(texts, images, owner, ks=(1, 2), text_keys=["a", "a", "b"])
    assert merged["n_text_queries"] == 2
    assert merged["t2i@1"] == pytest.approx(0.5)
    assert merged["t2i@2"] == pytest.approx(1.0)
    # i2t over the 2 merged captions: e0, e1 -> "a" (0.80 / 0.86 vs 0 / 0.11) hit; e2 -> "b" hit
    assert merged["i2t@1"] == pytest.approx(1.0)
    assert merged["n_image_queries"] == 3
    # fewer distinct captions than K: text->image still counts (K <= images), image->text is left out
    few = retrieval_recall(texts, images, owner, ks=(3,), text_keys=["a", "a", "b"])
    assert few["t2i@3"] == pytest.approx(1.0) and "i2t@3" not in few
    with pytest.raises(DataError, match="K=5 is larger than the image gallery of 4 items"):
        retrieval_recall(texts, images, owner, ks=(5,), text_keys=["a", "a", "b"])
    with pytest.raises(DataError, match="2 text keys for 3 captions"):
        retrieval_recall(texts, images, owner, ks=(1,), text_keys=["a", "b"])


def test_zero_shot():
    image_emb = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.1]]
    class_emb = [[1.0, 0.0], [0.0, 1.0]]
    # cosine argmax: (1,0)->0, (0,2)->1, (1,1.1)->1; labels (0, 1, 0) -> 2/3 correct
    assert zero_shot_predict(image_emb, class_emb).tolist() == [0, 1, 1]
    assert zero_shot_accuracy(image_emb, class_emb, [0, 1, 0]) == pytest.approx(2 / 3)
    # ensemble: (1,0) and (0,3) normalised -> mean (0.5, 0.5) -> (0.7071, 0.7071)
    ens = class_embeddings([[[1.0, 0.0], [0.0, 3.0]]])
    assert ens[0].tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\]"):
        zero_shot_accuracy(image_emb, class_emb, [0, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 7}, "K=7 is larger than the gallery of 6 items"),
        ({"k": 0}, "positive integer"),
        ({"n_groups": 1}, "at least 2 groups"),
        ({"groups": [0, 0, 2, 0, 1, 1]}, r"outside \[0, 1\]"),
        ({"groups": [0, 1, 0]}, "3 entries but the gallery has 6"),
        ({"groups": [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]}, "integer ids"),
        ({"target": "parity"}, "allowed: uniform, dataset"),
        ({"target": [0.5, 0.6]}, "summing to 1"),
    ],
)
def test_skew_bad_input(kwargs, message):
    args = {"scores": [Q0], "groups": GROUPS, "k": 3, "n_groups": 2} | kwargs
    with pytest.raises(DataError, match=message):
        skew_at_k(**args)


def test_dataset_target_with_absent_group_is_an_error():
    with pytest.raises(DataError, match=r"groups \[2\] have no gallery items"):
        ndkl([Q0], GROUPS, 3, 3, target="dataset")


def test_conventions_and_summary():
    conv = BiasConventions(k=3, reduce="sum")
    record = conv.to_dict()
    assert record["k"] == 3 and record["reduce"] == "sum" and record["zero_count"] == 1.0
    assert "hit@k" in record["recall"]
    assert BiasConventions.from_dict(json.loads(json.dumps(record))) == conv
    summary = bias_summary([Q0, Q1], GROUPS, 2, conv)
    assert summary["max_skew"] == pytest.approx(0.980829, abs=1e-6)  # sum, see test above
    assert len(summary["per_query"]["skew"]) == 2
    json.dumps(summary)
    with pytest.raises(DataError, match="allowed: mean, sum"):
        BiasConventions(reduce="none")
    with pytest.raises(DataError, match="allowed: uniform, dataset"):
        BiasConventions(target="equal")


def test_query_sets(tmp_path):
    occupations, traits = NEUTRAL_QUERIES["occupations"], NEUTRAL_QUERIES["traits"]
    assert len(occupations) >= 40 and len(traits) >= 20
    assert "a photo of an engineer" in occupations and "a photo of a CEO" in occupations
    assert "a photo of an honest person" in traits and "a photo of a kind person" in traits
    assert neutral_queries(WorldParams(concepts=("circle", "square", "triangle", "star"))) == [
        "a photo of a circle", "a photo of a square", "a photo of a triangle", "a photo of a star"]
    text = tmp_path / "q.txt"
    text.write_text("# my queries\na photo of a nurse\n\n  a photo of a pilot  \n")
    assert load_queries(text) == ["a photo of a nurse", "a photo of a pilot"]
    js = tmp_path / "q.json"
    js.write_text(json.dumps(["a", "b"]))
    assert load_queries(js) == ["a", "b"]
    js.write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="JSON list"):
        load_queries(js)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(DataError, match="no queries"):
        load_queries(tmp_path / "empty.txt")


def test_numpy_inputs_match_torch():
    a = skew_at_k(np.array([Q0, Q1]), np.array(GROUPS), 3, 2)
    b = skew_at_k(torch.tensor([Q0, Q1]), torch.tensor(GROUPS), 3, 2)
    torch.testing.assert_close(a, b)


def test_float32_scores_give_the_same_values():
    sim32 = torch.tensor([Q0, Q1], dtype=torch.float32)
    assert max_skew_at_k(sim32, GROUPS, 3, 2, reduce="mean") == pytest.approx(0.490415, abs=1e-6)
    assert recall_at_k(sim32, [0, 2], 1) == pytest.approx(1.0)  # Q0's best is 0, Q1's best is 2


def test_rank_based_recall_equals_sorting_with_ties():
    """The sort-free hit@K equals the stable-sort definition, ties included."""
    import torch as _torch

    from surgery.metrics.bias import top_k_indices
    from surgery.metrics.retrieval import recall_at_k

    gen = _torch.Generator().manual_seed(0)
    sim = _torch.randint(0, 5, (40, 30), generator=gen).float()  # many ties
    pos = _torch.rand(40, 30, generator=gen) < 0.1
    pos[:, 0] |= ~pos.any(1)
    for k in (1, 3, 10, 30):
        want = _torch.gather(pos, 1, top_k_indices(sim, k)).any(1).double().mean().item()
        assert recall_at_k(sim, pos, k) == want
