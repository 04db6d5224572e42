"""Layer 4: running encoders (PyTorch or ONNX Runtime) over labelled images: embeddings, evaluation,
before/after comparison.
"""
from __future__ import annotations

