"""Layer 5: writing a (patched) CLIP for serving: safetensors, ONNX (plain or ONNX Runtime-fused),
with a parity gate.
"""
from __future__ import annotations

from surgery.export.onnx import (  # noqa: F401
    FUSED_ATTENTION_OPSET,
    GRAPH_CHOICES,
    PARITY_BOUND,
    TOWER_CHOICES,
    ImageEncoder,
    OnnxOptions,
    TextEncoder,
    export_onnx,
    parity_error,
)
from surgery.export.safetensors import (  # noqa: F401
    export_safetensors,
    model_metadata,
)
