"""Layer 6: ``clipsurgery debias``: budgets, the head and neuron searches, and the pipeline that runs
audit -> choose edits -> plan -> bake -> export -> verify -> compare.
"""
from __future__ import annotations

