"""The open-vocabulary balance (#28): the module against a plain reference, the gate, the plan entry,
export and loading, and that its fit never reads a held-out query."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery.debias import open_balance as ob
from surgery.debias import search as search_mod
from surgery.debias.balance import Draw
from surgery.debias.open_balance import OpenBalanceOptions, calibrate_gate, fit_open_balance, open_held_out_queries
from surgery.edit.bake import apply_runtime, bake, open_balance_module
from surgery.edit.plan import OpenBalanceEdit, SurgeryPlan
from surgery.errors import PlanError, SurgeryError
from surgery.model.encode import text_embeddings
from surgery.model.open_balance import MODULE_NAME, OpenBalance, spd_solve
from surgery.world.checkpoint import world_params_of
from surgery.world.prompts import cell_queries, group_prompts, neutral_queries, query_wordings


def _module(dim: int = 16, groups: int = 3, per_group: int = 20, neighbours: int = 5, seed: int = 0,
            iterations: int = 1, lo: float = 0.3, hi: float = 0.6) -> OpenBalance:
    gen = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(groups * per_group, dim, generator=gen), dim=-1)  # (n, D), sorted by group
    prompts = F.normalize(torch.randn(groups, dim, generator=gen), dim=-1)
    contrast = prompts - prompts.mean(0, keepdim=True)
    ref = float((prompts * contrast).sum(-1).mean())
    return OpenBalance(bank, contrast, group_counts=[per_group] * groups, neighbours=neighbours, lean_ref=ref,
                       gate_lo=lo, gate_hi=hi, iterations=iterations)


def _reference(module: OpenBalance, t: torch.Tensor) -> torch.Tensor:
    """The module's math written plainly: per text, per group the M nearest bank rows by cosine,
    their means, and the least change by a float64 solve; the gate from the normalised text."""
    out = []
    bank, counts, m = module.bank.double(), module.group_counts, module.neighbours
    for row in t.double():
        unit = row / row.norm()
        lean = float((module.contrast.double() @ unit).max()) / module.lean_ref
        gate = min(1.0, max(0.0, (module.gate_hi - lean) / (module.gate_hi - module.gate_lo)))
        current = row
        for _ in range(module.iterations):
            means, start = [], 0
            for c in counts:
                rows = bank[start:start + c]
                near = (rows @ (current / current.norm())).argsort(descending=True)[:m]
                means.append(rows[near].mean(0))
                start += c
            d = torch.stack([mg - means[0] for mg in means[1:]])  # (G-1, D)
            coef = torch.linalg.solve(d @ d.T, d @ row)
            current = row - gate * (coef @ d)
        out.append(current)
    return torch.stack(out).float()


@pytest.mark.parametrize("groups", [2, 3, 4])
@pytest.mark.parametrize("iterations", [1, 2])
def test_the_module_equals_a_plain_reference_and_gives_equal_evidence(groups, iterations):
    module = _module(groups=groups, iterations=iterations, lo=5.0, hi=6.0)  # gate 1 for every text
    t = 3.0 * torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    got = module(t)
    torch.testing.assert_close(got, _reference(module, t), atol=2e-5, rtol=1e-4)
    # equal evidence: every group's neighbourhood (chosen under the text the last solve started from)
    # scores the corrected text the same; with one iteration those are t's own neighbourhoods
    if iterations == 1:
        means = module.neighbourhood_means(t)  # (B, G, D)
        scores = torch.einsum("bd,bgd->bg", got, means)
        assert (scores - scores[:, :1]).abs().max() < 1e-4
        assert (torch.einsum("bd,bgd->bg", t, means) - torch.einsum("bd,bgd->bg", t, means)[:, :1]).abs().max() > 1e-2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_unrolled_solve_equals_linalg_solve(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(5, k, 8, generator=gen)
    a = x @ x.transpose(1, 2)  # (B, k, k) positive definite
    b = torch.randn(5, k, generator=gen)
    torch.testing.assert_close(spd_solve(a, b), torch.linalg.solve(a, b), atol=1e-4, rtol=1e-4)


def test_the_gate_is_one_below_lo_zero_above_hi_and_linear_between():
    module = _module(groups=3, lo=0.2, hi=0.5)
    t = torch.randn(50, module.bank.shape[1], generator=torch.Generator().manual_seed(3))
    lean, gate = module.lean(t), module.gate(t)
    assert bool((lean <= 0.2).any()) and bool((lean >= 0.5).any())  # both ends are exercised
    assert torch.all(gate[lean <= 0.2] == 1) and torch.all(gate[lean >= 0.5] == 0)
    inside = (lean > 0.2) & (lean < 0.5)
    torch.testing.assert_close(gate[inside], (0.5 - lean[inside]) / 0.3)
    alone = t[lean >= 0.5]
    torch.testing.assert_close(module(alone), alone)  # a text the gate leaves alone comes back unchanged


def test_a_group_prompt_leans_one_and_is_left_alone():
    gen = torch.Generator().manual_seed(2)
    prompts = 4.0 * torch.randn(3, 16, generator=gen)  # unnormalised, as a text tower returns them
    contrast, ref = ob.contrast_of(prompts)
    torch.testing.assert_close(ob.leans(prompts, contrast, ref).mean(), torch.tensor(1.0))


@pytest.fixture(scope="module")
def world():
    loaded = surgery.load("builtin:world")
    params = world_params_of(loaded)
    texts = lambda xs: text_embeddings(loaded.model, xs, loaded.tokenizer)  # noqa: E731
    from surgery.audit.probe import world_probe_set

    probe = world_probe_set(params, loaded.preprocess, 240)
    with torch.no_grad():
        images = loaded.model.encode_image(probe.images[0:len(probe)])
    return loaded, params, texts, Draw(images, probe.groups)


def test_the_gate_leaves_group_naming_texts_alone_and_corrects_neutral_ones(world):
    """On the bundled world: calibrated on two concepts' queries, the gate corrects every neutral
    query of every concept and wording (none of the others seen) and no group-naming query."""
    loaded, params, texts, draw = world
    fitted = neutral_queries(params)[:2]
    fit = fit_open_balance(texts(fitted), texts(group_prompts(params)), [draw], params.n_groups,
                           OpenBalanceOptions(neighbours=20))
    neutral = neutral_queries(params)[2:] + [q for qs in query_wordings(params).values() for q in qs]
    naming = [q for q, _ in cell_queries(params)] + group_prompts(params)
    assert fit.module.gate(texts(neutral)).min() > 0.9  # unseen queries may lean a little past the fitted ones
    assert fit.module.gate(texts(naming)).max() == 0.0
    t = texts(naming)
    torch.testing.assert_close(fit.apply_texts(t), t)  # group-naming texts keep their embedding exactly
    assert (fit.apply_texts(texts(neutral)) - texts(neutral)).norm(dim=-1).min() > 0


def test_calibration_reads_only_the_queries_it_is_given(world):
    _, params, texts, _ = world
    q, g = texts(neutral_queries(params)), texts(group_prompts(params))
    a = calibrate_gate(q[:3], g)
    assert len(a.neutral_leans) == 3 and len(a.naming_leans) == 3 * params.n_groups
    most = max(a.neutral_leans)
    assert abs(a.gate_hi - 0.5 * (most + min(a.naming_leans))) < 1e-3  # leans are stored to 4 places
    assert abs(a.gate_lo - (most + ob.LO_SHARE * (a.gate_hi - most))) < 1e-3 and most < a.gate_lo < a.gate_hi


def test_held_out_folds_never_fit_on_the_rows_they_measure(world, monkeypatch):
    """Spy on the fit's inputs: each fold's fit sees exactly its own half of the queries."""
    _, params, texts, draw = world
    queries = texts(neutral_queries(params))
    seen = []
    real = ob.fit_open_balance

    def spy(q, *args, **kwargs):
        seen.append(q.clone())
        return real(q, *args, **kwargs)
    monkeypatch.setattr(ob, "fit_open_balance", spy)
    result = open_held_out_queries(queries, neutral_queries(params), texts(group_prompts(params)), [draw], [draw],
                                   params.n_groups, 50, OpenBalanceOptions(neighbours=20))
    assert len(seen) == 2 and result.cut is not None
    folds = [list(range(0, len(queries), 2)), list(range(1, len(queries), 2))]
    for fitted, rows in zip(seen, folds):
        torch.testing.assert_close(fitted, queries[rows])
        held = [i for i in range(len(queries)) if i not in rows]
        assert not any(torch.equal(f, queries[i]) for f in fitted for i in held)


def test_the_search_fits_the_open_balance_on_the_listed_queries_only(world, monkeypatch):
    """debias's search with a query list: every open-balance fit it makes reads only listed queries."""
    loaded, params, texts, draw = world
    listed = neutral_queries(params)[:-2]
    held = texts(neutral_queries(params)[-2:])
    seen = []
    real = search_mod.fit_open_balance

    def spy(q, *args, **kwargs):
        seen.append(q.clone())
        return real(q, *args, **kwargs)
    monkeypatch.setattr(search_mod, "fit_open_balance", spy)
    monkeypatch.setattr(ob, "fit_open_balance", spy)
    from surgery.audit.probe import world_probe_set
    from surgery.debias.budget import Budget
    from surgery.debias.balance import BalanceOptions
    from surgery.debias.search import BalanceCandidate, EditSearchOptions, search_edits

    probe = world_probe_set(params, loaded.preprocess, 240)
    probe = copy.copy(probe)
    probe.queries = listed
    q = F.normalize(texts(listed), dim=-1)
    g = F.normalize(texts(group_prompts(params)), dim=-1)
    candidate = BalanceCandidate(BalanceOptions(), g, torch.ones(len(g)), open_options=OpenBalanceOptions(neighbours=20),
                                 fixed=False)
    result = search_edits(loaded.model, [probe], None, q, None, EditSearchOptions(budget=Budget(), max_heads=0, k=10), group_emb=g,
                          balance=candidate)
    assert seen and result.balance is not None
    for fitted in seen:
        for row in fitted:
            assert min((row - F.normalize(h, dim=-1)).norm() for h in held) > 1e-3
            assert min((row - x).norm() for x in q) < 1e-5


