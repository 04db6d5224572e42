"""triton_kernels.masked_attention against a plain float64 reference: forward and every gradient.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set before triton_kernels is imported). Interpreter block sizes: forward 32 query x 16 key rows,
dk/dv 16 x 32, dq 32 x 16 (triton_kernels/_attention_configs.py), so the shapes below cross block
boundaries in every kernel. bf16 runs only on a GPU (the interpreter computes it wrong).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from triton_kernels import (  # noqa: E402  (TRITON_INTERPRET must be set first)
    TritonAttentionUnsupported,
    check_supported,
    masked_attention,
    triton_available,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton cannot run here")

# (dtype, atol, rtol): bf16 only on a GPU
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16", marks=[pytest.mark.gpu, gpu_only]),
]

# (B, H, N, d, causal, mask) — mask: "rows" (B, H) all rows distinct, "heads" (H,), "zeros" / "ones"
# (B, H), "mixed" (B, H) rows of 0, 1, fractional and negative scales
SHAPES = [
    # N=77 (CLIP text length) not a block multiple: unmasked full key blocks + masked tail block
    pytest.param(2, 2, 77, 64, False, "rows", id="N77-noncausal-rowmask"),
    # causal text path: unmasked blocks below the diagonal, masked blocks straddling it, tail
    pytest.param(2, 2, 77, 64, True, "rows", id="N77-causal-rowmask"),
    # N smaller than one block: every load/store is boundary-masked; (H,) mask summed over batch
    pytest.param(2, 2, 10, 32, False, "heads", id="N10-smaller-than-block-headmask"),
    # N smaller than one block, causal: only diagonal blocks
    pytest.param(2, 1, 10, 32, True, "heads", id="N10-causal-headmask"),
    # d=80 is not a power of two: the d block is padded to 128 and masked
    pytest.param(2, 2, 20, 80, False, "rows", id="d80-padded"),
    # d=128, causal, N=33 one row past a block multiple
    pytest.param(1, 2, 33, 128, True, "heads", id="d128-causal-N33"),
    # N=50 (ViT-B/32 length); all-zero mask: O = 0, d(head_scale) must still be exact (recomputed U)
    pytest.param(2, 2, 50, 64, False, "zeros", id="N50-allzero-mask"),
    # all-ones mask = plain attention; N=48 a block multiple: no tail block in any kernel
    pytest.param(2, 2, 48, 32, False, "ones", id="N48-allones-blockmultiple"),
    # several mask configurations in one launch: 0, 1, fractional, negative per (b, h)
    pytest.param(2, 3, 50, 32, True, "mixed", id="N50-causal-mixed-configs"),
]


def make_mask(kind: str, B: int, H: int, gen: torch.Generator) -> torch.Tensor:
    """Head mask: (H,) for "heads", else (B, H)."""
    if kind == "heads":
        return torch.rand(H, generator=gen) + 0.25  # (H,)
    if kind == "zeros":
        return torch.zeros(B, H)  # (B, H)
    if kind == "ones":
        return torch.ones(B, H)  # (B, H)
    if kind == "mixed":
        pattern = torch.tensor([0.0, 1.0, 0.3, -0.7, 1.0, 0.0])
        return pattern[torch.arange(B * H) % len(pattern)].reshape(B, H)  # (B, H)
    mask = torch.rand(B, H, generator=gen) + 0.25  # (B, H)
    assert len({tuple(r.tolist()) for r in mask}) == B  # rows differ: distinct configurations
    return mask


def make_qkv(B: int, H: int, N: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Packed (B, N, 3, H, d) qkv, as a projection produces it."""
    return torch.randn(B, N, 3, H, d, generator=gen).to(dtype)


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3, H, d) -> three (B, H, N, d) strided views."""
    q, k, v = qkv.unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def reference(q, k, v, head_scale, causal: bool, sm_scale: float, return_u: bool = False):
    """Plain math in float64. q, k, v: (B, H, N, d); head_scale: (H,) or (B, H) -> (B, H, N, d)."""
    q, k, v, head_scale = q.double(), k.double(), v.double(), head_scale.double()
    scores = q @ k.transpose(-1, -2) * sm_scale  # (B, H, N, N)
    if causal:
        N = q.shape[2]
        future = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    u = scores.softmax(-1) @ v  # (B, H, N, d)
    scale = head_scale[None, :, None, None] if head_scale.dim() == 1 else head_scale[:, :, None, None]
    o = scale * u
    return (o, u) if return_u else o


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, H, N, d, causal, mask_kind", SHAPES)
def test_forward_and_gradients_match_reference(B, H, N, d, causal, mask_kind, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(1000 * N + d)
    qkv = make_qkv(B, H, N, d, dtype, gen).to(DEVICE).requires_grad_()  # (B, N, 3, H, d)
    head_scale = make_mask(mask_kind, B, H, gen).to(DEVICE).requires_grad_()  # (H,) or (B, H)
    grad_out = torch.randn(B, H, N, d, generator=gen).to(dtype).to(DEVICE)  # (B, H, N, d)

    o = masked_attention(*split_heads(qkv), head_scale, causal=causal)  # (B, H, N, d)
    o.backward(grad_out)

    qkv_ref = qkv.detach().double().requires_grad_()
    scale_ref = head_scale.detach().double().requires_grad_()
    o_ref = reference(*split_heads(qkv_ref), scale_ref, causal, d**-0.5)
    o_ref.backward(grad_out.double())

    assert o.dtype == dtype and o.shape == (B, H, N, d)
    assert_close("o", o, o_ref, atol, rtol)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(name, qkv.grad[:, :, i], qkv_ref.grad[:, :, i], atol, rtol)
    # d(head_scale) sums N * d products: its tolerance scales with that count
    assert head_scale.grad.shape == head_scale.shape
    assert_close("d(head_scale)", head_scale.grad, scale_ref.grad, atol * N, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_return_cls_gives_unscaled_token0_output(causal, dtype, atol, rtol):
    # row 0 of U written in-kernel by the first query block; (B, H) mask with a zero head, so
    # u_cls must not be recovered from O
    B, H, N, d = 2, 2, 50, 64
    gen = torch.Generator().manual_seed(7)
    q, k, v = split_heads(make_qkv(B, H, N, d, dtype, gen).to(DEVICE))
    head_scale = torch.tensor([[0.0, 0.5], [2.0, 1.0]], device=DEVICE)  # (B, H)
    o, u_cls = masked_attention(q, k, v, head_scale, causal=causal, return_cls=True)
    o_ref, u_ref = reference(q, k, v, head_scale, causal, d**-0.5, return_u=True)
    assert u_cls.shape == (B, H, d)
    assert_close("o", o, o_ref, atol, rtol)
    assert_close("u_cls", u_cls, u_ref[:, :, 0], atol, rtol)


def test_return_cls_with_grad_matches_plain_call():
    # the autograd path (saves LSE) with return_cls: o, u_cls and gradients as without return_cls
    B, H, N, d = 2, 2, 20, 32
    gen = torch.Generator().manual_seed(3)
    qkv = make_qkv(B, H, N, d, torch.float32, gen).to(DEVICE).requires_grad_()
    head_scale = make_mask("rows", B, H, gen).to(DEVICE).requires_grad_()
    o, u_cls = masked_attention(*split_heads(qkv), head_scale, return_cls=True)
    assert not u_cls.requires_grad
    o.sum().backward()
    o_ref, u_ref = reference(*split_heads(qkv.detach()), head_scale.detach(), False, d**-0.5, return_u=True)
    assert_close("u_cls", u_cls, u_ref[:, :, 0], 1e-5, 1e-5)
    assert_close("o", o, o_ref, 1e-5, 1e-5)
    assert qkv.grad is not None and head_scale.grad is not None


def test_grad_only_for_head_scale():
    # learned soft mask over frozen weights: only the dq kernel runs (no dq store, no dk/dv kernel)
    B, H, N, d = 2, 2, 40, 32
    gen = torch.Generator().manual_seed(5)
    q, k, v = split_heads(make_qkv(B, H, N, d, torch.float32, gen).to(DEVICE))
    head_scale = torch.tensor([0.0, 0.6], device=DEVICE, requires_grad=True)  # (H,), a zero head
    grad_out = torch.randn(B, H, N, d, generator=gen).to(DEVICE)
    masked_attention(q, k, v, head_scale, causal=True).backward(grad_out)
    scale_ref = head_scale.detach().double().requires_grad_()
    reference(q, k, v, scale_ref, True, d**-0.5).backward(grad_out.double())
    assert_close("d(head_scale)", head_scale.grad, scale_ref.grad, 1e-5 * N, 1e-5)


def test_grad_only_for_keys_and_values():
    # frozen queries and mask: the dq kernel only computes Delta (no dq, no d(head_scale) loop)
    B, H, N, d = 2, 2, 40, 32
    gen = torch.Generator().manual_seed(6)
    qkv = make_qkv(B, H, N, d, torch.float32, gen).to(DEVICE)
    q, _, _ = split_heads(qkv)
    kv = qkv[:, :, 1:].clone().requires_grad_()  # (B, N, 2, H, d)
    k, v = (t.transpose(1, 2) for t in kv.unbind(2))
    head_scale = make_mask("mixed", B, H, gen).to(DEVICE)  # (B, H)
    grad_out = torch.randn(B, H, N, d, generator=gen).to(DEVICE)
    masked_attention(q, k, v, head_scale, causal=True).backward(grad_out)
    kv_ref = kv.detach().double().requires_grad_()
    k_ref, v_ref = (t.transpose(1, 2) for t in kv_ref.unbind(2))
    reference(q, k_ref, v_ref, head_scale, True, d**-0.5).backward(grad_out.double())
    assert_close("dk", kv.grad[:, :, 0], kv_ref.grad[:, :, 0], 1e-5, 1e-5)
    assert_close("dv", kv.grad[:, :, 1], kv_ref.grad[:, :, 1], 1e-5, 1e-5)


def test_custom_sm_scale_and_no_grad_path():
    # inference path (no LSE stored) with a non-default softmax scale
    B, H, N, d = 1, 2, 30, 32
    gen = torch.Generator().manual_seed(11)
    q, k, v = split_heads(make_qkv(B, H, N, d, torch.float32, gen).to(DEVICE))
    head_scale = make_mask("rows", B, H, gen).to(DEVICE)
    with torch.no_grad():
        o = masked_attention(q, k, v, head_scale, sm_scale=0.3)
    assert_close("o", o, reference(q, k, v, head_scale, False, 0.3), 1e-5, 1e-5)


def test_output_is_view_of_token_major_buffer():
    # o.transpose(1, 2).reshape(B, N, H * d) must be free (no copy)
    B, H, N, d = 2, 3, 17, 32
    gen = torch.Generator().manual_seed(2)
    q, k, v = split_heads(make_qkv(B, H, N, d, torch.float32, gen).to(DEVICE))
    o = masked_attention(q, k, v, torch.ones(H, device=DEVICE))  # (B, H, N, d)
    assert o.transpose(1, 2).is_contiguous()
    merged = o.transpose(1, 2).reshape(B, N, H * d)
    assert merged.data_ptr() == o.data_ptr()


def _bad_inputs():
    """(id, q, k, v, head_scale, words the message must contain)."""
    B, H, N, d = 2, 2, 8, 32
    ok = torch.randn(B, H, N, d, device=DEVICE)
    mask = torch.ones(H, device=DEVICE)
    odd = torch.randn(B, H, N, 48, device=DEVICE)
    f64 = ok.double()
    cases = [
        ("head-dim-48", odd, odd, odd, mask, ["48", "32, 64, 80, 128"]),
        ("float64", f64, f64, f64, mask, ["float64", "float32, float16, bfloat16"]),
        ("mixed-dtypes", ok, ok.half(), ok, mask, ["float16", "share"]),
        ("mask-(H+1,)", ok, ok, ok, torch.ones(H + 1, device=DEVICE), ["(3,)", "(H,)", "(B, H)"]),
        ("mask-(B,H,1)", ok, ok, ok, torch.ones(B, H, 1, device=DEVICE), ["(2, 2, 1)", "(B, H)"]),
        ("mask-integer", ok, ok, ok, torch.ones(H, dtype=torch.int64, device=DEVICE), ["floating"]),
        ("3d-input", ok[0], ok[0], ok[0], mask, ["4-d"]),
        ("shape-mismatch", ok, ok[:, :, :4], ok, mask, ["one shape"]),
        ("last-dim-strided", torch.randn(B, H, d, N, device=DEVICE).transpose(-1, -2), ok, ok, mask, ["contiguous last dim"]),
        ("two-devices", ok, ok, ok, torch.ones(H, device="meta"), ["one device", "meta"]),
    ]
    if os.environ.get("TRITON_INTERPRET") == "1":
        bf = ok.bfloat16()
        cases.append(("bf16-interpreter", bf, bf, bf, mask, ["bfloat16", "TRITON_INTERPRET"]))
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.parametrize("q, k, v, head_scale, words", _bad_inputs())
def test_bad_inputs_raise_with_supported_values(q, k, v, head_scale, words):
    with pytest.raises(TritonAttentionUnsupported) as info:
        check_supported(q, k, v, head_scale)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    with pytest.raises(TritonAttentionUnsupported):  # the entry point validates too
        masked_attention(q, k, v, head_scale)
    assert isinstance(info.value, ValueError)


@pytest.mark.gpu
@pytest.mark.slow
@gpu_only
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("N", [197, 257])
def test_vit_lengths_on_gpu(N, causal):
    # real block sizes at ViT lengths (several query / key blocks on the GPU), bf16, (B, H) mask
    B, H, d, dtype = 4, 12, 64, torch.bfloat16
    gen = torch.Generator().manual_seed(N)
    qkv = make_qkv(B, H, N, d, dtype, gen).to(DEVICE).requires_grad_()
    head_scale = make_mask("rows", B, H, gen).to(DEVICE).requires_grad_()
    grad_out = torch.randn(B, H, N, d, generator=gen).to(dtype).to(DEVICE)
    o = masked_attention(*split_heads(qkv), head_scale, causal=causal)
    o.backward(grad_out)
    qkv_ref = qkv.detach().double().requires_grad_()
    scale_ref = head_scale.detach().double().requires_grad_()
    o_ref = reference(*split_heads(qkv_ref), scale_ref, causal, d**-0.5)
    o_ref.backward(grad_out.double())
    assert_close("o", o, o_ref, 2e-2, 2e-2)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(name, qkv.grad[:, :, i], qkv_ref.grad[:, :, i], 2e-2, 2e-2)
    assert_close("d(head_scale)", head_scale.grad, scale_ref.grad, 2e-2 * N, 2e-2)
