"""The ORT-fused export graph (graph="ort", the fp32 default): contrib ops in the file, ONNX Runtime
equal to PyTorch on new inputs and batch sizes, variants of the block (QuickGELU, LayerScale), neuron
modules, the plain fallback and option checks."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from surgery.edit.bake import bake
from surgery.edit.plan import HeadEdit, NeuronEdit, SurgeryPlan
from surgery.errors import SurgeryError
from surgery.eval.encoders import OnnxEncoder, TorchEncoder
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.export.ort_fused import FusedBlock, UnfusableBlockError, fuse_blocks_
from surgery.io.metadata import META_GRAPH
from surgery.io.onnx import ort_session, read_metadata
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import default_preprocess, tokenizer_info
from surgery.model.tiny import build_tiny_clip

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _loaded(seed: int = 0, **overrides) -> LoadedModel:
    model, cfg = build_tiny_clip(seed=seed, **overrides)
    return LoadedModel(model=model, arch="tiny", config=cfg, source="random", format="builtin", sha256=None,
                       preprocess=default_preprocess(cfg), tokenizer=tokenizer_info(cfg))


def _ops(path) -> collections.Counter:
    return collections.Counter((n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(path)).graph.node)


def _assert_matches_pytorch(loaded, prefix, images, tokens, atol=1e-5):
    enc, ref = OnnxEncoder(str(prefix)), TorchEncoder(loaded)
    for x in (images, images[:1], torch.randn(7, 3, 32, 32)):  # batch sizes other than at export
        want = torch.nn.functional.normalize(ref.encode_images(x), dim=-1)
        torch.testing.assert_close(enc.encode_images(x), want, atol=atol, rtol=0)
    want = torch.nn.functional.normalize(ref.encode_texts(tokens), dim=-1)
    torch.testing.assert_close(enc.encode_texts(tokens), want, atol=atol, rtol=0)


def test_default_fp32_export_is_the_fused_graph(tmp_path, images, tokens):
    loaded = _loaded()
    plan = SurgeryPlan(heads=[HeadEdit("vision", 1, 2, 0.0), HeadEdit("text", 0, 1, 0.5)])
    bake(loaded.model, plan)
    results = export_onnx(loaded, str(tmp_path / "m.onnx"), plan)
    assert {r["graph"] for r in results.values()} == {"ort"}
    vision, text = _ops(tmp_path / "m.visual.onnx"), _ops(tmp_path / "m.text.onnx")
    ms = "com.microsoft"
    # vision, 2 blocks: block 0 full Attention; the last block runs the class token's query only
    assert vision[(ms, "Attention")] == 1 and vision[(ms, "MultiHeadAttention")] == 1
    # per block one SkipLayerNorm inside it and one joining it to the next (or the final) norm
    assert vision[(ms, "SkipLayerNormalization")] == 4 and vision[(ms, "BiasGelu")] == 2
    assert text[(ms, "Attention")] == 2 and text[(ms, "SkipLayerNormalization")] == 4  # causal
    assert vision[("ai.onnx", "Softmax")] == 0 and vision[("ai.onnx", "Transpose")] <= 1  # the patch embedding's
    for path in (tmp_path / "m.visual.onnx", tmp_path / "m.text.onnx"):
        assert read_metadata(str(path))[META_GRAPH] == "ort"
    _assert_matches_pytorch(loaded, tmp_path / "m.onnx", images, tokens)


def test_plain_graph_has_standard_ops_only(tmp_path, images, tokens):
    loaded = _loaded()
    results = export_onnx(loaded, str(tmp_path / "p.onnx"), None, OnnxOptions(graph="plain"))
    assert {r["graph"] for r in results.values()} == {"plain"}
    for path in (tmp_path / "p.visual.onnx", tmp_path / "p.text.onnx"):
        assert {domain for domain, _ in _ops(path)} == {"ai.onnx"}
        assert read_metadata(str(path))[META_GRAPH] == "plain"
    _assert_matches_pytorch(loaded, tmp_path / "p.onnx", images, tokens)


@pytest.mark.parametrize("overrides", [
    {"quick_gelu": True},  # com.microsoft QuickGelu
    {"vision_cfg": {"ls_init_value": 0.3}, "text_cfg": {"ls_init_value": 0.3}},  # LayerScale folded into weights
])
def test_block_variants_match_pytorch(tmp_path, images, tokens, overrides):
    loaded = _loaded(seed=3, **overrides)
    if "vision_cfg" in overrides:  # LayerScale gammas drawn away from their init so folding them matters
        with torch.no_grad():
            for name, p in loaded.model.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(torch.rand_like(p) + 0.5)
    results = export_onnx(loaded, str(tmp_path / "v.onnx"), None, OnnxOptions(graph="ort"))
    assert all(r["max_abs_error"] <= 1e-4 for r in results.values())
    if "quick_gelu" in overrides:
        assert _ops(tmp_path / "v.visual.onnx")[("com.microsoft", "QuickGelu")] == 2
    _assert_matches_pytorch(loaded, tmp_path / "v.onnx", images, tokens)


@pytest.mark.parametrize("cls_only", [False, True])
def test_fused_block_forward_equals_the_block(cls_only):
    model, _ = build_tiny_clip(seed=1)
    block = model.visual.transformer.resblocks[1]
    x = torch.randn(3, 17, 64)  # (B, N, C)
    with torch.no_grad():
        want = block(x)
        got = FusedBlock(block, causal=False, cls_only=cls_only)(x)
    torch.testing.assert_close(got, want[:, :1] if cls_only else want, atol=1e-5, rtol=1e-5)


def test_residual_neurons_ride_the_class_token_path(tmp_path, images):
    """A residual-site SAE module runs on the last block's output: with the class-token-only last
    block it sees (B, 1, C) and must still give PyTorch's embeddings."""
    from surgery.sae import SAEConfig, SparseAutoencoder, save_sae

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=64, expansion=2, kind="relu", site="residual")).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    save_sae(sae, str(tmp_path / "sae"))
    loaded = _loaded()
    plan = SurgeryPlan(neurons=[NeuronEdit("vision", str(tmp_path / "sae"), [0, 3, 5, 17], 0.6, "paper", "residual")])
    plain_emb = TorchEncoder(loaded).encode_images(images)
    bake(loaded.model, plan)
    assert (TorchEncoder(loaded).encode_images(images) - plain_emb).abs().max() > 1e-3  # the module matters
    results = export_onnx(loaded, str(tmp_path / "n.onnx"), plan, OnnxOptions(tower="vision", graph="ort"))
    assert results["vision"]["graph"] == "ort" and results["vision"]["max_abs_error"] <= 1e-4
    session = ort_session(str(tmp_path / "n.onnx"))
    for x in (images, torch.randn(6, 3, 32, 32)):
        want = torch.nn.functional.normalize(TorchEncoder(loaded).encode_images(x), dim=-1)
        got = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_unfusable_tower_falls_back_to_plain_under_auto(tmp_path):
    loaded = _loaded()
    loaded.model.visual.transformer.resblocks[0].mlp.gelu = nn.SiLU()  # no fused op for SiLU here
    with pytest.raises(UnfusableBlockError, match="activation SiLU"):
        fuse_blocks_(loaded.model, "vision")
    assert not isinstance(loaded.model.visual.transformer.resblocks[1], FusedBlock)  # left unchanged
    results = export_onnx(loaded, str(tmp_path / "a.onnx"))
    assert results["vision"]["graph"] == "plain" and results["text"]["graph"] == "ort"
    assert results["vision"]["max_abs_error"] <= 1e-4
    with pytest.raises(SurgeryError, match="cannot build the ORT-fused vision graph: activation SiLU"):
        export_onnx(loaded, str(tmp_path / "b.onnx"), None, OnnxOptions(tower="vision", graph="ort"))
    assert not (tmp_path / "b.onnx").exists()


