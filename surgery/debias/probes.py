"""What the edits are chosen on and reported on: the probes of a debias run and their text embeddings.

A folder probe (``--images --labels``) is split into a selection part and a held-out report part
(``--holdout``), and so is its retrieval set (``--retrieval``); a world model's probes are draws
of its own world (several selection draws, its eval split for the report).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from surgery.audit.probe import CaptionedImages, ProbeSet, captioned_images, folder_probe_set, world_probe_set
from surgery.debias.options import DebiasOptions
from surgery.errors import SurgeryError
from surgery.eval.evaluate import PROTECTED_COLUMNS, EvalSpec, spec_from_folder
from surgery.io.images import resolve_images_dir
from surgery.io.labels import load_labels, split_label_table, write_labels_csv
from surgery.io.queries import check_query_count, unique_queries
from surgery.io.retrieval import RetrievalSet
from surgery.metrics.bias import BiasConventions
from surgery.model.encode import text_embeddings
from surgery.model.loading import LoadedModel
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import (
    CAPTIONS_CSV,
    WORLD_JSON,
    balanced_size,
    check_eval_size,
    generate,
    split_dir,
    write_split,
)
from surgery.world.params import WorldParams
from surgery.world.prompts import neutral_queries

SELECTION_SEED_OFFSET = 1000  # the selection probe is another draw of the world than the report's
TEXT_BATCH = 256  # texts per forward pass of the text tower (a probe of thousands of captions stays in memory)


@dataclass
class Probes:
    """What the edits are chosen on (``selection``: one folder probe or several world draws) and
    the report's images (``eval_images``/``eval_labels``, checked as ``spec``)."""

    selection: list[ProbeSet]
    eval_images: str | None  # None: no report (clipsurgery balance)
    eval_labels: str | None
    world: WorldParams | None  # a world model's world: the SAE trains on its train split; None: on the probe's images
    source: dict | None = None  # folder probes: recorded in the plan's provenance
    spec: EvalSpec | None = None
    eval_name: str | None = None  # how the report names generated images (their temp folder is gone after the run)
    # a retrieval set's selection part (--retrieval): the search measures recall on it, its captions anchor the balance
    retrieval: CaptionedImages | None = None

    @property
    def first(self) -> ProbeSet:
        return self.selection[0]


@dataclass
class Prompts:
    """Normalised text embeddings the searches score with: neutral queries (Q, D), class prompts
    (C, D) or None, group prompts (G, D), per selection draw each image's caption (N, D) or None,
    and every distinct caption of the selection draws and the retrieval set (U, D) (texts a balance
    edit must not move needlessly)."""

    queries: torch.Tensor
    classes: torch.Tensor | None
    captions: list[torch.Tensor | None]
    groups: torch.Tensor
    distinct_captions: torch.Tensor | None = None
    retrieval: torch.Tensor | None = None  # (T, D) the retrieval set's captions (selection part), one per row


Say = Callable[[str], None]


def checked_queries(queries: list[str] | None) -> list[str] | None:
    """The user's queries without repeats (first order kept), refused up front above the cap."""
    if queries is None:
        return None
    queries = unique_queries(list(queries))
    check_query_count(queries, "--queries")
    return queries