def _plan(module: OpenBalance) -> SurgeryPlan:
    return SurgeryPlan(open_balance=[OpenBalanceEdit(
        tower="text", bank=module.bank.tolist(), group_counts=list(module.group_counts),
        contrast=module.contrast.tolist(), neighbours=module.neighbours, lean_ref=module.lean_ref,
        gate_lo=module.gate_lo, gate_hi=module.gate_hi, iterations=module.iterations)])


def _tiny_plan(seed: int = 0) -> SurgeryPlan:
    return _plan(_module(dim=32, groups=3, per_group=12, neighbours=4, seed=seed, lo=0.5, hi=0.9))


def test_the_plan_entry_round_trips_and_bad_entries_are_refused():
    plan = _tiny_plan()
    again = SurgeryPlan.from_dict(plan.to_dict())
    assert again.open_balance[0] == plan.open_balance[0]
    base = plan.to_dict()["open_balance"][0]
    bad = [({"tower": "vision"}, "text tower only"), ({"group_counts": [12, 12]}, "add up"),
           ({"neighbours": 13}, "smallest group"), ({"gate_hi": 0.1}, "above gate_lo"),
           ({"bank": [[float("nan")] * 32] * 36}, "finite"), ({"lean_ref": 0}, "lean_ref")]
    for change, message in bad:
        with pytest.raises(PlanError, match=message):
            SurgeryPlan.from_dict({**plan.to_dict(), "open_balance": [{**base, **change}]})