def test_fused_parity_miss_falls_back_under_auto_and_fails_under_ort(tmp_path, monkeypatch):
    import surgery.export.onnx as export_mod

    real = export_mod.parity_error

    def worse_when_fused(module, path, probes, optimize=True):
        error = real(module, path, probes, optimize)
        return 0.5 if read_metadata(path)[META_GRAPH] == "ort" else error

    monkeypatch.setattr(export_mod, "parity_error", worse_when_fused)
    loaded = _loaded()
    results = export_onnx(loaded, str(tmp_path / "a.onnx"), None, OnnxOptions(tower="vision"))
    assert results["vision"]["graph"] == "plain" and results["vision"]["max_abs_error"] <= 1e-4
    with pytest.raises(export_mod.ExportParityError, match="by 0.5"):
        export_onnx(loaded, str(tmp_path / "b.onnx"), None, OnnxOptions(tower="vision", graph="ort"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


def test_any_failure_of_the_fused_path_falls_back_under_auto(tmp_path, monkeypatch):
    import surgery.export.onnx as export_mod

    def broken(module, tower):  # e.g. a LayerNorm without bias, a tower the fuser does not know
        raise AttributeError("'NoneType' object has no attribute 'detach'")

    monkeypatch.setattr(export_mod, "_fused_copy", broken)
    loaded = _loaded()
    results = export_onnx(loaded, str(tmp_path / "a.onnx"), None, OnnxOptions(tower="vision"))
    assert results["vision"]["graph"] == "plain" and results["vision"]["max_abs_error"] <= 1e-4
    with pytest.raises(SurgeryError, match="cannot build the ORT-fused vision graph: 'NoneType'"):
        export_onnx(loaded, str(tmp_path / "b.onnx"), None, OnnxOptions(tower="vision", graph="ort"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


def test_parity_gate_sees_batch_one_odd_batches_and_real_prompts(tmp_path, monkeypatch):
    import surgery.export.onnx as export_mod

    seen = []
    real = export_mod.parity_error

    def recording(module, path, probes, optimize=True):
        seen.append((read_metadata(path)["clipsurgery.tower"], [tuple(p.shape) for p in probes], probes))
        return real(module, path, probes, optimize)

    monkeypatch.setattr(export_mod, "parity_error", recording)
    loaded = _loaded()
    export_onnx(loaded, str(tmp_path / "a.onnx"))
    shapes = {tower: [s[0] for s in sh] for tower, sh, _ in seen}
    assert sorted(shapes["vision"]) == [1, 2, 3] and sorted(shapes["text"]) == [1, 2, 3]
    text_probes = next(p for tower, _, p in seen if tower == "text")
    prompts = text_probes[-1]  # real prompts: end-of-text before the last position, zero padding after it
    eot = prompts.argmax(dim=-1)
    assert bool((eot < prompts.shape[1] - 1).all()) and int(prompts[0, -1]) == 0


def test_graph_option_checks():
    with pytest.raises(SurgeryError, match="unknown graph 'fast'; choose one of auto, ort, plain"):
        OnnxOptions(graph="fast")
    with pytest.raises(SurgeryError, match="graph 'ort' needs fp32"):
        OnnxOptions(graph="ort", precision="fp16")
    with pytest.raises(SurgeryError, match="graph 'ort' needs fp32"):
        OnnxOptions(graph="ort", opset=23)
    assert OnnxOptions().resolved_graph() == "ort"
    assert OnnxOptions(precision="fp16").resolved_graph() == "plain"
    assert OnnxOptions(opset=23).resolved_graph() == "plain"
