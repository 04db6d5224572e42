"""Layer 5: writing a (patched) CLIP for serving: safetensors, ONNX (plain or ONNX Runtime-fused),
with a parity gate; int8 ONNX with a fairness gate.
"""
from __future__ import annotations

from surgery.export.gate import GateData, GateOptions, check_gate, gate_figures  # noqa: F401
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
from surgery.export.quantize import QuantizeOptions, export_quantized, quantize_pair  # noqa: F401
from surgery.export.safetensors import (  # noqa: F401
    export_safetensors,
    model_metadata,
)
