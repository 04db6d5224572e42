"""Neuron deactivation baked into the model: equals the runtime hook, survives safetensors (without
the SAE files) and ONNX export."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers import assert_same_embeddings

import surgery
from surgery.edit.bake import apply_runtime, bake
from surgery.edit.plan import HeadEdit, NeuronEdit, PlanError, SurgeryPlan
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.export.safetensors import export_safetensors
from surgery.sae import SAEConfig, Site, SparseAutoencoder, deactivation, replaced, save_sae


def _sae(tmp_path, site, d_in, kind="relu"):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, expansion=2, kind=kind, k=4, site=site)).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    folder = tmp_path / f"sae_{site}_{kind}"
    save_sae(sae, str(folder))
    return sae, str(folder)


@pytest.mark.parametrize("site, form, kind", [("residual", "paper", "relu"), ("residual", "error_preserving", "batchtopk"),
                                              ("embedding", "paper", "topk")])
def test_baked_neurons_equal_the_runtime_hook(tmp_path, images, tokens, site, form, kind):
    loaded = surgery.load("builtin:tiny")
    d_in = 64 if site == "residual" else 32
    sae, folder = _sae(tmp_path, site, d_in, kind)
    ids = [0, 3, 5, 17]
    plan = SurgeryPlan(heads=[HeadEdit("vision", 1, 2, 0.0)],
                       neurons=[NeuronEdit("vision", folder, ids, 0.6, form, site)]).validate()
    runtime = apply_runtime(copy.deepcopy(loaded.model), plan)
    with replaced(runtime, Site("vision", site), deactivation(sae, ids, 0.6, form)), torch.no_grad():
        want = runtime.encode_image(images)
    baked = bake(copy.deepcopy(loaded.model), plan)
    with torch.no_grad():
        got = baked.encode_image(images)
        plain = loaded.model.encode_image(images)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got - plain).abs().max() > 1e-3
    assert plan.neurons[0].kind == kind  # recorded for rebuilding without the SAE

    patched = copy.copy(loaded)
    patched.model = baked
    out = tmp_path / "patched.safetensors"
    export_safetensors(patched, str(out), plan)
    shutil.rmtree(folder)  # the checkpoint must not need the SAE files any more
    restored = surgery.load(str(out))
    assert_same_embeddings(baked, restored.model, images, tokens, atol=1e-6)

    results = export_onnx(patched, str(tmp_path / "p.onnx"), plan, OnnxOptions(tower="vision"))
    assert results["vision"]["max_abs_error"] <= 1e-4


def test_neuron_plan_validation(tmp_path):
    with pytest.raises(PlanError, match="alpha must be in"):
        SurgeryPlan(neurons=[NeuronEdit("vision", "x", [1], alpha=2.0)]).validate()
    with pytest.raises(PlanError, match="ids must be a non-empty list"):
        SurgeryPlan(neurons=[NeuronEdit("vision", "x", [])]).validate()
    with pytest.raises(PlanError, match="form must be one of paper, error_preserving"):
        SurgeryPlan(neurons=[NeuronEdit("vision", "x", [1], form="soft")]).validate()
    from surgery.model.tiny import build_tiny_clip

    model, _ = build_tiny_clip()
    plan = SurgeryPlan(neurons=[NeuronEdit("vision", str(tmp_path / "missing"), [1])]).validate()
    with pytest.raises(PlanError, match="SAE file .* is missing"):
        plan.check_fits(model, None)


def test_copies_run_their_own_neuron_module(tmp_path, images):
    """deepcopy / .half() of a neuron-edited model use the copy's module (hooks hold no closures)."""
    loaded = surgery.load("builtin:tiny")
    _, folder = _sae(tmp_path, "embedding", 32)
    plan = SurgeryPlan(neurons=[NeuronEdit("vision", folder, [1, 2], 0.6, "paper", "embedding")]).validate()
    model = bake(loaded.model, plan)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.visual.clipsurgery_neurons_embedding.W_dec.zero_()  # only the twin changes
        assert (twin.encode_image(images) - model.encode_image(images)).abs().max() > 1e-4
        half = copy.deepcopy(model).half()
        assert half.encode_image(images.half()).dtype == torch.float16


def test_second_bake_keeps_the_first_plan(tmp_path, images):
    from click.testing import CliRunner

    from surgery.cli.main import main

    loaded = surgery.load("builtin:tiny")
    _, folder = _sae(tmp_path, "residual", 64)
    first = SurgeryPlan(neurons=[NeuronEdit("vision", folder, [0, 3], 0.6, "paper", "residual")]).validate()
    patched = copy.copy(loaded)
    patched.model = bake(copy.deepcopy(loaded.model), first)
    p1 = tmp_path / "p1.safetensors"
    export_safetensors(patched, str(p1), first)
    second = tmp_path / "heads.json"
    SurgeryPlan(heads=[HeadEdit("vision", 1, 0, 0.0)]).save(str(second))
    result = CliRunner().invoke(main, ["bake", str(p1), str(second), str(tmp_path / "p2.safetensors")])
    assert result.exit_code == 0, result.output
    p2 = surgery.load(str(tmp_path / "p2.safetensors"))
    assert len(p2.metadata["plan"]["neurons"]) == 1 and len(p2.metadata["plan"]["heads"]) == 1
    want = bake(copy.deepcopy(patched.model), SurgeryPlan(heads=[HeadEdit("vision", 1, 0, 0.0)]))
    assert_same_embeddings(want, p2.model, images, images.new_zeros(1, 16).long() + 3, atol=1e-6)


def test_stray_neuron_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    loaded = surgery.load("builtin:tiny")
    _, folder = _sae(tmp_path, "embedding", 32)
    plan = SurgeryPlan(neurons=[NeuronEdit("vision", folder, [1], 0.6, "paper", "embedding")]).validate()
    patched = copy.copy(loaded)
    patched.model = bake(copy.deepcopy(loaded.model), plan)
    out = tmp_path / "p.safetensors"
    export_safetensors(patched, str(out), plan)
    state = load_file(str(out))
    import json

    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    plan_dict = json.loads(meta["clipsurgery.plan"])
    plan_dict["neurons"] = []  # the weights stay, the plan forgets them
    meta["clipsurgery.plan"] = json.dumps(plan_dict)
    save_file(state, str(tmp_path / "stray.safetensors"), metadata=meta)
    with pytest.raises(surgery.SurgeryError, match="neuron-module weights its plan does not describe"):
        surgery.load(str(tmp_path / "stray.safetensors"))
