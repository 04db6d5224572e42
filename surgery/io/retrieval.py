"""A retrieval set: captioned images apart from the labelled probe (``--retrieval captions.csv``).

A probe with group labels only (FairFace-style data, the real case) has no captions, so nothing
measures what an edit does to retrieval and nothing keeps captions still. A retrieval set fills
that in: a CSV of ``image,caption`` rows (several rows per image allowed; ``file`` also names the
image column) whose images the recall budgets are measured on and whose captions anchor the
balance edit. Its images need no labels; they may be other images than the probe's.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import DataError
from surgery.io.captions import load_captions

#: The fewest images on a side of a retrieval set: Recall@5 over 5 images or fewer is 1 for any model.
MIN_RETRIEVAL_IMAGES = 6


@dataclass(frozen=True)
class RetrievalSet:
    """Captioned images: ``captions[file]`` are the captions of ``images_dir/file`` (files in the
    CSV's order)."""

    images_dir: str
    captions: dict[str, list[str]]
    source: str  # the CSV it was read from

    @property
    def files(self) -> list[str]:
        return list(self.captions)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def n_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())

    def subset(self, files: list[str]) -> RetrievalSet:
        return RetrievalSet(self.images_dir, {f: self.captions[f] for f in files}, self.source)

    def split(self, holdout: float, seed: int = 0) -> tuple[RetrievalSet, RetrievalSet]:
        """(selection, report): ``holdout`` of the images (drawn with ``seed``) go to the report,
        the rest choose the edits; a caption stays with its image. ``holdout`` 0: both are the whole set."""
        if holdout == 0:
            return self, self
        files = self.files
        order = list(range(len(files)))
        random.Random(seed).shuffle(order)
        n_report = round(holdout * len(files))
        report = sorted(order[:n_report])
        keep = sorted(order[n_report:])
        for side, picked in (("selection", keep), ("report", report)):
            if len(picked) < MIN_RETRIEVAL_IMAGES:
                raise DataError(f"--retrieval {self.source}: --holdout {holdout:g} leaves {len(picked)} of its "
                                f"{len(files)} images for the {side}; Recall@5 needs at least {MIN_RETRIEVAL_IMAGES} "
                                "per side: add images or lower --holdout")
        return self.subset([files[i] for i in keep]), self.subset([files[i] for i in report])

    def describe(self) -> dict:
        return {"csv": self.source, "images_dir": self.images_dir, "images": len(self), "captions": self.n_captions}


def load_retrieval_set(csv_path: str, images_dir: str | None = None) -> RetrievalSet:
    """Read ``csv_path`` (``image,caption`` rows). Images are looked up under ``images_dir``, by
    default the CSV's folder, or its ``images/`` subfolder when the files are there (the layout
    ``clipsurgery world generate`` writes). Every image must exist: a missing one is an error
    that names it (a retrieval set with holes would measure recall on other images than meant)."""
    path = Path(csv_path)
    if path.suffix.lower() != ".csv":
        raise DataError(f"--retrieval {csv_path}: expected a CSV of image,caption rows")
    captions = load_captions(path)
    files = list(captions)
    if images_dir is None:
        root = path.parent
        inner = root / "images"
        if not (root / files[0]).is_file() and (inner / files[0]).is_file():
            root = inner
    else:
        root = Path(images_dir)
        if not root.is_dir():
            raise DataError(f"--retrieval-images {images_dir!r} is not a folder; check the path")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataError(f"--retrieval {csv_path}: image {missing[0]!r} is not under {str(root)!r} ({len(missing)} of "
                        f"{len(files)} missing); image paths are relative to the CSV's folder or --retrieval-images")
    if len(files) < MIN_RETRIEVAL_IMAGES:
        raise DataError(f"--retrieval {csv_path} has {len(files)} images; Recall@5 needs at least "
                        f"{MIN_RETRIEVAL_IMAGES}: add images")
    return RetrievalSet(str(root), captions, str(csv_path))
