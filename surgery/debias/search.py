"""One search over every kind of edit: the balance map, head soft-prunings and SAE social-neuron
deactivations.

The shared greedy forward selection (:func:`surgery.audit.set_search.forward_select`) with one
candidate pool: (head, kept scale) pairs and social-neuron candidates. Each step measures every
open latent and the (head, scale) pairs of the ``confirm`` heads that the audit's sweep predicts
best (the sweep's prediction counts a kept head as removed, whatever its scale; it only orders
what is measured), each on the selection draws, and keeps the trial with the lowest mean MaxSkew@K within the
accuracy and recall budgets, until the bias target is met, no trial lowers bias within budget, or
both kinds are at their limits. So the budgets go to whichever edit buys the most bias reduction
at each step; a fixed order (all neurons, then heads) let the neurons spend the image->text
recall budget on small cuts and left no room for a head that alone cut more (world suite, tex2).

The balance edit (:mod:`surgery.debias.balance`) is one more candidate, ``("balance", None,
None)``: a set holding it is measured by fitting the balance map on the selection draws' embeddings
*as the set's removal edits leave them*, and scoring the edited texts (and images) against them.
So a balance chosen first is refitted on top of every head or latent tried after it.

Cost: a latent trial is an SAE pass on cached embeddings (the embeddings of the chosen head set
are computed once per head set); a head trial is one forward pass per selection draw; a balance
fit is a few small linear solves on cached embeddings.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery import sae as S
from surgery.audit.ablation import head_edited_embeddings
from surgery.audit.head_set import head_shortlist
from surgery.audit.probe import CaptionedImages, ProbeSet, edit_figures
from surgery.audit.set_search import forward_select
from surgery.audit.vision import AuditResult
from surgery.debias.balance import BalanceFit, BalanceOptions, Draw, Texts, fit_balance, held_out_queries
from surgery.debias.budget import Budget
from surgery.debias.open_balance import OpenBalanceFit, OpenBalanceOptions, fit_open_balance, open_held_out_queries
from surgery.debias.heads import SearchResult, mean_figures
from surgery.runtime.progress import format_seconds

HeadKey = tuple[int, int]
# A candidate edit: ("head", (layer, head), kept scale), ("latent", latent id, None), ("balance", None, None)
# (the fixed map) or ("open", None, None) (the open-vocabulary balance; the two balances exclude each other)
Edit = tuple[str, object, float | None]
BALANCE: Edit = ("balance", None, None)
OPEN: Edit = ("open", None, None)
BALANCES = (BALANCE, OPEN)


@dataclass
class BalanceCandidate:
    """What a balance trial needs beside the embeddings: its options and the texts that weigh its
    change (normalised (P, D), weights (P,))."""

    options: BalanceOptions
    pool: torch.Tensor
    pool_weights: torch.Tensor
    # the open-vocabulary balance as a candidate too (None: the fixed map only); its bank is the
    # first selection draw's images, as the set's removal edits leave them
    open_options: OpenBalanceOptions | None = None
    fixed: bool = True  # the fixed map as a candidate


@dataclass
class EditSearchOptions:
    budget: Budget  # the selection budget (already tightened by the margins)
    max_heads: int = 8  # most heads edited (0: no head candidates)
    max_neurons: int = 24  # most latents deactivated
    scales: tuple[float, ...] = (0.0, 0.5)  # kept fractions tried for each head (0 = removed)
    confirm: int = 4  # heads measured (at every scale) per step; the others are only predicted
    k: int = 50  # MaxSkew@K
    alpha: float = 1.0  # deactivation strength
    form: str = "error_preserving"  # deactivation form
    batch_size: int = 256
    cache_size: int = 16  # head sets whose embeddings are kept (each: selection images x D floats)
    # stop as soon as the bias target is met (False: go on while a trial lowers bias within the budgets)
    stop_at_target: bool = True
    # the search's own budget: at most this many sets measured (a step then keeps its best trial so
    # far and the search ends), and at most this many seconds (None: no limit). 1000 trials is about
    # 11 steps of the full pool on a world model (1 balance, 8 head and ~80 latent trials per step)
    max_trials: int | None = 1000
    max_seconds: float | None = None
    # head trials cost a forward pass over every selection draw each (latent and balance trials reuse
    # cached embeddings): at most this many head sets are computed (None: no limit); once spent, the
    # search goes on with the cheap candidates. 12 keeps the search to about 6 passes over a 2000-image
    # probe at ViT-B/32 (issue 25); a world model's 8 draws cost little either way
    max_head_sets: int | None = 12


class _EmbeddingCache:
    """Unnormalised embeddings (n_i, D) per selection draw, for a head set; least recently used out."""

    def __init__(self, compute, size: int):
        self.compute, self.size, self.items = compute, size, OrderedDict()
        self.computed = 0  # head sets computed (misses), the search's costly unit

    def __call__(self, heads: dict[HeadKey, float]) -> list[torch.Tensor]:
        key = tuple(sorted(heads.items()))
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.compute(heads)
        self.computed += 1
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def search_edits(model: nn.Module, probes: Sequence[ProbeSet], audit: AuditResult | None, query_emb: torch.Tensor,
                 class_emb: torch.Tensor | None, options: EditSearchOptions, sae=None,
                 latents: Sequence[int] = (), caption_embs: Sequence[torch.Tensor | None] | None = None,
                 progress=None, group_emb: torch.Tensor | None = None,
                 balance: BalanceCandidate | None = None, retrieval: CaptionedImages | None = None,
                 retrieval_emb: torch.Tensor | None = None) -> SearchResult:
    """Choose the balance edit, head edits and latent deactivations together (see the module docstring).

    ``probes``: the selection draws; ``audit``: the head audit (None: no head candidates);
    ``sae`` / ``latents``: the trained SAE and its social-neuron candidates (none: no latents);
    ``caption_embs``: per draw, its images' caption embeddings (or None), for the recall budget;
    ``group_emb`` (G, D): the group prompts, for the group-accuracy budget; ``balance``: the
    balance candidate (None: removal edits only); ``progress(line)``: told after each step;
    ``retrieval`` / ``retrieval_emb (T, D)``: a retrieval set's images and its captions' embeddings
    (``--retrieval``): the recall budgets are measured on it (with every edit of a set applied, as
    on the draws) instead of on the draws' captions.
    All text embeddings are normalised.
    """
    if (retrieval is None) != (retrieval_emb is None):
        raise ValueError("a retrieval set needs its caption embeddings, and they need the set")
    probes = list(probes)
    captions = list(caption_embs) if caption_embs is not None else [None] * len(probes)
    means = audit.means if audit is not None else None
    n_groups = len(probes[0].group_names)
    # room for a step's head trials plus the chosen head set, whose embeddings every latent trial reuses
    size = max(options.cache_size, 2 * options.confirm * len(options.scales) + 2)
    # per head set: each draw's image embeddings, then the retrieval set's (when there is one)
    image_sets = probes + ([retrieval] if retrieval is not None else [])
    cache = _EmbeddingCache(lambda heads: [head_edited_embeddings(model, p, heads, means, options.batch_size)
                                           for p in image_sets], size)

    def split(items: Sequence[Edit]) -> tuple[dict[HeadKey, float], list[int]]:
        heads = {item[1]: item[2] for item in items if item[0] == "head"}
        return heads, [int(item[1]) for item in items if item[0] == "latent"]

    def embeddings(items: Sequence[Edit]) -> list[torch.Tensor]:
        """Per draw, (n_i, D) unnormalised image embeddings with the set's removal edits (and the
        retrieval set's last, when there is one)."""
        heads, ids = split(items)
        fix = S.deactivation(sae, ids, options.alpha, options.form) if ids else None
        return [fix(emb) if fix is not None else emb for emb in cache(heads)]

    def draw_embeddings(items: Sequence[Edit]) -> list[torch.Tensor]:
        return embeddings(items)[:len(probes)]

    def fit(embs: list[torch.Tensor], kind: Edit = BALANCE) -> BalanceFit | OpenBalanceFit:
        draws = [Draw(e, p.groups) for e, p in zip(embs, probes)]
        if kind == OPEN:
            return fit_open_balance(query_emb, group_emb, draws[:1], n_groups, balance.open_options,
                                    {"from": "the first selection draw", "draw_images": len(probes[0])})
        return fit_balance(Texts(query_emb, balance.pool, balance.pool_weights), draws, n_groups, balance.options)

    def chosen_balance(items: Sequence[Edit]) -> Edit | None:
        return next((item for item in items if item in BALANCES), None)

    def evaluate(items: list[Edit]) -> dict:
        embs = embeddings(items)
        texts = [query_emb, class_emb, group_emb, retrieval_emb, *captions]
        kind = chosen_balance(items)
        if kind is not None:
            fitted = fit(embs[:len(probes)], kind)
            embs = [fitted.apply_images(e) for e in embs]
            texts = [None if t is None else F.normalize(fitted.apply_texts(t), dim=-1) for t in texts]
        q, c, g, r, *caps = texts
        figures = mean_figures([edit_figures(F.normalize(emb, dim=-1), probe, q, c, options.k, cap, g)
                                for emb, probe, cap in zip(embs, probes, caps)])
        if retrieval is not None:
            figures.update(retrieval.recalls(F.normalize(embs[-1], dim=-1), r))
        return figures

    def shortlist(chosen: list[Edit], open_: list[Edit]) -> list[Edit]:
        heads, ids = split(chosen)
        out: list[Edit] = [item for item in BALANCES if item in open_]
        left = None if options.max_head_sets is None else max(0, options.max_head_sets - cache.computed)
        if len(heads) < options.max_heads and left != 0:
            open_heads = list(dict.fromkeys(item[1] for item in open_ if item[0] == "head"))
            trials = [item for head in rank_heads(list(heads), open_heads)
                      for item in open_ if item[0] == "head" and item[1] == head]
            out += trials if left is None else trials[:left]
        if len(ids) < options.max_neurons:
            out += [item for item in open_ if item[0] == "latent"]
        return out

    rank_heads = head_shortlist(options.confirm, audit.sweep, probes[0], options.k, query_emb.shape[0]) \
        if audit is not None else None
    candidates: list[Edit] = []
    if balance is not None:
        candidates += [BALANCE] if balance.fixed else []
        candidates += [OPEN] if balance.open_options is not None and group_emb is not None else []
    if options.max_heads > 0 and audit is not None:
        candidates += [("head", head, scale) for head in audit.cheap_rank for scale in options.scales]
    if sae is not None:
        candidates += [("latent", int(i), None) for i in latents]
    before = evaluate([])
    budget = options.budget
    selection = forward_select(
        candidates, evaluate, objective=lambda f: f["max_skew"], allowed=lambda f: budget.within(before, f),
        done=(lambda f: budget.bias_met(before, f)) if options.stop_at_target else (lambda f: False),
        max_size=options.max_heads + options.max_neurons + 1,
        conflicts=_conflict, shortlist=shortlist,
        describe=_describe, start=before,
        on_step=_reporter(progress, options.k, options.max_heads + options.max_neurons + 1, options.max_trials),
        max_trials=options.max_trials, max_seconds=options.max_seconds)
    met = budget.bias_met(before, selection.after)
    heads, ids = split(selection.chosen)
    fitted = held_out = None
    kind = chosen_balance(selection.chosen)
    if kind is not None:
        embs = draw_embeddings(selection.chosen)
        fitted = fit(embs, kind)
        draws = [Draw(e, p.groups) for e, p in zip(embs, probes)]
        if kind == OPEN:
            held_out = open_held_out_queries(query_emb, probes[0].queries, group_emb, draws[:1], draws, n_groups,
                                             options.k, balance.open_options)
        else:
            held_out = held_out_queries(Texts(query_emb, balance.pool, balance.pool_weights), probes[0].queries,
                                        draws, n_groups, balance.options)
    removal = [item for item in selection.chosen if item not in BALANCES]
    parts = {"balance only": [kind] if fitted is not None else None, "removal only": removal or None,
             "both": selection.chosen if fitted is not None and removal else None}
    contributions = {name: evaluate(items) if items is not None else None for name, items in parts.items()}
    return SearchResult(heads, met, before, selection.after, _compact(selection.steps), latents=ids,
                        order=[_name(item) for item in selection.chosen], balance=fitted,
                        contributions=contributions, held_out=held_out,
                        budget={"trials": selection.trials, "seconds": round(selection.seconds, 2),
                                "max_trials": options.max_trials, "max_seconds": options.max_seconds,
                                "head_sets": cache.computed, "max_head_sets": options.max_head_sets,
                                "stopped_by": selection.stopped_by})


