"""Layer 5: writing a (patched) CLIP for serving: safetensors, ONNX (plain or ONNX Runtime-fused),
with a parity gate.
"""
from __future__ import annotations

from surgery.export.safetensors import (  # noqa: F401
    model_metadata,
    export_safetensors,
)
from surgery.export.onnx import (  # noqa: F401
    TOWER_CHOICES,
    GRAPH_CHOICES,
    PARITY_BOUND,
    OnnxOptions,
    ImageEncoder,
    TextEncoder,
    export_onnx,
    FUSED_ATTENTION_OPSET,
    parity_error,
)
