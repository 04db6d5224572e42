"""Probe sets for the audit: labelled images (or prompts) streamed in batches.

A vision probe set holds preprocessed images (N, 3, H, W) with protected-group labels, optional
concept labels, and the neutral queries / class prompts whose retrieval the bias metric scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from surgery import metrics
from surgery.errors import DataError
from surgery.eval.evaluate import PROTECTED_COLUMNS
from surgery.io.captions import load_captions
from surgery.io.images import ImageFolderDataset, data_hash, resolve_images_dir
from surgery.io.labels import load_labels
from surgery.io.queries import NEUTRAL_QUERIES, prompts_for_groups
from surgery.io.retrieval import RetrievalSet
from surgery.metrics.retrieval import retrieval_recall
from surgery.model.preprocess import image_transform, images_to_tensor
from surgery.world.generator import CAPTIONS_CSV, WORLD_JSON, generate, split_dir
from surgery.world.params import load_params
from surgery.world.prompts import group_prompts as world_group_prompts
from surgery.world.prompts import neutral_queries


class FolderImages:
    """Preprocessed images of a folder, decoded on demand: ``images[a:b]`` -> (b-a, 3, H, W).

    Keeps the probe set's memory independent of its size (only one batch is decoded at a time).
    """

    def __init__(self, dataset):
        self.dataset = dataset  # surgery.io.images.ImageFolderDataset (header-scanned)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        items = [self.dataset[j] for j in range(*sl.indices(len(self)))]
        bad = [item for item in items if not isinstance(item, tuple)]
        if bad:
            name = self.dataset.files[bad[0].index]
            raise DataError(f"probe image {name!r} could not be decoded ({bad[0].reason}); fix or remove it")
        return torch.stack([torch.as_tensor(x) for x, _ in items])


def image_batches(images: torch.Tensor | FolderImages, batch_size: int) -> Iterator[tuple[torch.Tensor, slice]]:
    """(images (b, 3, H, W), slice into ``images``) in order."""
    for start in range(0, len(images), batch_size):
        sl = slice(start, min(start + batch_size, len(images)))
        yield images[sl], sl


@dataclass
class ProbeSet:
    images: torch.Tensor | FolderImages  # (N, 3, H, W) preprocessed, or decoded per batch
    groups: torch.Tensor  # (N,) int64 protected-group id
    group_names: list[str]  # G names
    queries: list[str]  # neutral queries (no group named)
    group_prompts: list[str]  # one prompt per group, for zero-shot group accuracy
    concepts: torch.Tensor | None = None  # (N,) int64 concept id, for accuracy
    class_prompts: list[str] | None = None  # one prompt per concept
    attribute: str = "group"  # the protected attribute's name
    captions: list[str] | None = None  # (N,) one caption per image, for text->image recall
    source: dict = field(default_factory=dict)  # where it came from (hash, world params, folder)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.groups.shape != (n,):
            raise DataError(f"probe set has {n} images but {tuple(self.groups.shape)} group labels")
        present = torch.unique(self.groups).numel()
        if present < 2:
            raise DataError(f"attribute {self.attribute!r} has a single group in the probe set; bias needs two or more")
        if len(self.group_prompts) != len(self.group_names):
            raise DataError("give one group prompt per group")
        if self.concepts is not None and self.class_prompts is None:
            raise DataError("concept labels need class prompts (one per concept)")
        if self.captions is not None and len(self.captions) != n:
            raise DataError(f"probe set has {n} images but {len(self.captions)} captions; give one per image")

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, slice]]:
        """(images (b, 3, H, W), slice into the set) in order."""
        return image_batches(self.images, batch_size)


def caption_recall(image_emb: torch.Tensor, caption_emb: torch.Tensor, captions: list[str], k: int = 5) -> float:
    """Text->image hit@K of each image's caption, identical captions merged into one query whose
    positives are every image they describe (the convention of ``clipsurgery eval``).
    ``image_emb (N, D)``, ``caption_emb (N, D)``: the embedding of image i's caption."""
    return caption_recalls(image_emb, caption_emb, captions, k)["t2i"]


