"""TextSpan: planted text directions are recovered in order; matches a plain port of the reference."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from surgery.audit.textspan import (
    TextSpanError,
    TextSpanOptions,
    count_in,
    demographic_descriptions,
    load_pool,
    textspan,
    textspan_heads,
)
from surgery.errors import SurgeryError


def _reference(data: np.ndarray, text_features: np.ndarray, iters: int, rank: int):
    """Plain numpy port of clip_text_span's replace_with_iterative_removal (texts pre-normalised)."""
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    text_features = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(text_features.T).T
    mean = data.mean(axis=0, keepdims=True)
    data = data - mean
    reconstruct = np.repeat(mean, data.shape[0], axis=0)
    chosen = []
    for _ in range(iters):
        std = (data @ text_features.T).std(axis=0, ddof=1)
        top = int(np.argmax(std))
        chosen.append(top)
        t = text_features[top]
        norm = t @ t
        part = (data @ t / norm)[:, None] * t[None, :]
        reconstruct = reconstruct + part
        data = data - part
        text_features = text_features - (text_features @ t / norm)[:, None] * t[None, :]
    return chosen, reconstruct


def _planted(seed: int = 0, K: int = 200, D: int = 16, M: int = 30, noise: float = 0.05):
    """C = sum_k a_k(i) t_k with orthonormal planted texts 3, 7, 11 (stds 3, 2, 1) + small noise."""
    g = torch.Generator().manual_seed(seed)
    texts = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    q, _ = torch.linalg.qr(torch.randn(D, 3, generator=g, dtype=torch.float64))
    planted = [3, 7, 11]
    texts[planted] = q.T
    coef = torch.randn(K, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    C = coef @ q.T + 0.5 * q[:, 0] + noise * torch.randn(K, D, generator=g, dtype=torch.float64)
    names = [f"text {i}" for i in range(M)]
    return C, texts, names, planted


def test_recovers_planted_texts_in_order():
    C, T, names, planted = _planted()
    res = textspan(C, T, names, n_components=80, iterations=3)
    assert res.indices == planted
    assert res.texts == [names[i] for i in planted]
    # variance shares of stds 3, 2, 1 (noise aside): 9/14, 4/14, 1/14
    np.testing.assert_allclose(res.variance_explained, [9 / 14, 4 / 14, 1 / 14], atol=0.06)
    assert res.residual_variance < 0.02


def test_recovers_planted_texts_with_low_rank_projection():
    C, T, names, planted = _planted(seed=1)
    assert textspan(C, T, names, n_components=3, iterations=3).indices == planted


def test_matches_plain_reference_on_random_data():
    g = torch.Generator().manual_seed(5)
    C = torch.randn(40, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    T = torch.nn.functional.normalize(torch.randn(25, 12, generator=g, dtype=torch.float64), dim=1)
    names = [str(i) for i in range(25)]
    for rank, iters in ((4, 4), (80, 6)):
        chosen, recon = _reference(C.numpy(), T.numpy(), iters=iters, rank=rank)
        res = textspan(C, T, names, n_components=rank, iterations=iters)
        assert res.indices == chosen
        np.testing.assert_allclose(res.reconstruction.double().numpy(), recon, rtol=1e-4, atol=1e-4)
    # a rank-4 span holds 4 directions: the reference would go on picking rounding noise, we stop
    first4, _ = _reference(C.numpy(), T.numpy(), iters=4, rank=4)
    assert textspan(C, T, names, n_components=4, iterations=6).indices == first4


def test_variance_accounting_and_orthonormal_directions():
    C, T, names, _ = _planted(seed=2, noise=0.3)
    res = textspan(C.float(), T.float(), names, iterations=6)
    assert sum(res.variance_explained) + res.residual_variance == pytest.approx(1.0, abs=1e-6)
    assert all(a >= 0 for a in res.variance_explained)
    gram = res.directions.double() @ res.directions.double().T
    np.testing.assert_allclose(gram.numpy(), np.eye(6), atol=1e-5)
    assert res.directions.shape == (6, C.shape[1]) and res.reconstruction.shape == C.shape
    assert len(res.scores) == 6 and res.scores[0] >= res.scores[-1]
    assert set(res.to_dict()) == {"texts", "indices", "variance_explained", "residual_variance", "scores"}


def test_texts_are_normalised_by_default():
    C, T, names, planted = _planted(seed=3)
    scaled = T * torch.linspace(0.1, 5.0, T.shape[0], dtype=torch.float64)[:, None]
    assert textspan(C, scaled, names, iterations=3).indices == planted
    raw = textspan(C, scaled, names, iterations=1, options=TextSpanOptions(iterations=1, normalize_texts=False))
    assert raw.indices != planted[:1]  # without normalisation the longest text vector wins


def _partial_text_case():
    """C spans u1 (std 3) and u2 (std 2) exactly; text A = u2; text B = 0.5 u1 + 0.866 w, w outside the span."""
    D = 6
    e = torch.eye(D, dtype=torch.float64)
    u1, u2, w = e[0], e[1], e[2]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 2, generator=g, dtype=torch.float64)
    a = (a - a.mean(0)) / a.std(0)
    C = 3 * a[:, :1] * u1 + 2 * a[:, 1:] * u2
    T = torch.stack([u2, 0.5 * u1 + (0.75 ** 0.5) * w, e[4]])
    return C, T, ["A", "B", "C"]


def test_selection_reference_vs_unit():
    C, T, names = _partial_text_case()
    # reference: std(C t) = 2 for A, 0.5 * 3 = 1.5 for B -> A; unit: 2 for A, 3 for B -> B
    ref = textspan(C, T, names, options=TextSpanOptions(n_components=2, iterations=1))
    unit = textspan(C, T, names, options=TextSpanOptions(n_components=2, iterations=1, selection="unit"))
    assert ref.texts == ["A"] and unit.texts == ["B"]
    assert ref.scores[0] == pytest.approx(2.0, rel=1e-9)
    assert unit.scores[0] == pytest.approx(3.0, rel=1e-9)


def test_stops_when_no_direction_is_left(caplog):
    C, T, names = _partial_text_case()
    with caplog.at_level(logging.INFO, logger="surgery.audit.textspan"):
        res = textspan(C, T, names, n_components=2, iterations=5)
    assert sorted(res.texts) == ["A", "B"]
    assert res.residual_variance == pytest.approx(0.0, abs=1e-12)
    assert "stopped after 2 of 5" in caplog.text


def test_textspan_heads_keys_and_agreement():
    C, T, names, planted = _planted(seed=4, K=60)
    contrib = torch.randn(60, 2, 3, C.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    contrib[:, 1, 2] = C
    out = textspan_heads(contrib, T, names, TextSpanOptions(iterations=3), first_layer=10)
    assert sorted(out) == [(10, 0), (10, 1), (10, 2), (11, 0), (11, 1), (11, 2)]
    assert out[(11, 2)].indices == planted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"contrib": torch.zeros(5)}, "2-D tensor"),
        ({"text_emb": torch.zeros(4, 7)}, "width"),
        ({"texts": ["a", "b"]}, "4 rows"),
        ({"contrib": torch.zeros(1, 8)}, "at least 2"),
        ({"contrib": torch.full((3, 8), float("nan"))}, "NaN"),
        ({"iterations": 0}, "iterations"),
        ({"n_components": 1.5}, "n_components"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"contrib": torch.randn(3, 8), "text_emb": torch.randn(4, 8), "texts": list("abcd")}
    args.update(kwargs)
    with pytest.raises(TextSpanError, match=match) as info:
        textspan(**args)
    assert isinstance(info.value, SurgeryError) and "\n" not in str(info.value)


