"""The cached direct launch (triton_kernels/_launch.py) against the autotuned path and the reference.

Under TRITON_INTERPRET=1 there is one config per kernel, so the autotuner picks nothing, but the
direct path (``kernel.fn.run`` with the cached config, no autotuner) still runs, and must give the
autotuned path's results bit for bit, forward and every gradient; both are also checked against
the float64 reference of test_triton_attention.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from test_triton_attention import DEVICE, assert_close, make_mask, make_qkv, reference, split_heads  # noqa: E402

import triton_kernels  # noqa: E402
from triton_kernels import (  # noqa: E402
    clear_launch_cache,
    direct_launch,
    launch_cache,
    launch_stats,
    masked_attention,
    triton_available,
)
from triton_kernels._attention_bwd import _masked_attn_bwd_dkdv_kernel, _masked_attn_bwd_dq_kernel  # noqa: E402
from triton_kernels._attention_fwd import _masked_attn_fwd_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton cannot run here")
KERNELS = (_masked_attn_fwd_kernel, _masked_attn_bwd_dq_kernel, _masked_attn_bwd_dkdv_kernel)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_launch_cache()
    yield
    clear_launch_cache()


def _run(B, H, N, d, causal, seed=0):
    """Forward + backward of one masked attention call: (o, dqkv, d(head_scale)), float32."""
    gen = torch.Generator().manual_seed(seed)
    qkv = make_qkv(B, H, N, d, torch.float32, gen).to(DEVICE).requires_grad_()  # (B, N, 3, H, d)
    head_scale = make_mask("rows", B, H, gen).to(DEVICE).requires_grad_()  # (B, H)
    grad_out = torch.randn(B, H, N, d, generator=gen).to(DEVICE)  # (B, H, N, d)
    o = masked_attention(*split_heads(qkv), head_scale, causal=causal)
    o.backward(grad_out)
    return o.detach(), qkv.grad, head_scale.grad, (qkv, head_scale, grad_out)


@pytest.fixture
def autotuner_calls(monkeypatch):
    """Counts calls that reach each kernel's autotuner (its ``run``)."""
    calls = {k.base_fn.__name__: 0 for k in KERNELS}
    for kernel in KERNELS:
        original = kernel.run

        def spy(*args, _original=original, _name=kernel.base_fn.__name__, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    return calls


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_direct_launch_equals_autotuned_path_bit_for_bit(causal, autotuner_calls):
    # N=50 crosses block boundaries in every kernel (interpreter blocks 32/16)
    B, H, N, d = 2, 2, 50, 32
    with direct_launch(False):  # the path before the cache: every launch through the autotuner
        want = _run(B, H, N, d, causal)
    assert launch_stats().direct == 0
    tuned_calls = dict(autotuner_calls)
    assert all(n >= 1 for n in tuned_calls.values())  # fwd, dq and dkdv each went through the autotuner
    got = _run(B, H, N, d, causal)  # cache filled above: direct launches only
    assert autotuner_calls == tuned_calls  # no call reached an autotuner
    assert launch_stats().direct == 3  # forward, dq, dkdv
    for name, a, b in zip(("o", "dqkv", "d(head_scale)"), got[:3], want[:3]):
        assert torch.equal(a, b), f"{name}: direct launch differs from the autotuned path"
    # and both equal the plain reference
    qkv, head_scale, grad_out = want[3]
    qkv_ref = qkv.detach().double().requires_grad_()
    scale_ref = head_scale.detach().double().requires_grad_()
    o_ref = reference(*split_heads(qkv_ref), scale_ref, causal, d**-0.5)
    o_ref.backward(grad_out.double())
    assert_close("o", got[0], o_ref, 1e-5, 1e-5)
    assert_close("dqkv", got[1], qkv_ref.grad, 1e-5, 1e-5)
    assert_close("d(head_scale)", got[2], scale_ref.grad, 1e-5 * N, 1e-5)


def test_inference_path_uses_the_cache_too():
    # no-grad forward (STORE_LSE off) shares the forward kernel's key with the autograd path
    B, H, N, d = 1, 2, 20, 32
    gen = torch.Generator().manual_seed(4)
    q, k, v = split_heads(make_qkv(B, H, N, d, torch.float32, gen).to(DEVICE))
    mask = torch.tensor([0.5, 0.0], device=DEVICE)  # (H,)
    with torch.no_grad():
        first = masked_attention(q, k, v, mask)
        second = masked_attention(q, k, v, mask)
    assert launch_stats().autotuned == 1 and launch_stats().direct == 1
    assert torch.equal(first, second)
    assert_close("o", second, reference(q, k, v, mask, False, d**-0.5), 1e-5, 1e-5)


def test_cache_keys_separate_shapes_causality_and_dtypes():
    gen = torch.Generator().manual_seed(5)

    def call(N, d, causal, dtype=torch.float32, mask_dtype=torch.float32):
        q, k, v = split_heads(make_qkv(1, 2, N, d, dtype, gen).to(DEVICE))
        with torch.no_grad():
            masked_attention(q, k, v, torch.ones(2, device=DEVICE, dtype=mask_dtype), causal=causal)

    call(20, 32, False)
    call(20, 32, False)  # same key: no new entry
    assert len(launch_cache()) == 1
    call(21, 32, False)  # another N
    call(20, 64, False)  # another head dim
    call(20, 32, True)  # causal
    call(20, 32, False, dtype=torch.float16)  # q/k/v dtype
    call(20, 32, False, mask_dtype=torch.float16)  # the head mask's dtype is part of the autotune key too
    keys = list(launch_cache())
    assert len(keys) == 6
    assert {k[1:4] for k in keys} == {(20, 32, False), (21, 32, False), (20, 64, False), (20, 32, True)}
    assert {k[4] for k in keys} == {("torch.float32", "torch.float32"), ("torch.float16", "torch.float32"),
                                     ("torch.float32", "torch.float16")}
    assert {k[5] for k in keys} == {str(torch.device(DEVICE))}
    for meta in launch_cache().values():  # what the direct launch passes
        assert {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} <= set(meta)
    assert launch_stats().autotuned == 6 and launch_stats().direct == 1


def test_clear_launch_cache_sends_the_next_call_through_the_autotuner(autotuner_calls):
    _run(1, 1, 10, 32, False)
    assert launch_cache()
    clear_launch_cache()
    assert launch_cache() == {} and launch_stats() == triton_kernels.LaunchStats()
    before = dict(autotuner_calls)
    _run(1, 1, 10, 32, False)
    assert all(autotuner_calls[name] == before[name] + 1 for name in before)
