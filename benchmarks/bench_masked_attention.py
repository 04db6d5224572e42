"""Benchmark: fused Triton attention with a per-head mask vs torch SDPA and the unfused path.

    python benchmarks/bench_masked_attention.py [--batch 256] [--markdown RESULTS_PART.md] [--host-overhead]

Shapes: ViT-B/16 (N=197, H=12, d=64) and ViT-L/14 (N=257, H=16, d=64), bf16, non-causal.
Paths, forward and forward+backward (gradients of q, k, v, and of the mask where there is one):
  sdpa      torch SDPA, flash backend — cannot apply the mask (the speed to match)
  unfused   per-head outputs materialised by SDPA, then multiplied by the (B, H) mask
  ours      triton_kernels.masked_attention with a (B, H) mask
  M=16 x1   16 mask configurations in ONE launch: batch B' = B/16 stacked 16x, (16*B', H) mask
  M=16 x16  the same work as 16 launches of B' rows, one (H,) mask each
Targets (project issue 7): ours >= 0.95x SDPA throughput while applying the mask; >= 2x the
unfused path. Times: triton.testing.do_bench medians (CUDA events, warm-up, L2 flushed).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

try:
    import triton_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"ViT-B/16": (197, 12, 64), "ViT-L/14": (257, 16, 64)}  # name: (N, H, d)
M_CONFIGS = 16
DTYPE = torch.bfloat16


def sdpa(q, k, v):
    """q, k, v: (B, H, N, d) -> (B, H, N, d), flash backend only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def unfused(q, k, v, head_scale):
    """Per-head outputs materialised, then scaled: head_scale (B, H)."""
    return sdpa(q, k, v) * head_scale[:, :, None, None]


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def leaf_views(qkv: torch.Tensor, requires_grad: bool):
    """(B, N, 3, H, d) packed -> q, k, v (B, H, N, d) strided views, each a leaf when requires_grad."""
    views = [t.transpose(1, 2) for t in qkv.detach().unbind(2)]
    return [t.requires_grad_(requires_grad) for t in views]


def fwd_and_fwdbwd(forward, inputs, grad_out) -> tuple[float, float]:
    """(forward ms, forward+backward ms); inputs: the tensors to differentiate."""
    with torch.no_grad():
        t_fwd = bench(forward)
    t_both = bench(lambda: torch.autograd.grad(forward(), inputs, grad_out))
    return t_fwd, t_both


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_against_fp32(B_check: int, N: int, H: int, d: int) -> str:
    """Relative errors of ours (bf16, tuned configs) vs fp32 math on upcast inputs, output and grads."""
    from triton_kernels import masked_attention

    qkv = torch.randn(B_check, N, 3, H, d, device="cuda", dtype=DTYPE)
    mask = (torch.rand(B_check, H, device="cuda") + 0.25).requires_grad_()  # (B, H)
    q, k, v = leaf_views(qkv, True)
    o = masked_attention(q, k, v, mask)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, mask), g)
    qr, kr, vr = leaf_views(qkv.float(), True)
    mr = mask.detach().float().requires_grad_()
    p = torch.softmax(qr @ kr.transpose(-1, -2) * d**-0.5, -1)
    o_ref = (p @ vr) * mr[:, :, None, None]
    grads_ref = torch.autograd.grad(o_ref, (qr, kr, vr, mr), g.float())
    names = ("o", "dq", "dk", "dv", "dmask")
    errs = [rel_err(o, o_ref)] + [rel_err(a, b) for a, b in zip(grads, grads_ref)]
    return ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs))