def caption_recalls(image_emb: torch.Tensor, caption_emb: torch.Tensor, captions: list[str], k: int = 5,
                    owners: torch.Tensor | None = None) -> dict:
    """``{"t2i", "i2t"}``: hit@K in both directions, identical captions merged (as ``clipsurgery
    eval`` does): a caption text is one text->image query whose positives are every image it
    describes, and one entry of the image->text gallery. ``image_emb (N, D)``, ``caption_emb (T, D)``,
    ``owners (T,)``: the image of each caption (None: caption i is image i's, T = N)."""
    keys = [" ".join(t.lower().split()) for t in captions]
    owners = torch.arange(len(captions)) if owners is None else owners
    out = retrieval_recall(caption_emb, image_emb, owners, (k,), text_keys=keys)
    # image->text needs K distinct captions; with fewer, every image's caption is in its top K
    return {"t2i": out[f"t2i@{k}"], "i2t": out.get(f"i2t@{k}", 1.0)}


@dataclass
class CaptionedImages:
    """A retrieval set's images with their captions (``--retrieval``), for the recall budgets of an
    edit search: ``captions (T,)`` with ``owners (T,)``, the index of each caption's image."""

    images: torch.Tensor | FolderImages  # (N, 3, H, W) preprocessed, or decoded per batch
    captions: list[str]
    owners: torch.Tensor
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, slice]]:
        """(images (b, 3, H, W), slice into the set) in order."""
        return image_batches(self.images, batch_size)

    def recalls(self, image_emb: torch.Tensor, caption_emb: torch.Tensor) -> dict:
        """``{"recall", "recall_i2t"}`` (hit@5, the keys of :func:`edit_figures`) of normalised
        ``image_emb (N, D)`` and ``caption_emb (T, D)``."""
        both = caption_recalls(image_emb, caption_emb, self.captions, owners=self.owners)
        return {"recall": both["t2i"], "recall_i2t": both["i2t"]}


def captioned_images(retrieval: RetrievalSet, preprocess: dict, max_skipped_fraction: float = 0.05) -> CaptionedImages:
    """A retrieval set's images (decoded per batch, unreadable ones left out with their captions)."""
    dataset = ImageFolderDataset(retrieval.images_dir, retrieval.files, image_transform(preprocess),
                                 max_skipped_fraction=max_skipped_fraction)
    captions, owners = [], []
    for row, index in enumerate(dataset.indices):
        for text in retrieval.captions[retrieval.files[index]]:
            captions.append(text)
            owners.append(row)
    return CaptionedImages(FolderImages(dataset), captions, torch.tensor(owners, dtype=torch.long),
                           source={**retrieval.describe(), "skipped": [s.file for s in dataset.skipped]})


def edit_figures(emb: torch.Tensor, probe: ProbeSet, query_emb: torch.Tensor, class_emb: torch.Tensor | None,
                 k: int, caption_emb: torch.Tensor | None = None, group_emb: torch.Tensor | None = None) -> dict:
    """The figures every edit is judged by, on a probe set's images.

    ``emb (N, D)``: the (possibly edited) L2-normalised image embeddings of ``probe``'s images;
    ``query_emb (Q, D)`` neutral queries, ``class_emb (C, D)`` class prompts (or None),
    ``caption_emb (N, D)`` each image's caption (or None), ``group_emb (G, D)`` the group prompts
    (or None). Returns ``max_skew`` (mean MaxSkew@K over the queries), ``accuracy`` (zero-shot
    concept accuracy, when classes and concepts are known), ``recall`` (text->image hit@5 of the
    captions) and ``recall_i2t`` (image->text hit@5), see :func:`caption_recalls`, and
    ``group_accuracy`` (zero-shot group accuracy with the group prompts: attribute retention).
    """
    out = {"max_skew": float(metrics.max_skew_at_k(query_emb @ emb.T, probe.groups, k, len(probe.group_names)).mean())}
    if class_emb is not None and probe.concepts is not None:
        out["accuracy"] = float(((class_emb @ emb.T).argmax(0) == probe.concepts).double().mean())
    if caption_emb is not None:
        both = caption_recalls(emb, caption_emb, probe.captions)
        out["recall"], out["recall_i2t"] = both["t2i"], both["i2t"]
    if group_emb is not None:
        out["group_accuracy"] = float(((group_emb @ emb.T).argmax(0) == probe.groups).double().mean())
    return out


