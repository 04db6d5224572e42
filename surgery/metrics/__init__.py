"""Layer 1: bias and retrieval metrics, pure functions (Skew, MaxSkew, NDKL, Cramér's V, hit@K recall,
zero-shot accuracy, linear probes). ``from surgery import metrics; metrics.max_skew_at_k(...)``.
"""
from __future__ import annotations

from surgery.metrics.bias import (  # noqa: F401
    DEFAULT_ZERO_COUNT,
    REDUCTIONS,
    TARGETS,
    BiasConventions,
    Target,
    bias_summary,
    cramers_v,
    desired_distribution,
    group_counts_at_k,
    max_skew_at_k,
    min_skew_at_k,
    ndkl,
    reduce_queries,
    skew_at_k,
    top_k_indices,
)
from surgery.metrics.linear_probe import (  # noqa: F401
    LinearProbe,
    cross_validated_accuracy,
    fit_linear_probe,
    probe_accuracy,
    probe_loss,
)
from surgery.metrics.retrieval import (  # noqa: F401
    best_positive_rank,
    recall_at_k,
    retrieval_recall,
)
from surgery.metrics.zero_shot import (  # noqa: F401
    class_embeddings,
    zero_shot_accuracy,
    zero_shot_predict,
)
