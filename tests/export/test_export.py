"""Export: ONNX equals PyTorch (parity gate), metadata travels, outputs are atomic and safe."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli.main import main
from surgery.edit.bake import bake
from surgery.edit.plan import HeadEdit, SurgeryPlan
from surgery.errors import SurgeryError
from surgery.eval.encoders import OnnxEncoder, TorchEncoder
from surgery.export.onnx import ExportParityError, OnnxOptions, export_onnx
from surgery.export.safetensors import export_safetensors
from surgery.io.onnx import read_metadata

pytest.importorskip("onnxruntime")

PLAN = SurgeryPlan(heads=[HeadEdit("vision", 1, 2, 0.0), HeadEdit("text", 0, 1, 0.5)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    loaded = surgery.load("builtin:tiny")
    bake(loaded.model, PLAN)
    results = export_onnx(loaded, str(root / "m.onnx"), PLAN)
    return loaded, root, results


def test_both_towers_written_with_parity(exported):
    _, root, results = exported
    assert set(results) == {"vision", "text"}
    assert results["vision"]["path"] == str(root / "m.visual.onnx")
    assert results["text"]["path"] == str(root / "m.text.onnx")
    assert all(r["max_abs_error"] <= 1e-4 for r in results.values())
    assert sorted(p.name for p in root.iterdir()) == ["m.text.onnx", "m.visual.onnx"]  # no temp files left


def test_onnx_encoder_equals_pytorch_on_new_inputs(exported, images, tokens):
    loaded, root, _ = exported
    onnx_enc = OnnxEncoder(str(root / "m.onnx"))
    torch_enc = TorchEncoder(loaded)
    big = torch.randn(9, 3, 32, 32)  # another batch size than at export: the batch axis is dynamic
    for x in (images, big):
        want = torch.nn.functional.normalize(torch_enc.encode_images(x), dim=-1)
        torch.testing.assert_close(onnx_enc.encode_images(x), want, atol=1e-5, rtol=0)
    want = torch.nn.functional.normalize(torch_enc.encode_texts(tokens), dim=-1)
    torch.testing.assert_close(onnx_enc.encode_texts(tokens), want, atol=1e-5, rtol=0)


def test_metadata_carries_plan_preprocessing_and_tokenizer(exported):
    loaded, root, _ = exported
    meta = read_metadata(str(root / "m.visual.onnx"))
    assert json.loads(meta["clipsurgery.plan"])["heads"][0] == {
        "tower": "vision", "layer": 1, "head": 2, "scale": 0.0, "ablation": "zero", "mean": None}
    assert json.loads(meta["clipsurgery.preprocess"])["size"] == 32
    assert json.loads(meta["clipsurgery.tokenizer"]) == {"name": "openai-clip-bpe", "context_length": 16}
    assert meta["clipsurgery.tower"] == "vision" and meta["clipsurgery.normalized"] == "true"


def test_fp16_export_within_its_bound(tmp_path, images):
    loaded = surgery.load("builtin:tiny")
    results = export_onnx(loaded, str(tmp_path / "h.onnx"), None, OnnxOptions(tower="vision", precision="fp16"))
    assert results["vision"]["path"] == str(tmp_path / "h.onnx")  # one tower: OUT as given
    assert 0 < results["vision"]["max_abs_error"] <= 2e-2
    import onnx

    model = onnx.load(str(tmp_path / "h.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def test_parity_failure_leaves_nothing(tmp_path, monkeypatch):
    import surgery.export.onnx as export_mod

    monkeypatch.setattr(export_mod, "parity_error", lambda *a, **k: 0.5)
    loaded = surgery.load("builtin:tiny")
    with pytest.raises(ExportParityError, match="differs from PyTorch on the vision tower by 0.5"):
        export_onnx(loaded, str(tmp_path / "x.onnx"))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_input_are_protected(tmp_path):
    loaded = surgery.load("builtin:tiny")
    out = tmp_path / "m.safetensors"
    export_safetensors(loaded, str(out))
    with pytest.raises(SurgeryError, match="already exists; pass --force"):
        export_safetensors(loaded, str(out))
    reloaded = surgery.load(str(out))
    with pytest.raises(SurgeryError, match="is the input file"):
        export_safetensors(reloaded, str(out), force=True)
    export_safetensors(loaded, str(out), force=True)


def test_cli_bake_and_export(tmp_path, images):
    runner = CliRunner()
    plan_path = tmp_path / "plan.json"
    PLAN.save(str(plan_path))
    src = tmp_path / "src.safetensors"
    export_safetensors(surgery.load("builtin:tiny"), str(src))
    result = runner.invoke(main, ["bake", str(src), str(plan_path), str(tmp_path / "baked.safetensors")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", str(tmp_path / "baked.safetensors"), str(tmp_path / "b.onnx"), "--tower", "vision"])
    assert result.exit_code == 0, result.output
    assert "max abs error" in result.output
    meta = read_metadata(str(tmp_path / "b.onnx"))
    assert json.loads(meta["clipsurgery.plan"])["heads"][1]["tower"] == "text"  # the plan travelled
    assert meta["clipsurgery.graph"] == "ort"  # the fp32 default
    result = runner.invoke(main, ["export", str(tmp_path / "baked.safetensors"), str(tmp_path / "p.onnx"), "--tower",
                                  "vision", "--graph", "plain"])
    assert result.exit_code == 0 and "plain graph" in result.output, result.output
    assert read_metadata(str(tmp_path / "p.onnx"))["clipsurgery.graph"] == "plain"
    result = runner.invoke(main, ["export", str(src), str(tmp_path / "h.onnx"), "--graph", "ort", "--precision", "fp16"])
    assert result.exit_code == 1 and "graph 'ort' needs fp32" in result.output
    assert not os.path.exists(tmp_path / "h.visual.onnx")
    result = runner.invoke(main, ["export", str(src), str(src)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    result = runner.invoke(main, ["export", str(src), str(tmp_path / "x.pb")])
    assert result.exit_code == 2 and "must end in .safetensors or .onnx" in result.output
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text(json.dumps({"schema": "clipsurgery.plan/1", "heads": [{"tower": "vision", "layer": 9, "head": 0}]}))
    result = runner.invoke(main, ["bake", str(src), str(bad_plan), str(tmp_path / "y.onnx")])
    assert result.exit_code == 1 and "layer 9 is out of range" in result.output
    assert not os.path.exists(tmp_path / "y.visual.onnx")


def test_written_files_get_normal_permissions(tmp_path):
    import stat

    out = tmp_path / "m.safetensors"
    export_safetensors(surgery.load("builtin:tiny"), str(out))
    mode = stat.S_IMODE(os.stat(out).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_opset23_fused_attention_export(tmp_path, images, tokens):
    """opset 23 goes through the dynamo exporter and emits ONNX Attention nodes; parity holds for the
    full-attention vision tower and the causal text tower."""
    import onnx

    loaded = surgery.load("builtin:tiny")
    attention = [type(b.attn) for b in loaded.model.visual.transformer.resblocks]
    results = export_onnx(loaded, str(tmp_path / "f.onnx"), None, OnnxOptions(opset=23))
    assert all(r["max_abs_error"] <= 1e-4 for r in results.values())
    # the export swapped attention on a copy that shares the weights, never on the caller's model
    assert [type(b.attn) for b in loaded.model.visual.transformer.resblocks] == attention
    for path in (tmp_path / "f.visual.onnx", tmp_path / "f.text.onnx"):
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert "Attention" in ops, (path, sorted(ops))
    enc = OnnxEncoder(str(tmp_path / "f.onnx"))
    want = torch.nn.functional.normalize(TorchEncoder(loaded).encode_texts(tokens), dim=-1)
    torch.testing.assert_close(enc.encode_texts(tokens), want, atol=1e-5, rtol=0)
    assert enc.encode_images(torch.randn(5, 3, 32, 32)).shape == (5, 32)


def test_external_data_path_for_large_models(tmp_path, monkeypatch):
    """Above the 2 GB protobuf limit the weights go to OUT.data beside the file; forced here with a
    tiny threshold. Parity and the move into place must handle the pair."""
    import surgery.export.onnx as export_mod

    monkeypatch.setattr(export_mod, "_TWO_GB", 1024)
    loaded = surgery.load("builtin:tiny")
    results = export_onnx(loaded, str(tmp_path / "big.onnx"), None, OnnxOptions(tower="vision"))
    assert results["vision"]["max_abs_error"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 100_000 < (tmp_path / "big.onnx.data").stat().st_size
    from surgery.io.onnx import ort_session

    session = ort_session(str(tmp_path / "big.onnx"))  # finds the data file by its relative name
    x = torch.randn(2, 3, 32, 32)
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    want = torch.nn.functional.normalize(TorchEncoder(loaded).encode_images(x), dim=-1).numpy()
    assert abs(got - want).max() <= 1e-5


def test_an_exported_balance_edit_equals_the_runtime_map_in_onnx_runtime(tmp_path, images, tokens):
    """A balance edit on each tower, baked and exported: ONNX Runtime's embeddings equal the
    unbaked model with the maps applied to its outputs (surgery.edit.bake.apply_runtime), and the
    graph has no operator the plain export lacks (the map lives in the projection weights)."""
    import copy

    import onnx

    from surgery.edit.bake import apply_runtime
    from surgery.edit.plan import BalanceEdit

    gen = torch.Generator().manual_seed(11)
    plan = SurgeryPlan(balance=[BalanceEdit(t, (0.3 * torch.randn(32, 2, generator=gen)).tolist(),
                                            (torch.randn(32, 2, generator=gen) / 6).tolist()) for t in ("vision", "text")])
    loaded = surgery.load("builtin:tiny")
    reference = apply_runtime(copy.deepcopy(loaded.model), plan)
    bake(loaded.model, plan)
    export_onnx(loaded, str(tmp_path / "b.onnx"), plan)
    plain = surgery.load("builtin:tiny")
    export_onnx(plain, str(tmp_path / "p.onnx"), SurgeryPlan())
    for tower in ("visual", "text"):
        ops = lambda name: sorted(n.op_type for n in onnx.load(str(tmp_path / f"{name}.{tower}.onnx")).graph.node)  # noqa: E731
        assert ops("b") == ops("p")
    encoder = OnnxEncoder(str(tmp_path / "b.onnx"))
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(reference.encode_image(images), dim=-1)
        want_txt = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)
        unedited = torch.nn.functional.normalize(plain.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(encoder.encode_images(images), want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode_texts(tokens), want_txt, atol=1e-5, rtol=0)
    assert (want_txt - unedited).abs().max() > 1e-2  # the maps do something
