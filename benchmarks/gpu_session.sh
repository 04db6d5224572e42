#!/usr/bin/env bash
# Everything issue 17 measures on a GPU, in one go (a session with a CUDA device and onnxruntime-gpu):
#   1. the GPU tests (pytest -m gpu: kernels incl. bf16, launch cache, CUDA graphs, the bf16 sweep, ORT CUDA)
#   2. bench_masked_attention.py: ours vs SDPA, ViT-B/16 and ViT-L/14, batch 256, bf16 (target >= 0.95x)
#   3. the launch cost: cached direct launch vs the autotuner path vs SDPA (host time per call)
#   4. bench_gpu_audit.py: the audit on ViT-L/14, 2,048 images, triton vs sdpa, time / one forward pass
#   5. bench_ort_cuda.py: ORT CUDA vs PyTorch eager, ViT-B/32 and ViT-L/14, batch 1 and 64, node placement
# Writes OUT_DIR (default benchmarks/gpu_session/<UTC time>/): one log per step, status.txt, summary.md.
#     PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT_DIR:-benchmarks/gpu_session/$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
export CLIPSURGERY_TRITON_AUTOTUNE=${CLIPSURGERY_TRITON_AUTOTUNE:-1}

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "gpu_session: $PY cannot import torch; set PYTHON to the project's interpreter. Nothing was run." | tee "$OUT/status.txt"
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_session: no CUDA device found; nothing was run." | tee "$OUT/status.txt"
    exit 2
fi

step() {  # step NAME COMMAND...: run, keep the log, record the exit status and the seconds
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/status.txt"
    tail -n 3 "$OUT/$name.log"
}

step gpu_tests "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/model tests/audit tests/io tests/sae
step attention "$PY" benchmarks/bench_masked_attention.py --batch 256 --markdown "$OUT/attention.md"
step launch_cost "$PY" benchmarks/bench_masked_attention.py --host-overhead
step audit "$PY" benchmarks/bench_gpu_audit.py --arch ViT-L-14 --n 2048 --markdown "$OUT/audit.md"
step ort_cuda "$PY" benchmarks/bench_ort_cuda.py --markdown "$OUT/ort.md"

{
    echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ)"
    echo; echo '```'; cat "$OUT/status.txt"; echo '```'
    echo; echo "## GPU tests"; echo '```'; tail -n 15 "$OUT/gpu_tests.log"; echo '```'
    for part in attention audit ort; do
        [ -f "$OUT/$part.md" ] && { echo; echo "## $part"; echo; cat "$OUT/$part.md"; }
    done
    echo; echo "## launch cost"; echo '```'; cat "$OUT/launch_cost.log"; echo '```'
} >"$OUT/summary.md"
echo "wrote $OUT/summary.md"
