"""Backward kernels for O = s * softmax(q k^T * sm_scale) v, s = head_scale[b, h].

With U the unscaled output, P the attention probabilities and dO the incoming gradient:
    dU    = s * dO
    Delta = rowsum(dU * U) = rowsum(dO * O)                     # (B, H, N), from the saved O,
                                                                # computed (and stored) by the dq kernel
    dV    = P^T dU = s * (P^T dO)
    dS    = P * (dU V^T - Delta) = P * (s * (dO V^T) - Delta)
    dQ    = sm_scale * dS K,   dK = sm_scale * dS^T Q
    ds[b, h] = sum_{i, c} dO[i, c] * U[i, c] = sum_{i, j} P[i, j] * (dO V^T)[i, j]
The last line recomputes dO . U from P inside the dq kernel, so d(head_scale) is exact for a head
whose scale is 0 (O = 0 there, and U cannot be recovered from O). P is recomputed from the saved
log-sum-exp (log2 units); no N x N matrix is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._attention_configs import (
    AUTOTUNE_KEY,
    BWD_DKDV_CONFIGS,
    BWD_DQ_CONFIGS,
)
from triton_kernels._attention_fwd import LOG2E, dot_precision, head_scale_strides
from triton_kernels._launch import launch, launch_key


@triton.jit
def _masked_attn_bwd_dkdv_tile(
    dk, dv,  # (BLOCK_N, BLOCK_D) fp32 accumulators
    k, v,  # (BLOCK_N, BLOCK_D) this program's key / value rows
    q_base, do_base, lse_base, delta_base, stride_qn, stride_dn,
    offs_n, offs_d, start_m, N, qk_scale, s,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,  # this query block crosses N or the causal diagonal
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate one query block [start_m, start_m + BLOCK_M) into dk, dv (transposed: rows = keys)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    tile_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=tile_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], mask=tile_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # (BLOCK_M,); inf -> P = 0 off the end
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    if MASKED:
        keep = (offs_n[:, None] < N) & row_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(keep, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # P^T dO (times s at the end)
    dpo_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
    ds_t = p_t * (s * dpo_t - delta[None, :])  # (BLOCK_N, BLOCK_M)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # dS^T Q (times sm_scale at the end)
    return dk, dv


@triton.autotune(configs=BWD_DKDV_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _masked_attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, H, N, d) each, last dim contiguous
    SCALE,  # (H,) or (B, H) head mask; stride_sb == 0 for (H,)
    LSE, DELTA,  # (B, H, N) fp32
    DK, DV,  # (B, H, N, d) out
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_gb, stride_gh, stride_gn,  # shared by DK and DV (same layout)
    stride_sb, stride_sh,
    H, N, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_blocks_n
    pid_bh = pid // n_blocks_n
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_N, BLOCK_D)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    s = tl.load(SCALE + off_b * stride_sb + off_h * stride_sh).to(tl.float32)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_db + off_h * stride_dh
    lse_base = LSE + pid_bh * N
    delta_base = DELTA + pid_bh * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # query blocks: [lo, diag_end) straddle the diagonal (causal only), [diag_end, full_end) need no
    # mask, [tail, N) cross N
    full_end = N // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, N)
    else:
        lo = 0
        diag_end = 0
    for start_m in range(lo, diag_end, BLOCK_M):
        dk, dv = _masked_attn_bwd_dkdv_tile(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_dn,
            offs_n, offs_d, start_m, N, qk_scale, s, HEAD_DIM, BLOCK_M, True, CAUSAL, DOT_PRECISION)
    for start_m in range(diag_end, full_end, BLOCK_M):
        dk, dv = _masked_attn_bwd_dkdv_tile(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_dn,
            offs_n, offs_d, start_m, N, qk_scale, s, HEAD_DIM, BLOCK_M, False, CAUSAL, DOT_PRECISION)
    for start_m in range(tl.maximum(diag_end, full_end), N, BLOCK_M):
        dk, dv = _masked_attn_bwd_dkdv_tile(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_dn,
            offs_n, offs_d, start_m, N, qk_scale, s, HEAD_DIM, BLOCK_M, True, CAUSAL, DOT_PRECISION)

    g_off = off_b * stride_gb + off_h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, (dv * s).to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _masked_attn_bwd_dq_tile(
    dq, ds_row,  # (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,) fp32 accumulators
    q, do, lse, delta,  # (BLOCK_M, BLOCK_D) x2, (BLOCK_M,) x2: this program's query rows
    k_base, v_base, stride_kn, stride_vn,
    offs_m, offs_d, start_n, N, qk_scale, s,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, COMPUTE_DSCALE: tl.constexpr,
):
    """Accumulate one key block [start_n, start_n + BLOCK_N) into dq and the per-row dO . U."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
    if MASKED:
        keep = offs_n[None, :] < N
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(keep, p, 0.0)
    dpo = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) = dO V^T
    if COMPUTE_DQ:
        ds = p * (s * dpo - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    if COMPUTE_DSCALE:
        ds_row += tl.sum(p * dpo, 1)
    return dq, ds_row


@triton.autotune(configs=BWD_DQ_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _masked_attn_bwd_dq_kernel(
    Q, K, V, DO, O,  # (B, H, N, d) each, last dim contiguous; O the saved (scaled) output
    SCALE,  # (H,) or (B, H) head mask; stride_sb == 0 for (H,)
    LSE,  # (B, H, N) fp32
    DELTA,  # (B, H, N) fp32 out: rowsum(dO * O), read by the dk/dv kernel
    DQ,  # (B, H, N, d) out, when COMPUTE_DQ
    DSCALE_ROWS,  # (B, H, N) fp32 out: dO . U per row, when COMPUTE_DSCALE
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_ob, stride_oh, stride_on,
    stride_gb, stride_gh, stride_gn,
    stride_sb, stride_sh,
    H, N, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, COMPUTE_DSCALE: tl.constexpr, STORE_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_blocks_m = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_blocks_m
    pid_bh = pid // n_blocks_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    tile_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, BLOCK_D)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=tile_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 mask=tile_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=tile_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,) rowsum(dO * O)
    if STORE_DELTA:
        tl.store(DELTA + pid_bh * N + offs_m, delta, mask=row_ok)
    if COMPUTE_DQ or COMPUTE_DSCALE:  # else only Delta was asked for
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=float("inf"))  # (BLOCK_M,)
        s = tl.load(SCALE + off_b * stride_sb + off_h * stride_sh).to(tl.float32)
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        ds_row = tl.zeros([BLOCK_M], dtype=tl.float32)
        if CAUSAL:
            n_full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            n_end = tl.minimum((pid_m + 1) * BLOCK_M, N)
        else:
            n_full = N // BLOCK_N * BLOCK_N
            n_end = N
        for start_n in range(0, n_full, BLOCK_N):
            dq, ds_row = _masked_attn_bwd_dq_tile(
                dq, ds_row, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, start_n, N,
                qk_scale, s, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION, COMPUTE_DQ, COMPUTE_DSCALE)
        for start_n in range(n_full, n_end, BLOCK_N):
            dq, ds_row = _masked_attn_bwd_dq_tile(
                dq, ds_row, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, start_n, N,
                qk_scale, s, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION, COMPUTE_DQ, COMPUTE_DSCALE)

        if COMPUTE_DQ:
            dq_ptrs = DQ + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :]
            tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_mask)
        if COMPUTE_DSCALE:
            tl.store(DSCALE_ROWS + pid_bh * N + offs_m, ds_row, mask=row_ok)


