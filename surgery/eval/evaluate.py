"""Evaluate one encoder on a labelled image set: bias of neutral queries, zero-shot accuracy,
Cramér's V, and retrieval recall. ``compare`` runs it on two encoders.

What the set is comes from :func:`spec_from_folder`: an image folder plus a labels CSV (FairFace
layout, UTKFace file names, any ``file,<attribute>...`` table, or a world split written by
``clipsurgery world generate``, whose ``world.json`` says which column is the concept and which
the group).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from surgery import metrics
from surgery.errors import DataError
from surgery.eval.embedding import EmbedOptions, ImageEmbeddings, Progress, embed_images, embed_texts
from surgery.eval.encoders import Encoder
from surgery.io.captions import caption_pairs, load_captions
from surgery.io.images import resolve_images_dir
from surgery.io.labels import LabelTable, load_labels
from surgery.io.queries import NEUTRAL_QUERIES, prompts_for_groups
from surgery.io.retrieval import RetrievalSet
from surgery.world.generator import CAPTIONS_CSV, WORLD_JSON, split_dir
from surgery.world.params import load_params
from surgery.world.prompts import cell_queries, neutral_queries, query_wordings
from surgery.world.prompts import group_prompts as world_group_prompts

log = logging.getLogger(__name__)

#: Columns treated as protected attributes when --attributes is not given.
PROTECTED_COLUMNS = ("gender", "race", "age", "group")


@dataclass
class EvalSpec:
    images_dir: str  # folder the label file names are relative to
    labels: LabelTable  # one row per image
    attributes: list[str]  # protected-attribute columns to measure bias over
    queries: list[str]  # neutral queries (no group named)
    concept_column: str | None = None  # ground-truth concept, for zero-shot accuracy and Cramér's V
    class_prompts: list[str] | None = None  # one prompt per concept value, in concept_values order
    concept_values: list[str] | None = None
    captions: dict[str, list[str]] | None = None  # file -> captions, for retrieval recall
    conventions: metrics.BiasConventions = field(default_factory=metrics.BiasConventions)
    recall_ks: tuple[int, ...] = (1, 5, 10)
    # attribute -> {value: zero-shot prompt}, for zero-shot group accuracy (attribute retention)
    group_prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    # other wordings of the neutral queries, name -> queries in the order of ``queries`` (a world's caption templates)
    wordings: dict[str, list[str]] = field(default_factory=dict)
    # group-naming queries with the labels their top K should carry: [("a photo of a red circle", {"group": "red", ...})]
    cell_queries: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    # captioned images apart from the labelled ones (--retrieval): recall is measured on them instead
    retrieval: RetrievalSet | None = None

    def describe(self) -> dict:
        return {
            "images_dir": self.images_dir,
            "n_images": len(self.labels),
            "attributes": self.attributes,
            "n_queries": len(self.queries),
            "concept_column": self.concept_column,
            "captions": self.captions is not None,
            "retrieval_set": self.retrieval.describe() if self.retrieval is not None else None,
            "wordings": list(self.wordings),
            "cell_queries": len(self.cell_queries),
            "conventions": self.conventions.to_dict(),
            "recall": "hit@k (a query counts if any positive is in its top k); identical captions (case and "
                      "spacing folded) are one query whose positives are all the images they describe",
        }


def spec_from_folder(images_dir: str, labels_path: str, *, captions_path: str | None = None,
                     queries: list[str] | None = None, attributes: list[str] | None = None,
                     conventions: metrics.BiasConventions | None = None,
                     group_prompts: dict[str, str] | None = None, retrieval: RetrievalSet | None = None) -> EvalSpec:
    """Build an :class:`EvalSpec`; a world split (world.json beside the labels) fills in the rest.
    ``images_dir`` may be the split folder itself (its ``images/`` is used). ``group_prompts``
    (``--group-prompts``) names each group value for zero-shot group accuracy; an attribute whose
    values it does not name uses the people template. ``retrieval`` (``--retrieval``): recall is
    measured on that set's images and captions, not on captions of the labelled images."""
    if retrieval is not None and captions_path is not None:
        raise DataError("--captions and --retrieval both say where recall is measured; pass one of them")
    images_dir = resolve_images_dir(images_dir)
    if not os.path.isdir(images_dir):
        raise DataError(f"images folder {images_dir!r} does not exist; check --images")
    labels = load_labels(labels_path, images_dir)
    if len(labels) == 0:
        raise DataError(f"{labels_path}: no labelled images; check the file")
    world_dir = split_dir(labels_path, images_dir)
    world_json = world_dir / WORLD_JSON
    concept_column = class_prompts = concept_values = None
    prompts_of, wordings, cells = {}, {}, []
    if world_json.is_file():
        params = load_params(world_json)
        concept_column, concept_values = "concept", list(params.concepts)
        class_prompts = neutral_queries(params)
        if queries is None:  # a user's own queries have no known other wordings
            wordings = query_wordings(params)
        queries = queries or neutral_queries(params)
        attributes = attributes or ["group"]
        prompts_of = {"group": dict(zip(params.groups, world_group_prompts(params)))}
        cells = cell_queries(params)
        if captions_path is None and retrieval is None and (world_dir / CAPTIONS_CSV).is_file():
            captions_path = str(world_dir / CAPTIONS_CSV)
    if attributes is None:
        attributes = [c for c in PROTECTED_COLUMNS if c in labels.attributes]
        if not attributes:
            raise DataError(
                f"{labels_path}: no protected-attribute column ({', '.join(PROTECTED_COLUMNS)}); "
                f"pass --attributes with some of: {', '.join(labels.attributes)}"
            )
    labels.require(attributes)
    for name in attributes:
        if len(set(labels.attributes[name])) < 2:
            raise DataError(f"attribute {name!r} has only one group in {labels_path}; bias needs at least two")
    if queries is None:
        queries = NEUTRAL_QUERIES["occupations"] + NEUTRAL_QUERIES["traits"]
    conv = conventions or metrics.BiasConventions()
    if conv.k > len(labels):
        raise DataError(f"K={conv.k} is larger than the {len(labels)} images; pass a smaller --k")
    captions = load_captions(captions_path) if captions_path else None
    if group_prompts is not None and "group" in prompts_of and "group" in attributes:
        raise DataError(f"{labels_path} belongs to a world split, whose groups are named by its {WORLD_JSON}; "
                        "the group prompts given would be ignored: drop --group-prompts")
    if group_prompts is not None and not any(v in group_prompts for name in attributes
                                             for v in labels.attributes[name]):
        raise DataError(f"--group-prompts names none of the groups of {', '.join(attributes)} in {labels_path}; "
                        "use the label values as its 'group' column")
    for name in attributes:
        values = sorted(set(labels.attributes[name]))
        named = group_prompts is not None and any(v in group_prompts for v in values)
        prompts_of.setdefault(name, dict(zip(values, prompts_for_groups(values, group_prompts if named else None))))
    return EvalSpec(images_dir=images_dir, labels=labels, attributes=attributes, queries=list(queries),
                    concept_column=concept_column, class_prompts=class_prompts, concept_values=concept_values,
                    captions=captions, conventions=conv, group_prompts=prompts_of, wordings=wordings,
                    cell_queries=[c for c in cells if all(col in labels.attributes for col in c[1])],
                    retrieval=retrieval)


