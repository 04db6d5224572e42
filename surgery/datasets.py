"""Data formats people have, read through one code path.

* Labels: an image folder plus a labels table.
  - Generic CSV ``file,<attribute>...`` (FairFace's ``file,age,gender,race[,service_test]`` is just
    that). ``file`` holds paths relative to the images folder. Every non-file column is kept as
    strings; callers pick the attribute they audit (:meth:`LabelTable.require`,
    :meth:`LabelTable.codes`).
  - UTKFace: no CSV; the labels are in the file names ``age_gender_race_date.jpg`` (also the
    aligned ``...jpg.chip.jpg``). gender 0/1 -> Male/Female, race 0..4 -> White, Black, Asian,
    Indian, Others, age -> FairFace's age bands (and the raw years in ``age_years``).
* Captions: CSV ``file,caption`` (several rows per file allowed) or a COCO/Flickr30k Karpathy-split
  JSON (``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``).
* Images: :class:`ImageFolderDataset` loads with Pillow (RGB), skips and counts unreadable files and
  aborts with :class:`DataError` past a skipped fraction.

Every bad-input error is a :class:`DataError` (a ``ValueError``) with a one-line message saying what
is wrong and what to do.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from surgery.errors import SurgeryError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FILE_COLUMN = "file"
FILE_COLUMN_ALIASES = ("file", "filename", "image", "path")
CAPTION_COLUMN = "caption"
LABEL_FORMATS = ("auto", "csv", "utkface")
PRESCAN_MODES = ("none", "header", "full")

UTK_GENDERS = ("Male", "Female")
UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")
# FairFace's age bands; "more than 70" holds ages >= 70.
AGE_BANDS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
_AGE_BAND_UPPER = (2, 9, 19, 29, 39, 49, 59, 69)
# What Pillow raises for missing, non-image, truncated or broken files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)")


class DataError(SurgeryError, ValueError):
    """Bad input data or parameters; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------- labels
