"""Layer 1: bias and retrieval metrics, pure functions (Skew, MaxSkew, NDKL, Cramér's V, hit@K recall,
zero-shot accuracy, linear probes). ``from surgery import metrics; metrics.max_skew_at_k(...)``.
"""
from __future__ import annotations

from surgery.metrics.bias import (  # noqa: F401
    TARGETS,
    REDUCTIONS,
    DEFAULT_ZERO_COUNT,
    Target,
    reduce_queries,
    top_k_indices,
    group_counts_at_k,
    desired_distribution,
    skew_at_k,
    max_skew_at_k,
    min_skew_at_k,
    ndkl,
    cramers_v,
    BiasConventions,
    bias_summary,
)
from surgery.metrics.retrieval import (  # noqa: F401
    best_positive_rank,
    recall_at_k,
    retrieval_recall,
)
from surgery.metrics.zero_shot import (  # noqa: F401
    class_embeddings,
    zero_shot_predict,
    zero_shot_accuracy,
)
from surgery.metrics.linear_probe import (  # noqa: F401
    LinearProbe,
    probe_loss,
    fit_linear_probe,
    probe_accuracy,
    cross_validated_accuracy,
)