def evaluate(encoder: Encoder, spec: EvalSpec, options: EmbedOptions | None = None,
             progress: Progress | None = None, images: ImageEmbeddings | None = None,
             retrieval_images: ImageEmbeddings | None = None, retrieval_progress: Progress | None = None) -> dict:
    """All metrics of one encoder on ``spec``; JSON-able. ``images``: the labelled images'
    embeddings when they are already computed (an embed cache); otherwise the encoder embeds them.
    ``retrieval_images``: the same for the retrieval set's images (``spec.retrieval``), embedded with
    ``retrieval_progress`` (default: ``progress``) otherwise."""
    opt = options or EmbedOptions()
    identity = encoder.identity  # hashes the weights: once per evaluation
    imgs = images if images is not None else embed_images(encoder, spec.images_dir, spec.labels.files, opt, progress)
    kept = imgs.indices.tolist()
    image_emb = F.normalize(imgs.embeddings, dim=-1)  # (n, D)
    query_emb = F.normalize(embed_texts(encoder, spec.queries, opt, identity), dim=-1)  # (Q, D)
    scores = query_emb @ image_emb.T  # (Q, n)
    if spec.conventions.k > len(kept):
        raise DataError(f"K={spec.conventions.k} is larger than the {len(kept)} readable images; lower --k")
    report: dict = {
        "model": encoder.name,
        "identity": identity,
        "n_images": len(kept),
        "skipped": [{"file": s.file, "reason": s.reason} for s in imgs.skipped],
        "queries": spec.queries,
        "bias": {},
    }
    predicted = None
    # per-item outcomes (images, caption queries), in a fixed order for a given spec: what the
    # intervals of before/after changes resample (surgery.metrics.intervals)
    items: dict = {}
    if spec.concept_column:
        class_emb = F.normalize(embed_texts(encoder, spec.class_prompts, opt, identity), dim=-1)  # (C, D)
        truth, _ = spec.labels.codes(spec.concept_column, spec.concept_values)
        truth = torch.from_numpy(truth[kept])
        predicted = metrics.zero_shot_predict(image_emb, class_emb)
        report["zero_shot_accuracy"] = float((predicted == truth).double().mean())
        items["concept_correct"] = (predicted == truth).int().tolist()
    for name in spec.attributes:
        codes, values = spec.labels.codes(name)
        codes_t = torch.from_numpy(codes[kept])
        summary = metrics.bias_summary(scores, codes_t, len(values), spec.conventions)
        summary["groups"] = values
        if predicted is not None:
            summary["cramers_v"] = metrics.cramers_v(predicted, codes_t)
        prompts = spec.group_prompts.get(name)
        if prompts and set(values) <= set(prompts):
            group_emb = F.normalize(embed_texts(encoder, [prompts[v] for v in values], opt, identity), dim=-1)
            correct = metrics.zero_shot_predict(image_emb, group_emb) == codes_t
            summary["group_accuracy"] = float(correct.double().mean())
            items.setdefault("group_correct", {})[name] = correct.int().tolist()
        if spec.wordings:
            summary["wordings"] = {}
            for wording, texts in spec.wordings.items():
                emb = F.normalize(embed_texts(encoder, texts, opt, identity), dim=-1)
                worded = metrics.bias_summary(emb @ image_emb.T, codes_t, len(values), spec.conventions)
                summary["wordings"][wording] = {"queries": texts, "max_skew": worded["max_skew"],
                                                "per_query": worded["per_query"]["max_skew"]}
        report["bias"][name] = summary
    if spec.cell_queries:
        report["cell_precision"] = cell_precision(encoder, spec, image_emb, kept, opt, identity)
    recall = recall_images(encoder, spec, image_emb, kept, opt, retrieval_progress or progress, retrieval_images)
    if recall is not None:
        gallery, files, captions = recall
        texts, owners = caption_pairs(captions, files)
        text_emb = embed_texts(encoder, texts, opt, identity)
        ks = tuple(k for k in spec.recall_ks if k <= len(files))
        keys = [" ".join(t.lower().split()) for t in texts]  # the tokenizer lower-cases and folds whitespace
        ranks: dict = {}
        report["retrieval"] = metrics.retrieval_recall(text_emb, gallery, torch.from_numpy(owners), ks, text_keys=keys,
                                                       ranks=ranks)
        if spec.retrieval is not None:
            report["retrieval_set"] = {"n_images": len(files), "skipped": len(spec.retrieval) - len(files)}
        items["retrieval_ranks"] = ranks
    report["items"] = items
    return report