@dataclass
class LabelTable:
    """Image files and their string-valued attributes, one row per file."""

    files: list[str]  # paths relative to the images folder, in table order
    attributes: dict[str, list[str]]  # attribute name -> one value per file
    skipped: list[str] = field(default_factory=list)  # names that could not be parsed (UTKFace)

    def __post_init__(self) -> None:
        for name, values in self.attributes.items():
            if len(values) != len(self.files):
                raise DataError(
                    f"attribute {name!r} has {len(values)} values for {len(self.files)} files; "
                    "give one value per file"
                )

    def __len__(self) -> int:
        return len(self.files)

    def require(self, names: Sequence[str]) -> None:
        """Raise :class:`DataError` unless every attribute in ``names`` is present."""
        missing = [n for n in names if n not in self.attributes]
        if missing:
            raise DataError(
                f"labels have no column {', '.join(repr(m) for m in missing)}; columns that exist: "
                f"{', '.join(self.attributes) or '(none)'}; pick one of those"
            )

    def codes(self, name: str, values: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
        """Integer codes of attribute ``name`` and the value for each code.

        ``values`` fixes the code order (and rejects values outside it); by default the sorted
        distinct values are used. Returns ``(codes (n,) int64, values)``.
        """
        self.require([name])
        column = self.attributes[name]
        order = list(values) if values is not None else sorted(set(column))
        if values is not None:
            check_allowed(name, column, order)
        index = {v: i for i, v in enumerate(order)}
        return np.array([index[v] for v in column], dtype=np.int64), order


def check_allowed(name: str, column: Sequence[str], allowed: Collection[str]) -> None:
    """Raise :class:`DataError` if ``column`` holds values outside ``allowed``."""
    allowed_set = set(allowed)
    bad = sorted({v for v in column if v not in allowed_set})
    if bad:
        shown = ", ".join(repr(v) for v in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise DataError(
            f"column {name!r} has unknown values {shown}; allowed: "
            f"{', '.join(repr(v) for v in sorted(allowed_set))}"
        )


def load_labels(
    path: str | Path,
    images_dir: str | Path | None = None,
    *,
    format: str = "auto",
    required: Sequence[str] = (),
    allowed: Mapping[str, Collection[str]] | None = None,
) -> LabelTable:
    """Read a labels table.

    ``path`` is a CSV file (``format="csv"``: a ``file`` column, aliases filename/image/path, plus
    any attribute columns) or a folder of UTKFace-named images (``format="utkface"``; ``"auto"``
    picks UTKFace when ``path`` is a folder). ``images_dir`` is only used for UTKFace when ``path``
    is not the folder itself. ``required`` attributes must exist; ``allowed`` maps an attribute to
    its allowed values.
    """
    if format not in LABEL_FORMATS:
        raise DataError(f"unknown labels format {format!r}; allowed: {', '.join(LABEL_FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"labels file {str(path)!r} does not exist; check the path")
    use_utk = format == "utkface" or (format == "auto" and path.is_dir())
    if use_utk:
        table = _load_utkface(Path(images_dir) if images_dir is not None and not path.is_dir() else path)
    else:
        if path.is_dir():
            raise DataError(f"{str(path)!r} is a folder; pass a labels CSV or format='utkface'")
        table = _load_csv_labels(path)
    table.require(required)
    for name, values in (allowed or {}).items():
        table.require([name])
        check_allowed(name, table.attributes[name], values)
    logger.info("loaded %d labels from %s (attributes: %s)", len(table), path, list(table.attributes))
    return table


def _read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV file, whitespace stripped, blank lines dropped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [[cell.strip() for cell in row] for row in csv.reader(fh)]
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({exc.reason}); save it as UTF-8 CSV") from exc
    rows = [r for r in rows if any(r)]
    if not rows:
        raise DataError(f"{str(path)!r} is empty; it needs a header row and at least one data row")
    return rows[0], rows[1:]


def _file_column(header: list[str], path: Path) -> int:
    lowered = [h.lower() for h in header]
    for alias in FILE_COLUMN_ALIASES:
        if alias in lowered:
            return lowered.index(alias)
    raise DataError(
        f"{str(path)!r} has no {FILE_COLUMN!r} column; columns that exist: {', '.join(header)}; "
        f"rename the image-path column to {FILE_COLUMN!r}"
    )


def _load_csv_labels(path: Path) -> LabelTable:
    header, rows = _read_csv_rows(path)
    file_col = _file_column(header, path)
    if len(set(header)) != len(header):
        raise DataError(f"{str(path)!r} repeats a column name in its header {header}; make names unique")
    if not rows:
        raise DataError(f"{str(path)!r} has a header but no rows; add one row per image")
    names = [h for i, h in enumerate(header) if i != file_col]
    files: list[str] = []
    attributes: dict[str, list[str]] = {n: [] for n in names}
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DataError(f"{str(path)!r} line {line} has {len(row)} cells, header has {len(header)}; fix that row")
        name = row[file_col]
        if not name:
            raise DataError(f"{str(path)!r} line {line} has an empty file name; fill it in or drop the row")
        if name in seen:
            raise DataError(
                f"{str(path)!r} lists {name!r} twice (lines {seen[name]} and {line}); keep one row per image"
            )
        seen[name] = line
        files.append(name)
        cells = [c for i, c in enumerate(row) if i != file_col]
        for n, cell in zip(names, cells):
            attributes[n].append(cell)
    return LabelTable(files=files, attributes=attributes)


def split_label_table(table: LabelTable, holdout: float, stratify: str | None = None,
                      seed: int = 0) -> tuple[LabelTable, LabelTable]:
    """Disjoint (kept, held-out) tables: ``holdout`` of the rows (of each value of ``stratify``,
    when given) are held out, chosen with ``seed``; both keep the table's row order."""
    if not 0 < holdout < 1:
        raise DataError(f"the held-out fraction must be between 0 and 1, got {holdout}")
    strata = table.attributes[stratify] if stratify else [""] * len(table)
    gen = torch.Generator().manual_seed(seed)
    held = np.zeros(len(table), dtype=bool)
    for value in sorted(set(strata)):
        rows = np.array([i for i, v in enumerate(strata) if v == value])
        if len(rows) < 2:
            where = f"{stratify} {value!r}" if stratify else "the table"
            raise DataError(f"{where} has {len(rows)} labelled image(s); a held-out split needs at least 2 per "
                            "group: add images or do not hold any out")
        order = rows[torch.randperm(len(rows), generator=gen).numpy()]
        n_held = min(max(int(holdout * len(rows) + 0.5), 1), len(rows) - 1)  # both sides keep every group
        held[order[:n_held]] = True

    def subset(mask: np.ndarray) -> LabelTable:
        idx = np.flatnonzero(mask)
        return LabelTable(files=[table.files[i] for i in idx],
                          attributes={k: [v[i] for i in idx] for k, v in table.attributes.items()})

    return subset(~held), subset(held)


def write_labels_csv(table: LabelTable, path: str | Path) -> None:
    """Write ``table`` as a labels CSV (a ``file`` column, then its attributes) that
    :func:`load_labels` reads back unchanged."""
    names = list(table.attributes)
    if any(n.strip().lower() == "file" for n in names):
        raise DataError("the labels have an attribute column named 'file' besides the file column; rename it")
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", *names])
        for i, name in enumerate(table.files):
            writer.writerow([name, *(table.attributes[a][i] for a in names)])


def age_band(years: int) -> str:
    """FairFace's age band for an age in years (``"more than 70"`` for 70 and over)."""
    if years < 0:
        raise DataError(f"age {years} is negative; ages are whole years >= 0")
    for band, upper in zip(AGE_BANDS, _AGE_BAND_UPPER):
        if years <= upper:
            return band
    return AGE_BANDS[-1]


def parse_utkface_name(name: str) -> dict[str, str] | None:
    """Attributes from a UTKFace file name ``age_gender_race_date.jpg``, or None if malformed."""
    match = _UTK_NAME.match(Path(name).name)
    if match is None:
        return None
    years, gender, race = (int(g) for g in match.groups()[:3])
    if gender >= len(UTK_GENDERS) or race >= len(UTK_RACES):
        return None
    return {
        "age": age_band(years),
        "age_years": str(years),
        "gender": UTK_GENDERS[gender],
        "race": UTK_RACES[race],
    }


def _load_utkface(images_dir: Path) -> LabelTable:
    names = list_images(images_dir)
    files: list[str] = []
    attributes: dict[str, list[str]] = {"age": [], "age_years": [], "gender": [], "race": []}
    skipped: list[str] = []
    for name in names:
        parsed = parse_utkface_name(name)
        if parsed is None:
            skipped.append(name)
            continue
        files.append(name)
        for key, value in parsed.items():
            attributes[key].append(value)
    if skipped:
        logger.warning("%d file names in %s are not UTKFace names (age_gender_race_date.jpg); skipped",
                       len(skipped), images_dir)
    if not files:
        raise DataError(
            f"no file in {str(images_dir)!r} is named like UTKFace's age_gender_race_date.jpg; "
            "pass a labels CSV instead"
        )
    return LabelTable(files=files, attributes=attributes, skipped=skipped)


def list_images(images_dir: str | Path) -> list[str]:
    """Image files under ``images_dir`` (recursive), as sorted POSIX paths relative to it."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"images folder {str(root)!r} does not exist or is not a folder; check the path")
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not names:
        raise DataError(
            f"images folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); check the path"
        )
    return names


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
    header, rows = _read_csv_rows(path)
    file_col = _file_column(header, path)
    lowered = [h.lower() for h in header]
    if CAPTION_COLUMN not in lowered:
        raise DataError(
            f"{str(path)!r} has no {CAPTION_COLUMN!r} column; columns that exist: {', '.join(header)}"
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


# ----------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be used."""

    file: str  # path relative to the images folder
    reason: str  # why it was skipped (one line)


@dataclass(frozen=True)
class _Skip:
    """Returned by ``__getitem__`` in place of a sample whose image failed to decode."""

    index: int  # position in the dataset's ``files`` list
    reason: str  # why it failed


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of ``files`` under ``images_dir``; item ``j`` is ``(transform(image), index)``.

    ``index`` is the image's position in ``files`` (so labels stay aligned when images are skipped).
    ``transform`` maps an RGB PIL image to a tensor (default: float (3, H, W) in [0, 1]).

    Unreadable images are skipped, counted and listed in ``.skipped``:

    * ``prescan="header"`` (default): at construction, each file is opened and its header read
      (missing files, non-images and bad headers are caught before any model runs; costs no decode).
    * ``prescan="full"``: also decodes every image up front (catches truncated files early; one extra
      decode per image). ``"none"``: no scan.
    * Files that pass the scan but fail to decode later are skipped lazily: ``__getitem__`` returns
      a marker that :meth:`collate` drops; use :meth:`batches` (or ``collate`` and
      :meth:`record_skips`) so those are recorded in ``.skipped``, also with worker processes.

    When the skipped fraction (over all of ``files``) exceeds ``max_skipped_fraction``, a
    :class:`DataError` is raised (at construction, or during :meth:`batches`).
    """

    def __init__(
        self,
        images_dir: str | Path,
        files: Sequence[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        max_skipped_fraction: float = 0.05,
        prescan: str = "header",
    ) -> None:
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise DataError(f"max_skipped_fraction={max_skipped_fraction} is outside [0, 1]; pass a fraction")
        if prescan not in PRESCAN_MODES:
            raise DataError(f"unknown prescan {prescan!r}; allowed: {', '.join(PRESCAN_MODES)}")
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise DataError(f"images folder {str(self.images_dir)!r} does not exist or is not a folder; check the path")
        self.files = list(files) if files is not None else list_images(self.images_dir)
        if not self.files:
            raise DataError(f"no images to load from {str(self.images_dir)!r}; the file list is empty")
        self.transform = transform
        self.max_skipped_fraction = max_skipped_fraction
        self.skipped: list[SkippedImage] = []
        self.indices: list[int] = []  # positions in ``files`` still in use
        for i, name in enumerate(self.files):
            reason = self._scan(name, prescan)
            if reason is None:
                self.indices.append(i)
            else:
                self.skipped.append(SkippedImage(name, reason))
        self._check_skipped(final=prescan != "none")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Any, int] | _Skip:
        index = self.indices[j]
        try:
            image = self._open(self.files[index], decode=True)
        except _DECODE_ERRORS as exc:
            return _Skip(index, _reason(exc))
        sample = self.transform(image) if self.transform is not None else _to_tensor(image)
        return sample, index

    def _open(self, name: str, decode: bool) -> Image.Image:
        with Image.open(self.images_dir / name) as img:
            if not decode:
                return img
            img.load()
            return img.convert("RGB")

    def _scan(self, name: str, prescan: str) -> str | None:
        """None if ``name`` passes the scan, else the reason it fails."""
        if prescan == "none":
            return None
        if not (self.images_dir / name).is_file():
            return "file not found"
        try:
            self._open(name, decode=prescan == "full")
        except _DECODE_ERRORS as exc:
            return _reason(exc)
        return None

    @property
    def skipped_fraction(self) -> float:
        return len(self.skipped) / len(self.files)

    def _check_skipped(self, final: bool) -> None:
        """Abort when too many images are skipped; log the count otherwise."""
        if self.skipped_fraction > self.max_skipped_fraction:
            first = self.skipped[0]
            raise DataError(
                f"{len(self.skipped)} of {len(self.files)} images are unreadable "
                f"({self.skipped_fraction:.1%} > {self.max_skipped_fraction:.1%}), e.g. {first.file!r}: "
                f"{first.reason}; fix the images or raise the threshold"
            )
        if final and self.skipped:
            logger.warning("skipped %d unreadable images of %d", len(self.skipped), len(self.files))

    @staticmethod
    def collate(batch: list[tuple[Any, int] | _Skip]) -> tuple[torch.Tensor, torch.Tensor, list[_Skip]]:
        """Stack good samples; returns ``(images (B, ...), indices (B,) int64, skips)``."""
        skips = [b for b in batch if isinstance(b, _Skip)]
        good = [b for b in batch if not isinstance(b, _Skip)]
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), skips
        images = torch.stack([torch.as_tensor(s) for s, _ in good])
        indices = torch.tensor([i for _, i in good], dtype=torch.int64)
        return images, indices, skips

    def record_skips(self, skips: Sequence[_Skip]) -> None:
        """Record lazily found failures; raises :class:`DataError` past the threshold."""
        for skip in skips:
            self.skipped.append(SkippedImage(self.files[skip.index], skip.reason))
        if skips:
            self._check_skipped(final=False)

    def batches(self, batch_size: int = 64, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images (B, ...), indices (B,))`` in order, recording skipped images."""
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        loader = torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=self.collate
        )
        for images, indices, skips in loader:
            self.record_skips(skips)
            if len(indices):
                yield images, indices
        self._check_skipped(final=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
