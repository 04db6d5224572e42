"""Sparse autoencoders on CLIP representations, social-neuron search and deactivation (seed 001).

Public API::

    from surgery import sae
    cache = sae.build_cache(model, sae.Site("vision", "residual"), image_batches, "cache/")
    model_sae, history = sae.train_sae(cache, sae.SAEConfig(d_in=cache.d, kind="batchtopk", k=20),
                                       sae.TrainOptions(steps=2000, checkpoint_dir="out/"))
    sae.save_trained(model_sae, "out/", history, sae.evaluate_sae(model_sae, cache))
    report = sae.neurons_from_images(model, model_sae, "images/", "labels.csv", "race", transform)
    fix = sae.deactivation(model_sae, report.selected_ids, alpha=0.6, form="paper")
    with sae.replaced(model, sae.Site("vision", "residual"), fix): ...
"""
from __future__ import annotations

from surgery.model.neurons import ErrorPreservingDeactivation, PaperDeactivation
from surgery.sae.activations import (
    ActivationCache,
    CacheError,
    Site,
    build_cache,
    capture,
    capture_rows,
    open_cache,
    replaced,
    site_width,
)
from surgery.sae.deactivate import FORMS, deactivation
from surgery.sae.downstream import encode_images_replaced, encode_texts_replaced, zero_shot_with_replacement
from surgery.sae.model import (
    KINDS,
    NORMALISATIONS,
    SAEConfig,
    SAEError,
    SparseAutoencoder,
    aux_k_loss,
    batch_topk_activation,
    explained_variance,
    geometric_median,
    l1_loss,
    load_sae,
    normalised_mse,
    reconstruction_loss,
    save_sae,
    threshold_activation,
    topk_activation,
)
from surgery.sae.neurons import (
    NeuronError,
    NeuronOptions,
    NeuronReport,
    find_neurons,
    group_prompt_texts,
    neurons_from_cache,
    neurons_from_images,
    neurons_from_texts,
    pooled_reduction,
    read_neurons,
    sample_latents,
    write_neurons,
)
from surgery.sae.train import SAEMetrics, TrainOptions, evaluate_sae, save_trained, train_sae, training_step

__all__ = [
    "Site", "ActivationCache", "CacheError", "build_cache", "open_cache", "capture", "capture_rows", "replaced",
    "site_width", "SAEConfig", "SAEError", "SparseAutoencoder", "KINDS", "NORMALISATIONS", "save_sae", "load_sae",
    "topk_activation", "batch_topk_activation", "threshold_activation", "geometric_median",
    "reconstruction_loss", "l1_loss", "aux_k_loss", "normalised_mse", "explained_variance",
    "TrainOptions", "SAEMetrics", "train_sae", "training_step", "evaluate_sae", "save_trained",
    "NeuronOptions", "NeuronReport", "NeuronError", "find_neurons", "sample_latents", "neurons_from_images", "neurons_from_cache", "pooled_reduction",
    "neurons_from_texts", "group_prompt_texts", "write_neurons", "read_neurons",
    "PaperDeactivation", "ErrorPreservingDeactivation", "deactivation", "FORMS",
    "encode_images_replaced", "encode_texts_replaced", "zero_shot_with_replacement",
]