def test_options_validation():
    with pytest.raises(TextSpanError, match="allowed: reference, unit"):
        TextSpanOptions(selection="max")
    with pytest.raises(TextSpanError, match="true or false"):
        TextSpanOptions(normalize_texts=1)
    assert TextSpanOptions().to_dict()["n_components"] == 80


# ------------------------------------------------------------------------------------- pools
def test_builtin_pools():
    general = load_pool("general")
    demographic = load_pool("demographic")
    both = load_pool("bias_augmented")
    assert len(general) >= 300 and len(set(general)) == len(general)
    assert both == general + [d for d in demographic if d not in general]
    assert demographic == demographic_descriptions()
    text = " ".join(demographic).lower()
    for word in ("man", "woman", "white", "black", "latino", "east asian", "southeast asian", "indian",
                 "middle eastern", "baby", "teenager", "elderly", "person"):
        assert word in text, word
    assert load_pool() == both


def test_user_pools_and_extra(tmp_path):
    txt = tmp_path / "pool.txt"
    txt.write_text("a red thing\n\n# comment\n a blue thing \na red thing\n")
    assert load_pool(txt) == ["a red thing", "a blue thing"]
    js = tmp_path / "pool.json"
    js.write_text(json.dumps(["x", "y", "x"]))
    assert load_pool(str(js)) == ["x", "y"]
    assert load_pool(js, extra=["z", "x"]) == ["x", "y", "z"]
    assert load_pool(js, extra={"concepts": ["a circle"], "groups": ["something red"]}) == \
        ["x", "y", "a circle", "something red"]


@pytest.mark.parametrize(
    "content, name, match",
    [
        ("[1, 2]", "bad.json", "list of strings"),
        ("[\"a\",", "broken.json", "not valid JSON"),
        ("\n\n", "empty.txt", "empty"),
    ],
)
def test_bad_user_pools(tmp_path, content, name, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TextSpanError, match=match):
        load_pool(path)


def test_missing_pool_and_bad_extra(tmp_path):
    with pytest.raises(TextSpanError, match="general, demographic, bias_augmented"):
        load_pool("generic")
    with pytest.raises(TextSpanError, match="list of strings"):
        load_pool("general", extra="red")


def test_count_in():
    C, T, names, planted = _planted()
    res = textspan(C, T, names, iterations=3)
    assert count_in(res, ["text 3", "text 11", "text 0"]) == 2


def test_builtin_pool_with_a_real_text_tower(tiny):
    """The built-in pool through a tiny CLIP's text tower: planted pool texts are recovered."""
    import open_clip

    model, _ = tiny
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    pool = load_pool("bias_augmented")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.encode_text(tok(pool)), dim=-1)  # (M, 32)
    a, b = pool.index("a striped pattern"), pool.index("a photo of a woman")
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(100, 2, generator=g) * torch.tensor([2.0, 1.0])
    ortho_b = emb[b] - (emb[b] @ emb[a]) * emb[a]  # the second planted direction, orthogonal to the first
    C = coef[:, :1] * emb[a] + coef[:, 1:] * ortho_b / ortho_b.norm()
    res = textspan(C, emb, pool, iterations=2)
    assert res.texts == ["a striped pattern", "a photo of a woman"]
    assert count_in(res, demographic_descriptions()) == 1