def run_shape(name: str, B: int, N: int, H: int, d: int) -> list[tuple]:
    from triton_kernels import masked_attention

    qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=DTYPE)  # (B, N, 3, H, d)
    grad_out = torch.randn(B, H, N, d, device="cuda", dtype=DTYPE)  # (B, H, N, d)
    mask = (torch.rand(B, H, device="cuda") + 0.25).requires_grad_()  # (B, H), rows distinct
    q, k, v = leaf_views(qkv, True)
    qc, kc, vc = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]  # (B, H, N, d) each
    times = {
        "sdpa": fwd_and_fwdbwd(lambda: sdpa(q, k, v), (q, k, v), grad_out),
        "sdpa_contig": fwd_and_fwdbwd(lambda: sdpa(qc, kc, vc), (qc, kc, vc), grad_out),
        "unfused": fwd_and_fwdbwd(lambda: unfused(q, k, v, mask), (q, k, v, mask), grad_out),
        "ours": fwd_and_fwdbwd(lambda: masked_attention(q, k, v, mask), (q, k, v, mask), grad_out),
    }

    # M=16 configurations: B' rows under 16 (H,) masks — stacked in one launch vs 16 launches
    b_small = B // M_CONFIGS
    configs = (torch.rand(M_CONFIGS, H, device="cuda") > 0.3).float()  # (M, H) ablation patterns
    qkv_small = qkv[:b_small].contiguous()  # (B', N, 3, H, d)
    qs, ks, vs = leaf_views(qkv_small, True)
    qkv_stacked = qkv_small.repeat(M_CONFIGS, 1, 1, 1, 1)  # (M*B', N, 3, H, d), config-major
    qst, kst, vst = leaf_views(qkv_stacked, True)
    mask_stacked = configs.repeat_interleave(b_small, 0).requires_grad_()  # (M*B', H)
    masks_each = [c.clone().requires_grad_() for c in configs]  # M x (H,)
    g_small = grad_out[:b_small]

    def sixteen_fwd():
        return [masked_attention(qs, ks, vs, m) for m in masks_each]

    def sixteen_fwdbwd():
        return [torch.autograd.grad(masked_attention(qs, ks, vs, m), (qs, ks, vs, m), g_small) for m in masks_each]

    times["one_launch"] = fwd_and_fwdbwd(
        lambda: masked_attention(qst, kst, vst, mask_stacked), (qst, kst, vst, mask_stacked), grad_out[: M_CONFIGS * b_small])
    with torch.no_grad():
        t16_fwd = bench(sixteen_fwd)
    times["sixteen"] = (t16_fwd, bench(sixteen_fwdbwd))

    flops_fwd = 4 * B * H * N * N * d
    ours_f, ours_b = times["ours"]
    rows = [
        (name, "torch SDPA flash (no mask)", *times["sdpa"], "ours/SDPA throughput",
         times["sdpa"][0] / ours_f, times["sdpa"][1] / ours_b, ">= 0.95"),
        (name, "torch SDPA flash, contiguous (B,H,N,d) inputs (no mask)", *times["sdpa_contig"], "ours/SDPA throughput",
         times["sdpa_contig"][0] / ours_f, times["sdpa_contig"][1] / ours_b, "(context)"),
        (name, "unfused: SDPA then x mask", *times["unfused"], "unfused time / ours",
         times["unfused"][0] / ours_f, times["unfused"][1] / ours_b, ">= 2"),
        (name, f"ours, (B,H) mask [{flops_fwd / ours_f / 1e9:.0f} TFLOP/s fwd]", ours_f, ours_b, "", None, None, ""),
        (name, f"ours, M={M_CONFIGS} configs in 1 launch (B'={b_small})", *times["one_launch"], "", None, None, ""),
        (name, f"ours, {M_CONFIGS} launches of B'={b_small}", *times["sixteen"], "16 launches / 1 launch",
         times["sixteen"][0] / times["one_launch"][0], times["sixteen"][1] / times["one_launch"][1], "> 1"),
    ]
    return rows


def breakdown(B: int, N: int, H: int, d: int) -> str:
    """Per-kernel times of ours (ViT shape) next to SDPA's forward and backward."""
    from triton_kernels._attention_bwd import launch_backward
    from triton_kernels._attention_fwd import launch_forward

    qkv = torch.randn(B, N, 3, H, d, device="cuda", dtype=DTYPE)
    q, k, v = leaf_views(qkv, False)
    mask = torch.rand(B, H, device="cuda") + 0.25  # (B, H)
    sm = d**-0.5
    o, lse, _ = launch_forward(q, k, v, mask, False, sm, True, False)
    do = torch.randn_like(o)
    parts = {
        "fwd (no lse)": lambda: launch_forward(q, k, v, mask, False, sm, False, False),
        "fwd (+lse)": lambda: launch_forward(q, k, v, mask, False, sm, True, False),
        "bwd all": lambda: launch_backward(do, q, k, v, o, lse, mask, False, sm, True, True, True),
        "bwd dq+dmask only": lambda: launch_backward(do, q, k, v, o, lse, mask, False, sm, True, False, True),
        "bwd dk,dv only": lambda: launch_backward(do, q, k, v, o, lse, mask, False, sm, False, True, False),
        "bwd dmask only": lambda: launch_backward(do, q, k, v, o, lse, mask, False, sm, False, False, True),
    }
    qg, kg, vg = leaf_views(qkv, True)
    o_s = sdpa(qg, kg, vg)
    parts["sdpa fwd"] = lambda: sdpa(q, k, v)
    parts["sdpa bwd"] = lambda: torch.autograd.grad(o_s, (qg, kg, vg), do, retain_graph=True)
    return "\n".join(f"  {name:20s} {bench(fn):.3f} ms" for name, fn in parts.items())


