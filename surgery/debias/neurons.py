"""The neuron half of ``clipsurgery debias`` (seed 001): train an SAE on the vision embeddings of
unlabelled images and find its social-neuron candidates (:func:`train_social_sae`); which of them
to deactivate is chosen together with the head edits by :func:`surgery.debias.search.search_edits`.

Candidates come from seed 001's rule (tau = 0.5; the top ``pool`` = 40 per group by consistency x
specificity). :func:`greedy_neurons` is the neuron-only search on fixed embeddings (the shared
forward selection, with the accuracy and recall budgets), used by ``examples/sae_world.py``.

SAE settings are the ones that worked best on the planted-bias world (examples/sae_world.py):
Matryoshka BatchTopK, x8, k = 4, nested prefixes 2, 8, 32. The deactivation is the
error-preserving form at a = 1 (the chosen latents' contribution removed, nothing else changed):
seed 001's paper form (a = 0.6) also blends every embedding toward its SAE reconstruction, which on
the dev worlds of the world suite (tex2, col3) cost image->text recall before any latent was
deactivated, so that no latent fit the recall budget on tex2 (benchmarks/RESULTS.md, issue 13).
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery import sae as S
from surgery.audit.probe import ProbeSet, edit_figures
from surgery.audit.set_search import forward_select
from surgery.debias.budget import Budget
from surgery.debias.heads import mean_figures
from surgery.edit.plan import NeuronEdit
from surgery.errors import NeuronError

log = logging.getLogger(__name__)


@dataclass
class NeuronStageOptions:
    expansion: int = 8  # SAE width = expansion x embedding width
    k: int = 4  # active latents per sample (BatchTopK)
    matryoshka: tuple[int, ...] = (2, 8, 32)  # nested prefix sizes
    # training length follows the data: passes over the activation rows, stopped early once an epoch
    # improves the loss by less than ``plateau``; at most ``steps`` steps (the fixed length used before
    # issue 25: 800 steps of 256 were 51 passes over a world's 4000 images, 205 over a 1000-image probe)
    epochs: float = 25.0
    plateau: float = 0.01
    steps: int = 800
    batch_size: int = 256  # training batch
    tau: float = 0.5  # seed 001's effectiveness threshold
    pool: int = 40  # candidates per group (top by consistency x specificity among the rule's latents)
    max_neurons: int = 24  # most latents deactivated
    alpha: float = 1.0  # deactivation strength
    form: str = "error_preserving"  # "error_preserving" | "paper" (seed 001's, with alpha 0.6)
    seed: int = 0
    batch_size_embed: int = 256  # images per forward pass when embedding the SAE's training and probe images


def _figures_on_draws(embs: list[torch.Tensor], probes: list[ProbeSet], edit, query_emb: torch.Tensor,
                      class_emb: torch.Tensor | None, k: int, caption_embs: list | None = None) -> dict:
    """:func:`edit_figures` averaged over independent probe draws, ``edit`` applied to each draw's
    unnormalised embeddings (n_i, D)."""
    captions = caption_embs if caption_embs is not None else [None] * len(probes)
    return mean_figures([edit_figures(F.normalize(edit(e), dim=-1), p, query_emb, class_emb, k, c)
                         for e, p, c in zip(embs, probes, captions)])


@torch.no_grad()
def greedy_neurons(sae, candidates: list[int], embs: list[torch.Tensor], probes: list[ProbeSet],
                   query_emb: torch.Tensor, class_emb: torch.Tensor | None, budget: Budget, k: int,
                   options: NeuronStageOptions, caption_embs: list | None = None):
    """Forward selection (:func:`surgery.audit.set_search.forward_select`) over ``candidates`` on
    the unedited embeddings ``embs`` ((n_i, D) per probe draw; figures at MaxSkew@``k`` are
    averaged over the draws) until ``budget``'s bias target is met. Returns (chosen ids, before,
    after, steps), a step per chosen latent with the figures of the set it completes."""
    def evaluate(ids: list[int]) -> dict:
        fix = S.deactivation(sae, ids, options.alpha, options.form) if ids else (lambda e: e)
        return _figures_on_draws(embs, probes, fix, query_emb, class_emb, k, caption_embs)

    before = evaluate([])
    selection = forward_select(candidates, evaluate, objective=lambda f: f["max_skew"],
                               allowed=lambda f: budget.within(before, f), done=lambda f: budget.bias_met(before, f),
                               max_size=options.max_neurons, describe=lambda latent: {"latent": latent}, start=before)
    steps = [{key: value for key, value in step.items() if key not in ("size", "within_budget", "chosen")}
             for step in selection.steps if step["chosen"]]
    return selection.chosen, before, selection.after, steps


def train_social_sae(model: nn.Module, train_images: torch.Tensor, probes: ProbeSet | list[ProbeSet], sae_dir: str,
                     options: NeuronStageOptions | None = None,
                     progress: Callable[[int, int], None] | None = None) -> tuple[nn.Module, list[int], dict]:
    """Train and save the SAE in ``sae_dir`` on unlabelled ``train_images`` (N, 3, H, W) and find
    the social-neuron candidates on the labelled ``probes`` (one set or several draws): returns
    (the SAE, candidate latent ids, a summary for the plan's provenance). Which candidates to
    deactivate is chosen by :func:`surgery.debias.search.search_edits` (with the heads).
    ``progress(step, planned steps)``: the SAE's training."""
    opt = options or NeuronStageOptions()
    site = S.Site("vision", "embedding")
    cache_dir = os.path.join(sae_dir, "cache")
    try:  # the cache is scratch: removed when the SAE is saved, or when anything fails (or SIGTERM)
        cache = S.build_cache(model, site, train_images.split(opt.batch_size_embed), cache_dir, seed=opt.seed)
        cfg = S.SAEConfig(d_in=cache.d, expansion=opt.expansion, kind="batchtopk", k=opt.k, site="embedding",
                          tower="vision", dead_after=max(20 * opt.batch_size, 20_000), matryoshka=opt.matryoshka)
        sae, history = S.train_sae(cache, cfg, S.TrainOptions(steps=opt.steps, epochs=opt.epochs, plateau=opt.plateau,
                                                              batch_size=opt.batch_size, seed=opt.seed),
                                   progress=(lambda step, total, _loss: progress(step, total)) if progress else None)
        metrics_ = S.evaluate_sae(sae, cache)
        S.save_trained(sae, sae_dir, history, metrics_)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    probes = [probes] if isinstance(probes, ProbeSet) else list(probes)
    device = next(model.parameters()).device
    sae.eval()
    with torch.no_grad():
        embs = [torch.cat([model.encode_image(x.to(device)).float().cpu() for x, _ in p.batches(opt.batch_size_embed)])
                for p in probes]  # (n_i, D) per draw
        latents = sae.encode(torch.cat(embs))  # (sum n_i, F)
    groups = torch.cat([p.groups for p in probes])
    try:
        report = S.find_neurons(latents, groups, probes[0].group_names, S.NeuronOptions(tau=opt.tau, top_n=opt.pool),
                                attribute=probes[0].attribute)
    except NeuronError as exc:  # no latent fires often enough in any group: the search goes on without neurons
        log.warning("no social-neuron candidates: %s", exc)
        return sae, [], {"sae": _sae_summary(metrics_, history), "candidates": {}, "no_candidates": str(exc),
                         "alpha": opt.alpha, "form": opt.form}
    summary = {"sae": _sae_summary(metrics_, history),
               "candidates": report.selected, "alpha": opt.alpha, "form": opt.form}
    return sae, report.selected_ids, summary


def _sae_summary(metrics_, history: dict) -> dict:
    return {"nmse": metrics_.nmse, "explained_variance": metrics_.explained_variance, "l0": metrics_.l0,
            "dead_fraction": metrics_.dead_fraction, "steps": history["steps"], "epochs": history["epochs"],
            "stopped_on_plateau": history["stopped_on_plateau"]}


def neuron_edit(sae_dir: str, ids: list[int], options: NeuronStageOptions) -> NeuronEdit:
    """The plan entry deactivating ``ids`` of the embedding-site SAE saved in ``sae_dir``."""
    return NeuronEdit("vision", sae_dir, sorted(ids), options.alpha, options.form, "embedding", kind="batchtopk",
                      k=options.k)
