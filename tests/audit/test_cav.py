"""Concept directions: built-in prompt sets, zero-shot and supervised CAVs against hand values."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from surgery.audit.cav import (
    CAVError,
    CAVs,
    builtin_prompt_sets,
    cav_basis,
    encode_labels,
    load_prompt_sets,
    prompt_set,
    supervised_cavs,
    world_prompt_set,
    zero_shot_cavs,
)
from surgery.errors import SurgeryError
from surgery.io.labels import AGE_BANDS
from surgery.world.params import WorldParams
from surgery.world.prompts import group_prompts

FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")


def test_builtin_prompt_sets():
    sets = builtin_prompt_sets()
    assert tuple(sets["gender"]) == ("Male", "Female")
    assert tuple(sets["race"]) == FAIRFACE_RACES
    assert tuple(sets["age"]) == AGE_BANDS
    for attribute, groups in sets.items():
        for group, prompts in groups.items():
            assert len(prompts) >= 5 and len(set(prompts)) == len(prompts), (attribute, group)
    assert load_prompt_sets() == sets == load_prompt_sets("builtin")
    assert prompt_set("race") == sets["race"]


TABLE = {"a man": [2.0, 0, 0, 0], "a big man": [1.0, 0, 1.0, 0], "a woman": [0, 3.0, 0, 0],
         "a child": [0, 0, 0, 1.0]}


def fake_embed(texts: list[str]) -> torch.Tensor:
    return torch.tensor([TABLE[t] for t in texts])


def test_zero_shot_cavs_hand_values():
    cavs = zero_shot_cavs(fake_embed, {"Male": ["a man", "a big man"], "Female": ["a woman"]}, "gender")
    # Male: normalise(mean(e0, (e0 + e2)/sqrt2)); Female: e1
    s = 1 / math.sqrt(2)
    m = torch.tensor([(1 + s) / 2, 0, s / 2, 0])
    m = m / m.norm()
    f = torch.tensor([0.0, 1, 0, 0])
    torch.testing.assert_close(cavs.prototypes, torch.stack([m, f]))
    torch.testing.assert_close(cavs.directions, torch.stack([(m - f) / 2, (f - m) / 2]))
    assert cavs.groups == ("Male", "Female") and cavs.attribute == "gender" and cavs.method == "zero_shot"
    torch.testing.assert_close(cavs.basis()[:, 0], (f - m) / (f - m).norm())  # points from group 0 to 1
    torch.testing.assert_close(cavs.unit_directions().norm(dim=1), torch.ones(2))


def test_three_group_basis_is_orthonormal_span():
    cavs = zero_shot_cavs(fake_embed, {"a": ["a man"], "b": ["a woman"], "c": ["a child"]})
    torch.testing.assert_close(cavs.directions.sum(0), torch.zeros(4))
    B = cavs.basis().double()
    assert B.shape == (4, 2)
    torch.testing.assert_close(B.T @ B, torch.eye(2, dtype=torch.float64))
    residual = cavs.directions.double() - (cavs.directions.double() @ B) @ B.T  # directions lie in span(B)
    assert float(residual.abs().max()) < 1e-6
    # the span does not depend on per-direction scaling
    B2 = cav_basis(cavs.unit_directions() * torch.tensor([[3.0], [0.5], [1.0]])).double()
    torch.testing.assert_close(B @ B.T, B2 @ B2.T)


def test_supervised_cavs_use_mean_of_class_means():
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    cavs = supervised_cavs(feats, torch.tensor([0, 0, 1]), ["A", "B"], normalize_features=False)
    torch.testing.assert_close(cavs.prototypes, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    # mean of class means is (1, 1); the sample-weighted grand mean (4/3, 2/3) would give other directions
    torch.testing.assert_close(cavs.directions, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert cavs.method == "supervised"
    normed = supervised_cavs(feats, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(normed.prototypes, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert normed.groups == ("0", "1")


@pytest.mark.parametrize(
    "labels, groups, match",
    [
        (torch.tensor([0, 0, 0]), None, "one group only"),
        (torch.tensor([0, 0, 2]), ["a", "b", "c"], "no samples labelled b"),
        (torch.tensor([0.0, 1.0, 1.0]), None, "integer group ids"),
        (torch.tensor([0, 1]), None, "3 samples"),
        (torch.tensor([0, 1, 5]), ["a", "b"], "outside \\[0, 1\\]"),
    ],
)
def test_supervised_bad_labels(labels, groups, match):
    with pytest.raises(CAVError, match=match) as info:
        supervised_cavs(torch.randn(3, 4), labels, groups)
    assert isinstance(info.value, SurgeryError) and "\n" not in str(info.value)


def test_encode_labels():
    assert encode_labels(["Female", "Male", "Female"], ("Male", "Female")).tolist() == [1, 0, 1]
    with pytest.raises(CAVError, match="allowed: Male, Female"):
        encode_labels(["male"], ("Male", "Female"))


def test_user_prompt_files(tmp_path):
    data = {"hat": {"yes": ["a person wearing a hat"], "no": ["a bareheaded person", "a person without a hat"]}}
    js = tmp_path / "p.json"
    js.write_text(json.dumps(data))
    assert load_prompt_sets(js) == data
    ym = tmp_path / "p.yaml"
    ym.write_text("hat:\n  yes: [a person wearing a hat]\n"
                  "  no:\n    - a bareheaded person\n    - a person without a hat\n")
    pytest.importorskip("yaml")
    # YAML 1.1 reads bare yes/no as booleans: group names must be text
    with pytest.raises(CAVError, match="group name True"):
        load_prompt_sets(ym)
    ym.write_text("hat:\n  'yes': [a person wearing a hat]\n  'no': [a bareheaded person, a person without a hat]\n")
    assert load_prompt_sets(ym) == data
    with pytest.raises(CAVError, match="available: hat"):
        prompt_set("gender", ym)


def test_yaml_without_pyyaml(tmp_path, monkeypatch):
    ym = tmp_path / "p.yml"
    ym.write_text("a: {x: [p], y: [q]}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    with pytest.raises(CAVError, match="needs PyYAML"):
        load_prompt_sets(ym)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"a": {"x": ["p"]}}, "1 group"),
        ({"a": {"x": ["p"], "y": []}}, "non-empty list"),
        ({"a": {"x": ["p"], "y": "q"}}, "non-empty list"),
        ({"a": ["x", "y"]}, "must map group names"),
        ([], "at least one attribute"),
    ],
)
def test_bad_prompt_files(tmp_path, data, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CAVError, match=match):
        load_prompt_sets(path)


def test_missing_and_broken_prompt_files(tmp_path):
    with pytest.raises(CAVError, match="does not exist"):
        load_prompt_sets(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CAVError, match="not valid JSON"):
        load_prompt_sets(bad)


def test_world_prompt_set():
    params = WorldParams(groups=("red", "orange"))
    ps = world_prompt_set(params)
    assert list(ps) == ["red", "orange"]
    assert [ps[g][0] for g in ps] == group_prompts(params)
    assert "an orange shape" in ps["orange"] and "a red shape" in ps["red"]
    tex = world_prompt_set(WorldParams(attribute_kind="texture"))
    assert list(tex) == ["stripes", "dots"] and tex["stripes"][0] == "a photo of something striped"
    with pytest.raises(CAVError, match="WorldParams"):
        world_prompt_set(object())


def test_cavs_validation():
    with pytest.raises(CAVError, match="at least 2"):
        CAVs("g", ("a",), torch.zeros(1, 3), torch.zeros(1, 3), "zero_shot")
    with pytest.raises(CAVError, match="allowed: zero_shot, supervised"):
        CAVs("g", ("a", "b"), torch.zeros(2, 3), torch.zeros(2, 3), "learned")
    with pytest.raises(CAVError, match="coincide"):
        cav_basis(torch.ones(2, 3))


def test_builtin_sets_with_a_real_text_tower(tiny):
    """Every built-in attribute through a tiny CLIP's text tower gives a (G-1)-dimensional CAV subspace."""
    import open_clip

    model, _ = tiny
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)

    def embed(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tok(texts))

    for attribute, groups in builtin_prompt_sets().items():
        cavs = zero_shot_cavs(embed, groups, attribute)
        G = len(groups)
        assert cavs.directions.shape == (G, 32) and cavs.basis().shape == (32, G - 1), attribute
        torch.testing.assert_close(cavs.prototypes.norm(dim=1), torch.ones(G))