def build_probes(loaded: LoadedModel, model_in: str, options: DebiasOptions, work: str, images_dir: str | None,
                 labels_path: str | None, attribute: str | None, say: Say, queries: list[str] | None = None,
                 group_prompts: dict[str, str] | None = None, retrieval: RetrievalSet | None = None) -> Probes:
    """Folder probes (``--images``: a held-out part for the report) or draws of a world model's own world."""
    params = world_params_of(loaded)
    report_retrieval = None
    if retrieval is not None and not images_dir:
        raise SurgeryError("--retrieval goes with an --images/--labels probe (a world model's draws carry their own "
                           "captions)")
    if images_dir:
        images_dir = resolve_images_dir(images_dir)
        eval_labels = selection_labels = labels_path
        if options.holdout > 0:
            selection_labels, eval_labels = split_folder_labels(images_dir, labels_path, attribute, options.holdout,
                                                                os.path.join(work, "split"))
            say(f"folder probe: choosing the edits on {1 - options.holdout:.0%} of the labelled images, reporting on "
                f"the other {options.holdout:.0%} (--holdout)")
        else:
            say("warning: --holdout 0: the report is on the same images the edits were chosen on")
        probe = folder_probe_set(images_dir, selection_labels, attribute, loaded.preprocess, queries=queries,
                                 group_prompts=group_prompts)
        if group_prompts is None and probe.concepts is None:
            say(f"group prompts: the people template ({probe.group_prompts[0]!r}, ...): they anchor the balance edit "
                "and measure group accuracy; pass --group-prompts FILE when the groups are not people's")
        probes = Probes([probe], images_dir, eval_labels, None,
                        source={"images": images_dir, "labels": labels_path, "holdout": options.holdout,
                                "selection_images": len(probe)})
        if retrieval is not None:
            chosen_on, report_retrieval = retrieval.split(options.holdout)
            attach_retrieval(probes, chosen_on, loaded.preprocess, whole=retrieval,
                             report_images=len(report_retrieval))
            say(f"retrieval set: {len(retrieval)} captioned images ({retrieval.n_captions} captions); the recall budgets "
                f"are measured on them" + (f", the edits chosen on {len(probes.retrieval)} and reported on the other "
                                           f"{len(report_retrieval)}" if options.holdout > 0 else "")
                + "; their captions anchor the balance edit")
    elif params is not None:
        n = world_probe_size(params, options)
        selection = world_selection(loaded, params, options, queries)
        write_split(generate(params, "eval", n), os.path.join(work, "eval"))
        probes = Probes(selection, os.path.join(work, "eval", "images"), os.path.join(work, "eval", "labels.csv"),
                        params, eval_name=f"the model's own world, eval split (seed {params.seed}, {n} images, "
                                          f"regenerate with: clipsurgery world generate --like MODEL --n {n})")
        say(f"probing on {len(selection)} generated draws of the model's world (selection seeds "
            f"{params.seed + SELECTION_SEED_OFFSET}+; report on its own eval split, {n} images)")
    else:
        raise SurgeryError(f"vision surgery needs probe images: pass --images DIR --labels CSV "
                           f"({model_in} carries no world to generate them from)")
    # The report's images are checked (K, groups, labels) before anything is chosen or written.
    probes.spec = spec_from_folder(probes.eval_images, probes.eval_labels, conventions=BiasConventions(k=options.k),
                                   queries=report_queries(queries, probes.world),
                                   group_prompts=group_prompts if images_dir else None, retrieval=report_retrieval)
    return probes



def attach_retrieval(probes: Probes, chosen_on: RetrievalSet, preprocess: dict, whole: RetrievalSet | None = None,
                     **source) -> None:
    """Folder probes measure recall on ``chosen_on`` (a retrieval set, or its selection part) instead of
    their own captions, whose distinct captions then anchor the balance; the plan records ``whole``
    (default: ``chosen_on``) with ``source``."""
    probes.retrieval = captioned_images(chosen_on, preprocess)
    probes.selection = [dataclasses.replace(p, captions=None) for p in probes.selection]  # recall is the set's
    probes.source["retrieval"] = {**(whole or chosen_on).describe(), "selection_images": len(probes.retrieval),
                                  **source}


def world_probe_size(params: WorldParams, options: DebiasOptions) -> int:
    """Images per generated draw: ``--n-probe``, or about 1200 (a multiple of concepts x groups)."""
    return balanced_size(params) if options.n_probe is None else check_eval_size(params, options.n_probe, "--n-probe")