def world_probe_set(params, preprocess: dict, n: int = 1200) -> ProbeSet:
    """A balanced evaluation split of a planted-bias world as a probe set (the model's preprocessing)."""
    split = generate(params, "eval", n)
    return ProbeSet(
        images=images_to_tensor(split.images, preprocess),
        groups=torch.from_numpy(split.groups), group_names=list(params.groups),
        queries=neutral_queries(params), group_prompts=world_group_prompts(params),
        concepts=torch.from_numpy(split.concepts), class_prompts=neutral_queries(params), captions=list(split.captions),
        source={"world": params.to_dict(), "hash": params.hash(), "split": "eval", "n": n},
    )


def folder_probe_set(images_dir: str, labels_path: str, attribute: str | None, preprocess: dict,
                     queries: list[str] | None = None, max_skipped_fraction: float = 0.05,
                     group_prompts: dict[str, str] | None = None) -> ProbeSet:
    """Labelled images from a folder (FairFace/UTKFace/generic CSV) as a probe set.

    Group prompts are ``group_prompts[value]`` (``--group-prompts``), else "a photo of a {value}
    person"; neutral queries default to the built-in
    occupations and traits. A world split (``world.json`` beside the labels, as ``clipsurgery
    world generate`` writes) brings the world's own queries, group prompts, concept labels and
    captions instead. Images are decoded batch by batch when used (memory does not grow with the
    number of images); unreadable ones found by the header scan are left out. ``images_dir`` may be
    a split folder (its ``images/`` is used).
    """
    images_dir = resolve_images_dir(images_dir)
    labels = load_labels(labels_path, images_dir)
    if attribute is None:
        present = [c for c in PROTECTED_COLUMNS if c in labels.attributes]
        if not present:
            raise DataError(f"{labels_path}: no protected-attribute column; pass --attributes with one of "
                            f"{', '.join(labels.attributes)}")
        attribute = present[0]
    labels.require([attribute])
    codes, values = labels.codes(attribute)
    dataset = ImageFolderDataset(images_dir, labels.files, image_transform(preprocess),
                                 max_skipped_fraction=max_skipped_fraction)
    index = torch.tensor(dataset.indices, dtype=torch.long)
    side = split_dir(labels_path, images_dir)
    world_split = (side / WORLD_JSON).is_file() and attribute == "group" and "concept" in labels.attributes
    if world_split and group_prompts is not None:
        raise DataError(f"{labels_path} belongs to a world split, whose groups are named by its {WORLD_JSON}; "
                        "the group prompts given would be ignored: drop --group-prompts")
    extra: dict = {"group_prompts": prompts_for_groups(values, group_prompts),
                   "queries": queries or NEUTRAL_QUERIES["occupations"] + NEUTRAL_QUERIES["traits"]}
    if world_split:
        params = load_params(side / WORLD_JSON)
        prompt_of = dict(zip(params.groups, world_group_prompts(params)))
        unknown = sorted(set(values) - set(prompt_of))
        if unknown:
            raise DataError(f"{labels_path}: group {unknown[0]!r} is not one of the world's groups "
                            f"({', '.join(params.groups)}) in {WORLD_JSON}; the labels and {WORLD_JSON} disagree")
        concepts, _ = labels.codes("concept", list(params.concepts))
        extra = {"group_prompts": [prompt_of[v] for v in values], "queries": queries or neutral_queries(params),
                 "concepts": torch.from_numpy(concepts)[index], "class_prompts": neutral_queries(params)}
        if (side / CAPTIONS_CSV).is_file():
            captions = load_captions(side / CAPTIONS_CSV)
            missing = [labels.files[i] for i in dataset.indices if labels.files[i] not in captions]
            if missing:
                raise DataError(f"{CAPTIONS_CSV} beside {labels_path} has no caption for {missing[0]!r} "
                                f"({len(missing)} image(s) without one); add them or remove {CAPTIONS_CSV}")
            extra["captions"] = [captions[labels.files[i]][0] for i in dataset.indices]
    return ProbeSet(
        images=FolderImages(dataset), groups=torch.from_numpy(codes)[index], group_names=values,
        attribute=attribute, **extra,
        source={"images_dir": images_dir, "labels": labels_path, "skipped": [s.file for s in dataset.skipped],
                "hash": data_hash(images_dir, labels.files)},
    )