def _conflict(a: Edit, b: Edit) -> bool:
    """One head at two scales cannot be chosen together, nor the two balances; any candidate
    conflicts with itself."""
    return a == b or (a[0] == b[0] == "head" and a[1] == b[1]) or (a in BALANCES and b in BALANCES)


def _describe(item: Edit) -> dict:
    if item[0] == "head":
        return {"head": list(item[1]), "scale": item[2]}
    if item == BALANCE:
        return {"balance": True}
    if item == OPEN:
        return {"balance": "open"}
    return {"latent": item[1]}


def _name(item: Edit) -> str:
    if item == BALANCE:
        return "balance"
    if item == OPEN:
        return "open balance"
    return f"L{item[1][0]}.H{item[1][1]}@{item[2]:g}" if item[0] == "head" else f"latent {item[1]}"


def _compact(steps: list[dict]) -> list[dict]:
    """Every head and balance trial and every kept step (latent trials that were not kept are many
    and cheap: they are counted, not listed)."""
    return [step for step in steps if "head" in step or "balance" in step or step["chosen"]]


def _reporter(progress, k: int, max_size: int, max_trials: int | None):
    """Step lines with the time the step took and the most the rest can take: the steps left at the
    mean time per step so far, or the trials left in the budget at the mean time per trial, the less."""
    if progress is None:
        return None
    started, done = time.monotonic(), {"trials": 0}

    def report(size: int, kept, figures: dict, trials: int) -> None:
        if kept is None:
            progress(f"edit step {size}: none of {trials} trials lowered MaxSkew@{k} within budget; stopping")
            return
        done["trials"] += trials
        elapsed = time.monotonic() - started
        left = (max_size - size) * elapsed / size
        if max_trials is not None:
            left = min(left, max(0, max_trials - done["trials"]) * elapsed / max(1, done["trials"]))
        progress(f"edit step {size}: {_name(kept)} -> MaxSkew@{k} {figures['max_skew']:.3f} "
                 f"(best of {trials} trials; {format_seconds(elapsed)} so far, at most {max_size - size} more "
                 f"steps, about {format_seconds(left)} at most)")
    return report
