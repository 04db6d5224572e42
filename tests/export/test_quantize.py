"""int8 export and its fairness gate: a world model's int8 pair passes with its figures in the
metadata; a broken quantization is refused and leaves no file; no gate data is one line."""
from __future__ import annotations

import collections
import glob
import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import surgery
from surgery.cli.main import main
from surgery.errors import QuantizationGateError, SurgeryError
from surgery.export import quantize as quantize_module
from surgery.export.gate import GateData, GateOptions, check_gate
from surgery.export.onnx import export_onnx
from surgery.export.quantize import QuantizeOptions, export_quantized
from surgery.io.onnx import read_metadata
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import generate, write_split


def _ops(path: str) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def _leftovers(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.startswith(".") or "int8" in p or p.endswith(".tmp")]


@pytest.fixture(scope="module")
def world():
    return surgery.load("builtin:world")


def test_world_model_int8_passes_the_gate_with_its_figures_in_the_metadata(world, tmp_path):
    out = tmp_path / "w.onnx"
    result = CliRunner().invoke(main, ["export", "builtin:world", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "fairness gate passed" in result.output and "MaxSkew@50" in result.output
    for tower in ("visual", "text"):
        path = str(tmp_path / f"w.{tower}.onnx")
        meta = read_metadata(path)
        assert meta["clipsurgery.precision"] == "int8"
        assert json.loads(meta["clipsurgery.quantization"])["per_channel"] is True
        figures = json.loads(meta["clipsurgery.gate"])
        assert figures["passed"] is True and figures["n_images"] == 1200
        assert check_gate(figures, GateOptions()) == []  # the recorded figures are the ones that passed
        assert min(figures["mean_cosine"].values()) >= 0.99
        assert figures["zero_shot_accuracy"]["fp32"] > 0.9  # the gate measured a real classifier
        ops = _ops(path)
        assert ops["MatMulInteger"] + ops["QAttention"] > 0 and ops["MatMul"] == 0  # every MatMul weight is int8
    # the served embeddings (ONNX Runtime on the int8 pair) are what the gate measured
    from surgery.eval.encoders import OnnxEncoder

    enc = OnnxEncoder(str(out))
    emb = enc.encode_texts(surgery.model.preprocess.tokenize(["a photo of a circle"], enc.tokenizer))
    assert emb.shape == (1, world.config["embed_dim"]) and np.isfinite(emb.numpy()).all()


def test_a_broken_quantization_is_refused_with_figures_and_leaves_no_file(world, tmp_path, monkeypatch):
    real = quantize_module.quantize_file

    def broken(src, dst, options, feeds=None):  # a quantizer bug: the int8 weights come out scrambled
        real(src, dst, options, feeds)
        model = onnx.load(dst)
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8:
                arr = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array(rng.permutation(arr.ravel()).reshape(arr.shape), init.name))
        onnx.save(model, dst)

    monkeypatch.setattr(quantize_module, "quantize_file", broken)
    with pytest.raises(QuantizationGateError, match="failed the fairness gate") as err:
        export_quantized(world, str(tmp_path / "w.onnx"), None, GateData.for_model(world))
    assert "mean cosine" in str(err.value) and "MaxSkew@50" in str(err.value) and "nothing was written" in str(err.value)
    assert _leftovers(tmp_path) == [] and not glob.glob(str(tmp_path / "*.onnx"))


def test_static_calibration_quantizes_activations_too(world, tmp_path):
    result = export_quantized(world, str(tmp_path / "s.onnx"), None, GateData.for_model(world),
                              options=QuantizeOptions(calibration="static"),
                              calibration=quantize_module.calibration_feeds(GateData.for_model(world), world.preprocess,
                                                                           world.tokenizer, n=64))
    assert result.figures["passed"] is True
    assert _ops(result.paths["vision"])["QuantizeLinear"] > 0


def test_no_gate_data_is_one_line_and_nothing_is_exported(tmp_path):
    result = CliRunner().invoke(main, ["export", "builtin:tiny", str(tmp_path / "t.onnx"), "--quantize", "int8"])
    assert result.exit_code == 1 and "--gate-images DIR --gate-labels CSV" in result.output
    assert len(result.output.strip().splitlines()) == 1 and os.listdir(tmp_path) == []
    usage = CliRunner().invoke(main, ["export", "builtin:world", str(tmp_path / "t.onnx"), "--quantize", "int8",
                                      "--precision", "fp16"])
    assert usage.exit_code == 2 and "GPU option" in usage.output


def test_an_exported_fp32_pair_is_quantized_against_given_gate_images(world, tmp_path):
    fp32 = str(tmp_path / "fp32.onnx")
    export_onnx(world, fp32)
    split = write_split(generate(world_params_of(world), "eval", 240), tmp_path / "gate")
    args = ["export", fp32, str(tmp_path / "q.onnx"), "--quantize", "int8", "--gate-images", str(split),
            "--gate-labels", str(split / "labels.csv"), "--gate-k", "20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "on 240 images" in result.output and "MaxSkew@20" in result.output
    # an impossible bar: refused, one line with the figures, the earlier output untouched
    before = os.path.getmtime(tmp_path / "q.visual.onnx")
    strict = CliRunner().invoke(main, [*args, "--force", "--gate-min-cosine", "1.0"])
    assert strict.exit_code == 1 and "failed the fairness gate" in strict.output and "mean cosine" in strict.output
    assert len(strict.output.strip().splitlines()) == 1
    assert os.path.getmtime(tmp_path / "q.visual.onnx") == before


def test_gate_options_are_checked():
    with pytest.raises(SurgeryError, match="outside"):
        GateOptions(min_cosine=2.0)
    with pytest.raises(SurgeryError, match="go together"):
        GateData(images_dir="x")


def test_the_server_serves_an_int8_pair_and_shows_its_gate(world, tmp_path):
    import time

    from starlette.testclient import TestClient

    from surgery.eval.encoders import OnnxEncoder
    from surgery.model.preprocess import tokenize
    from surgery.serve.server import build_app

    out = str(tmp_path / "w.onnx")
    export_quantized(world, out, None, GateData.for_model(world))
    with TestClient(build_app(out)) as client:
        for _ in range(600):  # warm-up runs in the background: wait for readiness (no timing asserted)
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        model = client.get("/v1/model").json()
        got = client.post("/v1/embeddings", json={"input": ["a photo of a circle", "a red square"]}).json()
    assert model["towers"]["vision"]["precision"] == "int8" and model["towers"]["text"]["gate"]["passed"] is True
    enc = OnnxEncoder(out)
    want = enc.encode_texts(tokenize(["a photo of a circle", "a red square"], enc.tokenizer)).numpy()
    np.testing.assert_allclose(np.array([d["embedding"] for d in got["data"]]), want, atol=1e-5, rtol=0)