def host_overhead(calls: int = 200) -> str:
    """Wall time per call on a tiny input (B=1, H=2, N=16): the launch cost, GPU work negligible.

    ``ours`` rows launch through the cached config (no autotuner wrapper, triton_kernels/_launch.py);
    ``ours autotuned`` rows go through ``@triton.autotune`` on every call (the path before the cache);
    ``enqueue`` is the host time to issue the calls without waiting for the GPU."""
    import contextlib
    import time

    from triton_kernels import direct_launch, masked_attention

    qkv = torch.randn(1, 16, 3, 2, 64, device="cuda", dtype=DTYPE)
    q, k, v = leaf_views(qkv, True)
    mask = torch.ones(2, device="cuda", requires_grad=True)  # (H,)
    g = torch.randn(1, 2, 16, 64, device="cuda", dtype=DTYPE)
    def fwd():
        return masked_attention(q.detach(), k.detach(), v.detach(), mask.detach())

    def fwdbwd():
        return torch.autograd.grad(masked_attention(q, k, v, mask), (q, k, v, mask), g)

    fns = {  # name: (fn, direct launch on?)
        "ours fwd": (fwd, True),
        "ours autotuned fwd": (fwd, False),
        "ours fwd+bwd": (fwdbwd, True),
        "ours autotuned fwd+bwd": (fwdbwd, False),
        "sdpa fwd": (lambda: sdpa(q.detach(), k.detach(), v.detach()), None),
        "sdpa fwd+bwd": (lambda: torch.autograd.grad(sdpa(q, k, v), (q, k, v), g), None),
    }
    out, per_call = [], {}
    for name, (fn, direct) in fns.items():
        with direct_launch(direct) if direct is not None else contextlib.nullcontext():
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            enqueue = time.perf_counter() - start
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        per_call[name] = wall / calls * 1e6
        out.append(f"  {name:24s} {per_call[name]:.0f} us/call (enqueue {enqueue / calls * 1e6:.0f} us/call)")
    for what in ("fwd", "fwd+bwd"):
        out.append(f"  autotuned / cached direct launch, {what}: "
                   f"{per_call[f'ours autotuned {what}'] / per_call[f'ours {what}']:.2f}x host time per call")
    return "\n".join(out)


def format_table(rows: list[tuple]) -> str:
    head = "| shape | path | fwd ms | fwd+bwd ms | ratio | fwd ratio | fwd+bwd ratio | target |"
    lines = [head, "|" + "---|" * 8]
    for shape, path, tf, tb, what, rf, rb, target in rows:
        ratio = (f"{rf:.2f}x", f"{rb:.2f}x") if rf is not None else ("", "")
        lines.append(f"| {shape} | {path} | {tf:.3f} | {tb:.3f} | {what} | {ratio[0]} | {ratio[1]} | {target} |")
    return "\n".join(lines)


def best_configs() -> str:
    from triton_kernels import _attention_bwd, _attention_fwd

    kernels = {
        "fwd": _attention_fwd._masked_attn_fwd_kernel,
        "bwd_dq": _attention_bwd._masked_attn_bwd_dq_kernel,
        "bwd_dkdv": _attention_bwd._masked_attn_bwd_dkdv_kernel,
    }
    out = []
    for name, kernel in kernels.items():
        for key, cfg in getattr(kernel, "cache", {}).items():
            out.append(f"{name} key={key[:3]}: {cfg}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--breakdown", action="store_true", help="print per-kernel times first")
    parser.add_argument("--markdown", type=Path, help="also write the header and table here")
    parser.add_argument("--host-overhead", action="store_true",
                        help="only the launch-cost rows: cached direct launch vs the autotuner path vs SDPA")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_masked_attention: no CUDA device found; this benchmark needs a GPU. Nothing was run.")
    import triton

    torch.manual_seed(0)
    header = (
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"command: python {' '.join(sys.argv)}\n"
        f"batch {args.batch}, {str(DTYPE).removeprefix('torch.')}, non-causal; do_bench medians"
    )
    print(header, flush=True)
    if args.host_overhead:
        print(f"host overhead per call (tiny input):\n{host_overhead()}", flush=True)
        return
    checks = [f"{name}: {check_against_fp32(8, *SHAPES[name])}" for name in SHAPES]
    print("accuracy vs fp32 math (relative norm error, B=8):\n  " + "\n  ".join(checks), flush=True)
    if args.breakdown:
        for name, (N, H, d) in SHAPES.items():
            print(f"{name} per-kernel (batch {args.batch}):\n{breakdown(args.batch, N, H, d)}", flush=True)
        print(f"host overhead per call (tiny input):\n{host_overhead()}", flush=True)
    rows = []
    for name, (N, H, d) in SHAPES.items():
        rows += run_shape(name, args.batch, N, H, d)
        print(f"{name} done", flush=True)
    table = format_table(rows)
    print(best_configs())
    print(table)
    if args.markdown:
        args.markdown.write_text(
            header.replace("\n", "  \n") + "\n\naccuracy vs fp32 math (relative norm error, B=8): "
            + "; ".join(checks) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
