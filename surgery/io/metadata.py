"""Every ``clipsurgery.*`` metadata key, in one place.

Safetensors files carry them in their metadata, ONNX files in ``metadata_props``; values are JSON
strings (or plain strings where noted), so every exported file says what it is and what surgery it
carries.
"""
from __future__ import annotations

# --- checkpoints (safetensors) and ONNX files
META_MODEL_CONFIG = "clipsurgery.model_cfg"  # the open_clip model config (JSON)
META_ARCH = "clipsurgery.arch"  # the architecture name
META_PLAN = "clipsurgery.plan"  # the SurgeryPlan the weights carry (JSON), or null
META_PREPROCESS = "clipsurgery.preprocess"  # image preprocessing: size, mean, std, interpolation, resize mode
META_TOKENIZER = "clipsurgery.tokenizer"  # {"name", "context_length"}
META_SOURCE = "clipsurgery.source_sha256"  # sha256 of the source weights file ("" for in-process models)

# --- ONNX files only
META_TOWER = "clipsurgery.tower"  # "vision" | "text"
META_NORMALIZED = "clipsurgery.normalized"  # "true" when the output embedding is L2-normalised
META_PRECISION = "clipsurgery.precision"  # "fp32" | "fp16" | "int8"
META_GRAPH = "clipsurgery.graph"  # "ort" (ONNX Runtime contrib ops) | "plain" (standard ONNX ops)
META_QUANTIZATION = "clipsurgery.quantization"  # int8 files: how they were quantized (JSON)
META_GATE = "clipsurgery.gate"  # int8 files: the fairness gate's figures against the fp32 export (JSON)

# --- world models
META_WORLD = "clipsurgery.world"  # the world's parameters (JSON)
META_TRAINING = "clipsurgery.training"  # training options and loss history (JSON)
META_QUALITY = "clipsurgery.quality"  # evaluation figures of the trained model (JSON)
