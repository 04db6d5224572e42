"""ONNX Runtime provider sessions and node placement (surgery.io.onnx): the reporter on the CPU
provider, one-line errors when CUDA is asked for without onnxruntime-gpu, and on a GPU the fused and
fp16 exports on the CUDA provider (placement listed, fp16 parity)."""
from __future__ import annotations

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.export.onnx import PARITY_BOUND, OnnxOptions, export_onnx
from surgery.io.onnx import NodePlacement, node_placement, provider_session
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import default_preprocess, tokenizer_info
from surgery.model.tiny import build_tiny_clip

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ORT_CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def _export(tmp_path, precision="fp32", graph="auto"):
    model, cfg = build_tiny_clip(seed=0)
    loaded = LoadedModel(model=model, arch="tiny", config=cfg, source="random", format="builtin", sha256=None,
                         preprocess=default_preprocess(cfg), tokenizer=tokenizer_info(cfg))
    export_onnx(loaded, str(tmp_path / "m.onnx"), None, OnnxOptions(tower="vision", precision=precision, graph=graph))
    return loaded, str(tmp_path / "m.onnx")


def test_placement_on_the_cpu_provider_lists_every_node(tmp_path):
    _, path = _export(tmp_path)  # the fused fp32 graph: com.microsoft contrib ops
    placement = node_placement(path, "cpu")
    assert placement.provider == "CPUExecutionProvider"
    assert placement.nodes and {where for _op, where in placement.nodes.values()} == {"CPUExecutionProvider"}
    assert placement.elsewhere() == []
    ran = [op for op, _where in placement.nodes.values()]
    assert ran.count("Attention") == 1 and ran.count("MultiHeadAttention") == 1  # the file's two fused blocks
    assert placement.summary() == f"CPUExecutionProvider {len(ran)} nodes"


def test_summary_lists_the_ops_that_fell_back():
    placement = NodePlacement("CUDAExecutionProvider", {
        "a": ("Attention", "CUDAExecutionProvider"), "s": ("Shape", "CPUExecutionProvider"),
        "g": ("Gather", "CPUExecutionProvider"), "s2": ("Shape", "CPUExecutionProvider")})
    assert placement.elsewhere() == [("s", "Shape", "CPUExecutionProvider"), ("g", "Gather", "CPUExecutionProvider"),
                                     ("s2", "Shape", "CPUExecutionProvider")]
    assert placement.summary() == ("CPUExecutionProvider 3 nodes, CUDAExecutionProvider 1 nodes; "
                                   "not on CUDAExecutionProvider: Gather x1, Shape x2")


@pytest.mark.skipif(ORT_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_without_onnxruntime_gpu_is_a_one_line_error(tmp_path):
    _, path = _export(tmp_path)
    with pytest.raises(SurgeryError) as info:
        provider_session(path, "cuda")
    message = str(info.value)
    assert "\n" not in message and "CUDAExecutionProvider" in message and "clipsurgery[gpu]" in message


def test_a_provider_that_does_not_start_is_refused(tmp_path, monkeypatch):
    # onnxruntime lists CUDA but the session comes up on the CPU alone (e.g. cuDNN missing): no silent fall-back
    _, path = _export(tmp_path)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _CpuOnlySession)
    with pytest.raises(SurgeryError, match="could not start CUDAExecutionProvider"):
        provider_session(path, "cuda")
    with pytest.raises(SurgeryError, match="unknown provider 'tpu'"):
        provider_session(path, "tpu")


class _CpuOnlySession:
    def __init__(self, *args, **kwargs):
        pass

    def get_providers(self):
        return ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not ORT_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
@pytest.mark.parametrize("precision, graph", [("fp32", "ort"), ("fp16", "plain")])
def test_exports_run_on_the_cuda_provider(tmp_path, precision, graph):
    loaded, path = _export(tmp_path, precision, graph)
    placement = node_placement(path, "cuda", optimize=precision == "fp32")
    compute = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "MatMul", "Gemm", "Conv",
               "Softmax", "LayerNormalization", "Add", "Mul"}
    off = [(name, op) for name, op, _where in placement.elsewhere() if op in compute]
    assert off == [], f"compute nodes not on CUDA: {off} ({placement.summary()})"
    # parity on CUDA against PyTorch fp32
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = provider_session(path, "cuda", optimize=precision == "fp32")
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]).float()
    with torch.no_grad():
        want = torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1)
    assert (got - want).abs().max().item() <= PARITY_BOUND[precision]
