"""Nothing broken ships: a NaN/inf anywhere in a plan is refused; a model whose outputs are not
finite is refused by bake/export; the parity gate counts a non-finite output as a failure."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner

from surgery.cli.main import main
from surgery.edit.plan import SurgeryPlan
from surgery.errors import PlanError, SurgeryError
from surgery.export.onnx import export_onnx, parity_error
from surgery.export.safetensors import export_safetensors
from surgery.model.loading import load

HEAD = {"tower": "vision", "layer": 0, "head": 1, "scale": 0.0, "ablation": "mean", "mean": [0.0] * 16}


def _plan(**head):
    return {"schema": "clipsurgery.plan/1", "heads": [{**HEAD, **head}]}


@pytest.mark.parametrize(("head", "message"), [
    ({"mean": [0.0] * 15 + [math.nan]}, "mean must be a list of finite numbers"),
    ({"mean": [0.0] * 15 + [math.inf]}, "mean must be a list of finite numbers"),
    ({"mean": ["0.1"] * 16}, "mean must be a list of finite numbers"),
    ({"scale": math.nan}, "scale must be in"),
    ({"scale": math.inf}, "scale must be in"),
    ({"scale": True}, "scale must be in"),
])
def test_non_finite_or_non_numeric_head_values_are_refused(head, message):
    with pytest.raises(PlanError, match=message):
        SurgeryPlan.from_dict(_plan(**head))


@pytest.mark.parametrize(("neuron", "message"), [
    ({"alpha": math.nan}, "alpha must be in"),
    ({"ids": [1, math.nan]}, "ids must be a non-empty list"),
    ({"ids": [True]}, "ids must be a non-empty list"),
    ({"sae": 3}, "sae must be the path"),
])
def test_non_finite_neuron_values_are_refused(neuron, message):
    edit = {"tower": "vision", "sae": "sae/", "ids": [1, 2], "alpha": 0.6, **neuron}
    with pytest.raises(PlanError, match=message):
        SurgeryPlan.from_dict({"schema": "clipsurgery.plan/1", "neurons": [edit]})


def test_nan_written_as_json_literal_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan()).replace("0.0, 0.0]", "0.0, NaN]", 1))  # json.loads accepts NaN
    with pytest.raises(PlanError, match="finite"):
        SurgeryPlan.load(str(path))


@pytest.mark.parametrize(("data", "message"), [
    ({"schema": "clipsurgery.plan/1", "source": "abc", "heads": []}, "'source' must be a JSON object"),
    ({"schema": "clipsurgery.plan/1", "provenance": [1], "heads": []}, "'provenance' must be a JSON object"),
    ({"schema": 1, "heads": []}, "'schema' must be a string"),
])
def test_malformed_plan_fields_are_one_line_errors(data, message):
    with pytest.raises(PlanError, match=message):
        SurgeryPlan.from_dict(data)


def test_non_utf8_plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe{not utf-8")
    with pytest.raises(PlanError, match="is not UTF-8 text"):
        SurgeryPlan.load(str(path))


def test_nan_in_a_plan_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan(mean=[math.nan] * 16)))
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["bake", "builtin:tiny", str(path), str(out)])
    assert result.exit_code == 1 and "finite" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def _broken():
    loaded = load("builtin:tiny")
    with torch.no_grad():
        loaded.model.visual.transformer.resblocks[0].attn.out_proj.bias[0] = math.nan
    return loaded


def test_export_refuses_a_model_with_non_finite_outputs(tmp_path):
    with pytest.raises(SurgeryError, match="vision tower's embeddings are not finite"):
        export_safetensors(_broken(), str(tmp_path / "m.safetensors"))
    with pytest.raises(SurgeryError, match="not finite"):
        export_onnx(_broken(), str(tmp_path / "m.onnx"))
    assert list(tmp_path.iterdir()) == []


def test_parity_gate_counts_non_finite_outputs_as_failures(tmp_path):
    linear = torch.nn.Linear(4, 3)
    path = str(tmp_path / "lin.onnx")
    x = torch.randn(2, 4)
    torch.onnx.export(linear, (x,), path, dynamo=False)
    assert parity_error(linear, path, [x]) < 1e-5
    poisoned = copy.deepcopy(linear)
    with torch.no_grad():
        poisoned.bias[0] = math.nan  # max(worst, nan) == worst: NaN once slipped through
    assert parity_error(poisoned, path, [x]) == math.inf
