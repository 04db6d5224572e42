"""Layer 5: the head audit: probe sets, the residual decomposition, per-head scores (CAVs, group
accuracy, ablation, gradients), TextSpan/CCS descriptions, the vision and text audits and their report.
"""
from __future__ import annotations

