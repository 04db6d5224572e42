"""Captions: CSV ``file,caption`` (several rows per file allowed) or a COCO/Flickr30k Karpathy-split JSON
(``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from surgery.errors import DataError
from surgery.io.labels import file_column, read_csv_rows

logger = logging.getLogger(__name__)
CAPTION_COLUMN = "caption"


# --------------------------------------------------------------------------------------- captions
def load_captions(
    path: str | Path, *, split: str | Collection[str] | None = None, join_filepath: bool = True
) -> dict[str, list[str]]:
    """Captions per image file, in file order of first appearance.

    CSV: columns ``file`` and ``caption`` (several rows per file allowed); an optional ``split``
    column is filtered by ``split``. JSON: Karpathy-split format; a file's key is
    ``filepath/filename`` when ``filepath`` is present and ``join_filepath`` (COCO:
    ``val2014/COCO_val2014_...jpg``), else ``filename`` (Flickr30k). ``split`` (one name or several,
    e.g. ``"test"`` or ``("val", "restval")``) keeps only those images.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"captions file {str(path)!r} is a folder, not a file; pass the captions CSV or JSON")
    if not path.is_file():
        raise DataError(f"captions file {str(path)!r} does not exist; check the path")
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    if path.suffix.lower() == ".json":
        captions = _load_karpathy(path, splits, join_filepath)
    else:
        captions = _load_caption_csv(path, splits)
    if not captions:
        raise DataError(f"{str(path)!r} has no captions{_split_hint(splits)}; check the file")
    logger.info("loaded %d captions for %d images from %s", sum(map(len, captions.values())), len(captions), path)
    return captions


def _split_hint(splits: set[str] | None) -> str:
    return "" if splits is None else f" in split {', '.join(sorted(splits))}"


def _load_caption_csv(path: Path, splits: set[str] | None) -> dict[str, list[str]]:
    header, rows = read_csv_rows(path)
    file_col = file_column(header, path)
    lowered = [h.lower() for h in header]
    if CAPTION_COLUMN not in lowered:
        raise DataError(
            f"{str(path)!r} has no {CAPTION_COLUMN!r} column; columns that exist: {', '.join(repr(h) for h in header)}"
        )
    cap_col = lowered.index(CAPTION_COLUMN)
    split_col = lowered.index("split") if "split" in lowered else None
    if splits is not None and split_col is None:
        raise DataError(f"{str(path)!r} has no 'split' column to filter on; drop the split filter")
    present: set[str] = set()
    captions: dict[str, list[str]] = {}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DataError(f"{str(path)!r} line {line} has {len(row)} cells, header has {len(header)}; fix that row")
        if split_col is not None:
            present.add(row[split_col])
            if splits is not None and row[split_col] not in splits:
                continue
        if not row[file_col] or not row[cap_col]:
            raise DataError(f"{str(path)!r} line {line} has an empty file or caption; fill it in or drop the row")
        captions.setdefault(row[file_col], []).append(row[cap_col])
    if splits is not None and not captions:
        raise DataError(
            f"{str(path)!r} has no rows in split {', '.join(sorted(splits))}; "
            f"splits present: {', '.join(sorted(present))}"
        )
    return captions


def _load_karpathy(path: Path, splits: set[str] | None, join_filepath: bool) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{str(path)!r} is not a Karpathy-split file: expected an object with an 'images' list")
    captions: dict[str, list[str]] = {}
    present: set[str] = set()
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry or "sentences" not in entry:
            raise DataError(f"{str(path)!r} images[{i}] lacks 'filename' or 'sentences'; each image needs both")
        entry_split = str(entry.get("split", ""))
        present.add(entry_split)
        if splits is not None and entry_split not in splits:
            continue
        name = str(entry["filename"])
        if join_filepath and entry.get("filepath"):
            name = f"{entry['filepath']}/{name}"
        sentences = [
            s.get("raw", " ".join(s.get("tokens", []))) if isinstance(s, dict) else str(s)
            for s in entry["sentences"]
        ]
        captions.setdefault(name, []).extend(s.strip() for s in sentences if s and s.strip())
    if splits is not None and not captions:
        raise DataError(
            f"{str(path)!r} has no images in split {', '.join(sorted(splits))}; "
            f"splits present: {', '.join(sorted(present))}"
        )
    return captions


def caption_pairs(captions: Mapping[str, Sequence[str]], files: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Flatten captions for retrieval against ``files``.

    Returns ``(texts, text_to_image (T,) int64)``: every caption of every file in ``files`` (file
    order, then caption order), and the index in ``files`` of its image. Captions of files not in
    ``files`` are dropped; raises :class:`DataError` when none is left.
    """
    index = {f: i for i, f in enumerate(files)}
    texts: list[str] = []
    owners: list[int] = []
    for name in files:
        for text in captions.get(name, ()):
            texts.append(text)
            owners.append(index[name])
    if not texts:
        raise DataError(
            "no caption belongs to an image in the set; check that caption file names match the labels' file names"
        )
    dropped = sum(len(v) for k, v in captions.items() if k not in index)
    if dropped:
        logger.warning("%d captions name images outside the set; dropped", dropped)
    return texts, np.array(owners, dtype=np.int64)