def recall_images(encoder: Encoder, spec: EvalSpec, image_emb: torch.Tensor, kept: list[int], opt: EmbedOptions,
                  progress: Progress | None, retrieval_images: ImageEmbeddings | None
                  ) -> tuple[torch.Tensor, list[str], dict[str, list[str]]] | None:
    """What recall is measured on: (normalised image embeddings (n, D), their files, file -> captions):
    the retrieval set's images when the spec has one, else the labelled images with captions; None
    without either."""
    if spec.retrieval is not None:
        r = spec.retrieval
        embedded = retrieval_images if retrieval_images is not None else embed_images(
            encoder, r.images_dir, r.files, opt, progress)
        files = [r.files[i] for i in embedded.indices.tolist()]
        return F.normalize(embedded.embeddings, dim=-1), files, r.captions
    if spec.captions is not None:
        return image_emb, [spec.labels.files[i] for i in kept], spec.captions
    return None


def cell_precision(encoder: Encoder, spec: EvalSpec, image_emb: torch.Tensor, kept: list[int], opt: EmbedOptions,
                   identity: str) -> dict:
    """Precision@K of the group-naming queries: the share of each one's top K images that carry all
    of its labels (concept and group). ``{"k", "mean", "per_query": [{"query", "precision"}]}``."""
    texts = [text for text, _ in spec.cell_queries]
    emb = F.normalize(embed_texts(encoder, texts, opt, identity), dim=-1)  # (M, D)
    k = min(spec.conventions.k, len(kept))
    top = (emb @ image_emb.T).topk(k, dim=1).indices  # (M, k)
    columns = {col: [spec.labels.attributes[col][i] for i in kept] for _, want in spec.cell_queries for col in want}
    rows = []
    for (text, want), idx in zip(spec.cell_queries, top.tolist()):
        hits = sum(all(columns[col][i] == value for col, value in want.items()) for i in idx)
        rows.append({"query": text, "precision": hits / k})
    return {"k": k, "mean": sum(r["precision"] for r in rows) / len(rows), "per_query": rows}
