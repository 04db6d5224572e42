"""Layer 2: what a CLIP is and how to open it: architectures, the tiny and bundled models, the tower
view, head-maskable attention, preprocessing, embeddings, neuron modules, loading, inspection.
"""
from __future__ import annotations

