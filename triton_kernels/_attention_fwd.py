"""Forward kernel: flash attention (online softmax, no N x N matrix in memory) times a per-head scale.

    U = softmax(q k^T * sm_scale [+ causal -inf mask]) v      # (B, H, N, d), never written unless asked
    O = head_scale[b, h] * U                                   # (B, H, N, d), stored (B, N, H, d)-contiguous

Scores are kept in log2 units (q k^T * sm_scale * log2(e)) so the softmax uses exp2; the saved
log-sum-exp is in the same units. Head-mask shape: (H,) (batch stride 0) or (B, H).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from triton_kernels._attention_configs import AUTOTUNE_KEY, FWD_CONFIGS
from triton_kernels._launch import launch, launch_key

LOG2E = math.log2(math.e)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (``ieee``); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _masked_attn_fwd_tile(
    acc, l_i, m_i,  # (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,) fp32, (BLOCK_M,) fp32: running state
    q,  # (BLOCK_M, BLOCK_D) query tile, input dtype
    k_base, v_base, stride_kn, stride_vn,  # this (b, h)'s key / value rows
    offs_m, offs_d, start_n, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # this key block crosses N or the causal diagonal
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over key rows [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASKED:
        keep = offs_n[None, :] < N
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
    p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
    alpha = tl.exp2(m_i - m_new)  # (BLOCK_M,)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=FWD_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _masked_attn_fwd_kernel(
    Q, K, V,  # (B, H, N, d) each, last dim contiguous
    SCALE,  # (H,) or (B, H) head mask; stride_sb == 0 for (H,)
    O,  # (B, H, N, d) view of a (B, N, H, d) buffer
    LSE,  # (B, H, N) fp32, log2 units; written when STORE_LSE
    UCLS,  # (B, H, d) unscaled output at token 0; written when RETURN_CLS
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_sb, stride_sh,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    STORE_LSE: tl.constexpr, RETURN_CLS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1-d grid, query blocks of one (b, h) adjacent so its K/V stay in L2
    n_blocks_m = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_blocks_m
    pid_bh = pid // n_blocks_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, BLOCK_D)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # key blocks that need no mask: fully below the diagonal (causal) / fully inside N
    if CAUSAL:
        n_full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
        n_end = tl.minimum((pid_m + 1) * BLOCK_M, N)
    else:
        n_full = N // BLOCK_N * BLOCK_N
        n_end = N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _masked_attn_fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, start_n, N, qk_scale,
            HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION)
    for start_n in range(n_full, n_end, BLOCK_N):
        acc, l_i, m_i = _masked_attn_fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, start_n, N, qk_scale,
            HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION)

    u = acc / l_i[:, None]  # (BLOCK_M, BLOCK_D) unscaled output; every row sees >= 1 key, so l_i > 0
    s = tl.load(SCALE + off_b * stride_sb + off_h * stride_sh).to(tl.float32)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, (u * s).to(O.dtype.element_ty), mask=row_mask)
    if STORE_LSE:
        tl.store(LSE + pid_bh * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)
    if RETURN_CLS:
        if pid_m == 0:
            cls_ptrs = UCLS + pid_bh * HEAD_DIM + offs_d[None, :] + 0 * offs_m[:, None]
            tl.store(cls_ptrs, u.to(UCLS.dtype.element_ty), mask=(offs_m[:, None] == 0) & (offs_d[None, :] < HEAD_DIM))


def head_scale_strides(head_scale: torch.Tensor) -> tuple[int, int]:
    """(batch stride, head stride) of a (H,) or (B, H) mask; (H,) broadcasts with batch stride 0."""
    if head_scale.dim() == 1:
        return 0, head_scale.stride(0)
    return head_scale.stride(0), head_scale.stride(1)


def launch_forward(
    q: torch.Tensor,  # (B, H, N, d)
    k: torch.Tensor,  # (B, H, N, d)
    v: torch.Tensor,  # (B, H, N, d)
    head_scale: torch.Tensor,  # (H,) or (B, H)
    causal: bool,
    sm_scale: float,
    store_lse: bool,
    return_cls: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the forward kernel. Returns o (B, H, N, d) [view of (B, N, H, d)], lse (B, H, N) or None,
    u_cls (B, H, d) or None."""
    B, H, N, d = q.shape
    o = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, N, d)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if store_lse else None
    u_cls = torch.empty((B, H, d), dtype=q.dtype, device=q.device) if return_cls else None
    # placeholders keep the argument dtypes (part of the autotune key) the same with flags off
    lse_arg = lse if store_lse else torch.empty(1, dtype=torch.float32, device=q.device)
    cls_arg = u_cls if return_cls else torch.empty(1, dtype=q.dtype, device=q.device)
    sb, sh = head_scale_strides(head_scale)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)

    args = (
        q, k, v, head_scale, o, lse_arg, cls_arg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        sb, sh,
        H, N, sm_scale * LOG2E,
    )
    meta = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=causal,
                STORE_LSE=store_lse, RETURN_CLS=return_cls, DOT_PRECISION=dot_precision(q.dtype))
    key = launch_key(_masked_attn_fwd_kernel, N, d, causal, (q, head_scale))
    launch(_masked_attn_fwd_kernel, key, grid, args, meta)
    return o, lse, u_cls