def test_baked_equals_runtime_and_a_plan_for_another_width_is_refused(tokens):
    plan = _tiny_plan()
    loaded = surgery.load("builtin:tiny")
    reference = apply_runtime(copy.deepcopy(loaded.model), plan)
    baked = bake(copy.deepcopy(loaded.model), plan)
    with torch.no_grad():
        want, got = reference.encode_text(tokens), baked.encode_text(tokens)
        plain = loaded.model.encode_text(tokens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the module acts on these texts
    wide = _plan(_module(dim=16, groups=3, per_group=12, neighbours=4, lo=0.5, hi=0.9))
    with pytest.raises(PlanError, match="16-dimensional"):
        wide.check_fits(loaded.model, None)


def test_onnx_export_equals_pytorch_with_standard_ops_only(tmp_path, tokens):
    import onnx

    from surgery.eval.encoders import OnnxEncoder
    from surgery.export.onnx import OnnxOptions, export_onnx

    plan = _tiny_plan()
    loaded = surgery.load("builtin:tiny")
    loaded.model = bake(loaded.model, plan)
    for graph in ("plain", "ort"):
        out = str(tmp_path / f"{graph}.onnx")
        export_onnx(loaded, out, plan, OnnxOptions(tower="both", graph=graph))
        ops = {n.op_type for n in onnx.load(out.replace(".onnx", ".text.onnx")).graph.node}
        assert "TopK" in ops and "Gather" in ops
        with torch.no_grad():
            want = F.normalize(loaded.model.encode_text(tokens), dim=-1)
        torch.testing.assert_close(OnnxEncoder(out).encode_texts(tokens), want, atol=1e-5, rtol=0)
    plain_ops = {n.domain for n in onnx.load(str(tmp_path / "plain.text.onnx")).graph.node}
    assert plain_ops <= {"", "ai.onnx"}


def test_safetensors_keeps_the_module_and_plain_open_clip_is_told_it_needs_it(tmp_path, tokens):
    from safetensors.torch import load_file

    from surgery.model.arch import build_model

    from surgery.export.safetensors import export_safetensors

    plan = _tiny_plan()
    loaded = surgery.load("builtin:tiny")
    loaded.model = bake(loaded.model, plan)
    out = str(tmp_path / "m.safetensors")
    export_safetensors(loaded, out, plan)
    again = surgery.load(out)
    with torch.no_grad():
        torch.testing.assert_close(again.model.encode_text(tokens), loaded.model.encode_text(tokens), atol=0, rtol=0)
    state = load_file(out)
    assert any(MODULE_NAME in k for k in state)
    plain = build_model(again.config)  # open_clip's own CLIP class for the checkpoint's config
    assert type(plain).__module__.startswith("open_clip")
    with pytest.raises(RuntimeError, match=MODULE_NAME):  # open_clip's strict load names what it lacks
        plain.load_state_dict(state, strict=True)


def test_fit_refuses_groups_with_fewer_images_than_neighbours(world):
    _, params, texts, draw = world
    with pytest.raises(SurgeryError, match="fewer than the open balance's 500 neighbours"):
        fit_open_balance(texts(neutral_queries(params)), texts(group_prompts(params)), [draw], params.n_groups,
                         OpenBalanceOptions(neighbours=500, bank_per_group=512))
