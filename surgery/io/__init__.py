"""Layer 1: bytes in and out (checkpoints, TorchScript archives, atomic writes, metadata keys, ONNX
files, labels, captions, images, query lists). No CLIP models here.
"""
from __future__ import annotations