def _grad_buffer(like: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) view of a fresh (B, N, H, d)-contiguous buffer (the layout heads are merged in)."""
    B, H, N, d = like.shape
    return torch.empty((B, N, H, d), dtype=like.dtype, device=like.device).transpose(1, 2)


def launch_backward(
    do: torch.Tensor,  # (B, H, N, d) gradient of o, last dim contiguous
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # (B, H, N, d)
    o: torch.Tensor,  # (B, H, N, d) saved output (scaled)
    lse: torch.Tensor,  # (B, H, N) fp32, log2 units
    head_scale: torch.Tensor,  # (H,) or (B, H)
    causal: bool, sm_scale: float,
    need_dq: bool, need_dkdv: bool, need_dscale: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns dq, dk, dv (B, H, N, d) and d(head_scale) shaped like head_scale; None where not needed."""
    B, H, N, d = q.shape
    block_d = triton.next_power_of_2(d)
    precision = dot_precision(q.dtype)
    qk_scale = sm_scale * LOG2E
    sb, sh = head_scale_strides(head_scale)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)  # written by the dq kernel
    qkvd_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

    # dq kernel: always runs, it computes Delta for the dk/dv kernel; placeholders (never written)
    # keep the argument dtypes, part of the autotune key, fixed
    dq = _grad_buffer(q) if need_dq else torch.empty(1, dtype=q.dtype, device=q.device)
    dscale_rows = torch.empty((B, H, N) if need_dscale else 1, dtype=torch.float32, device=q.device)
    launch(
        _masked_attn_bwd_dq_kernel, launch_key(_masked_attn_bwd_dq_kernel, N, d, causal, (q, do, head_scale)),
        lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * B * H,),
        (q, k, v, do, o, head_scale, lse, delta, dq, dscale_rows,
         *qkvd_strides, *o.stride()[:3], *(dq.stride()[:3] if need_dq else (0, 0, 0)), sb, sh,
         H, N, sm_scale, qk_scale),
        dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, DOT_PRECISION=precision,
             COMPUTE_DQ=need_dq, COMPUTE_DSCALE=need_dscale, STORE_DELTA=need_dkdv),
    )
    dscale = None
    if need_dscale:  # (B, H) for a (B, H) mask, summed over the batch for (H,)
        dscale = dscale_rows.sum(-1) if head_scale.dim() == 2 else dscale_rows.sum((0, 2))
        dscale = dscale.to(head_scale.dtype)
    if not need_dq:
        dq = None

    dk = dv = None
    if need_dkdv:
        dk, dv = _grad_buffer(k), _grad_buffer(v)
        launch(
            _masked_attn_bwd_dkdv_kernel, launch_key(_masked_attn_bwd_dkdv_kernel, N, d, causal, (q, do, head_scale)),
            lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * B * H,),
            (q, k, v, do, head_scale, lse, delta, dk, dv, *qkvd_strides, *dk.stride()[:3], sb, sh,
             H, N, sm_scale, qk_scale),
            dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, DOT_PRECISION=precision),
        )
    return dq, dk, dv, dscale
