"""The ablation sweep (c) on the paths the GPU uses: the triton backend (interpreter on the CPU),
the CUDA-graph wrapper (eager on the CPU), and, on a GPU, graph replay vs eager and bf16 autocast.
The reference is the sweep on the `math` backend, which test_ablation.py checks against naive passes."""
from __future__ import annotations

import pytest
import torch
from helpers import random_probe, unit_texts

from surgery.audit.ablation import SweepOptions, ablation_sweep, head_means
from surgery.model.tiny import build_tiny_clip

CUDA = torch.cuda.is_available()


@pytest.fixture
def probe():
    return random_probe(40)  # batches of 16, 16, 8: full batches take the graph path, the last one runs eagerly
    # (on a GPU the second full batch replays the graph the first one captured)


def _texts(dim, count, seed):
    return unit_texts(dim, count, seed)


def _sweep(model, probe, backend, device="cpu", **options):
    model = model.to(device)
    means = head_means(model, probe, batch_size=16)
    return ablation_sweep(model, probe, _texts(32, 3, 1), _texts(32, 4, 2), means,
                          SweepOptions(batch_size=16, k=10, ablation="mean", backend=backend, **options))


def test_triton_sweep_with_graph_wrapper_equals_math_on_cpu():
    pytest.importorskip("triton")
    probe = random_probe(24)  # batches of 16 and 8: one through the graph wrapper (eager on the CPU), one eager
    model, _ = build_tiny_clip(seed=0)
    want = _sweep(model, probe, "math", cuda_graphs=False)
    got = _sweep(model, probe, "triton", cuda_graphs=True)  # (H*b, H) masks + mean fill through the kernel
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.base_scores, want.base_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.max_skew, want.max_skew, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_graph_sweep_equals_eager_sweep_on_gpu(probe, backend, monkeypatch):
    # the CPU reference is full fp32: so is the GPU run (cuDNN convolutions default to TF32, which moved
    # the patch embedding and every score by up to 1e-4 on an H200)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, _ = build_tiny_clip(seed=0)
    want = _sweep(model, probe, "math", device="cpu")
    eager = _sweep(model, probe, backend, device="cuda", cuda_graphs=False)
    graphed = _sweep(model, probe, backend, device="cuda", cuda_graphs=True)
    torch.testing.assert_close(graphed.scores, eager.scores)
    torch.testing.assert_close(graphed.scores, want.scores, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_bf16_sweep_stays_near_fp32_on_gpu(probe):
    # bf16 is allowed in the sweep because it only ranks heads; its scores stay within the kernel
    # tests' bf16 row (2e-2, 2e-2) of the fp32 sweep's
    model, _ = build_tiny_clip(seed=0)
    fp32 = _sweep(model, probe, "triton", device="cuda")
    bf16 = _sweep(model, probe, "triton", device="cuda", autocast=torch.bfloat16)
    torch.testing.assert_close(bf16.scores, fp32.scores, atol=2e-2, rtol=2e-2)