def world_selection(loaded: LoadedModel, params: WorldParams, options: DebiasOptions,
                    queries: list[str] | None = None) -> list[ProbeSet]:
    """The selection draws of a world model: other seeds of its world than the report's."""
    n = world_probe_size(params, options)
    selection = [world_probe_set(dataclasses.replace(params, seed=params.seed + SELECTION_SEED_OFFSET + i),
                                 loaded.preprocess, n) for i in range(max(1, options.selection_draws))]
    return [dataclasses.replace(p, queries=list(queries)) for p in selection] if queries else selection



def embed_prompts(loaded: LoadedModel, probes: Probes, say: Say) -> Prompts:
    """The neutral queries, class prompts and captions of the selection probes, and which budgets they can check."""
    probe = probes.first
    retrieval = probes.retrieval.captions if probes.retrieval is not None else []
    distinct = sorted({c for p in probes.selection for c in (p.captions or [])} | set(retrieval))
    # every distinct text once (a world's class prompts are its queries; captions repeat across draws)
    texts = list(dict.fromkeys([*probe.queries, *(probe.class_prompts or []), *probe.group_prompts, *distinct]))
    row = {text: i for i, text in enumerate(texts)}
    emb = torch.cat([text_embeddings(loaded.model, texts[i:i + TEXT_BATCH], loaded.tokenizer)
                     for i in range(0, len(texts), TEXT_BATCH)])  # (T, D)
    pick = lambda items: emb[torch.tensor([row[t] for t in items], dtype=torch.long)]  # noqa: E731
    prompts = Prompts(
        queries=pick(probe.queries),
        classes=pick(probe.class_prompts) if probe.class_prompts else None,
        captions=[pick(p.captions) if p.captions is not None else None for p in probes.selection],
        groups=pick(probe.group_prompts),
        distinct_captions=pick(distinct) if distinct else None,
        retrieval=pick(retrieval) if retrieval else None)
    if prompts.classes is None or probe.concepts is None:
        say("warning: the probe has no concept labels, so the accuracy budget cannot be checked")
    if all(c is None for c in prompts.captions) and prompts.retrieval is None:
        say("warning: the probe has no captions, so the recall budget cannot be checked (--retrieval CSV: "
            "captioned images to measure it on)")
    return prompts



def report_queries(queries: list[str] | None, world: WorldParams | None) -> list[str] | None:
    """The report's neutral queries: the ones given, and on a world model also the world's other
    concept queries (held out of the fit: the report measures what the edit does to queries nobody
    listed)."""
    if not queries:
        return None
    return list(queries) + ([q for q in neutral_queries(world) if q not in queries] if world is not None else [])



def split_folder_labels(images_dir: str, labels_path: str, attribute: str | None, holdout: float,
                        out_dir: str) -> tuple[str, str]:
    """Write the (selection, report) labels CSVs of a folder probe into ``out_dir``.

    ``holdout`` of each group's images (``attribute``, or the first protected column present)
    go to the report. A world split's ``world.json`` and ``captions.csv`` are copied beside both,
    so the report still finds its concepts and captions.
    """
    table = load_labels(labels_path, images_dir)
    stratify = attribute if attribute in table.attributes else next(
        (c for c in PROTECTED_COLUMNS if c in table.attributes), None)
    keep, held = split_label_table(table, holdout, stratify)
    if len(keep) == 0 or len(held) == 0:
        raise SurgeryError(f"--holdout {holdout} leaves no images on one side of the {len(table)} labelled ones; "
                           "pass more images or another --holdout")
    os.makedirs(out_dir, exist_ok=True)
    side = str(split_dir(labels_path, images_dir))
    for name in (WORLD_JSON, CAPTIONS_CSV):
        if os.path.isfile(os.path.join(side, name)):
            shutil.copyfile(os.path.join(side, name), os.path.join(out_dir, name))
    paths = os.path.join(out_dir, "selection.csv"), os.path.join(out_dir, "report.csv")
    write_labels_csv(keep, paths[0])
    write_labels_csv(held, paths[1])
    return paths
