"""Labels tables: a generic CSV ``file,<attribute>...`` (FairFace's layout is one) or UTKFace file names.

* CSV: ``file`` holds paths relative to the images folder; every other column is kept as strings and
  callers pick the attribute they audit (:meth:`LabelTable.require`, :meth:`LabelTable.codes`).
* UTKFace: no CSV; labels are in the names ``age_gender_race_date.jpg`` (also ``...jpg.chip.jpg``):
  gender 0/1 -> Male/Female, race 0..4 -> White, Black, Asian, Indian, Others, age -> FairFace's age
  bands (raw years in ``age_years``).

Every bad-input error is a :class:`DataError` with a one-line message.
"""
from __future__ import annotations

import csv
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from surgery.errors import DataError
from surgery.io.images import list_images

logger = logging.getLogger(__name__)
FILE_COLUMN = "file"
FILE_COLUMN_ALIASES = ("file", "filename", "image", "path")
LABEL_FORMATS = ("auto", "csv", "utkface")

UTK_GENDERS = ("Male", "Female")
UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")
# FairFace's age bands; "more than 70" holds ages >= 70.
AGE_BANDS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
_AGE_BAND_UPPER = (2, 9, 19, 29, 39, 49, 59, 69)
_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)")


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
                f"{', '.join(repr(a) for a in self.attributes) or '(none)'}; pick one of those"
            )

    def codes(self, name: str, values: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
        """Integer codes of attribute ``name`` and the value for each code.

        ``values`` fixes the code order (and rejects values outside it); by default the sorted
        distinct values are used. Returns ``(codes (n,) int64, values)``.
        """
        self.require([name])
        column = self.attributes[name]
        empty = [i for i, v in enumerate(column) if not v.strip()]
        if empty:  # an empty cell is a missing value, never a group of its own
            raise DataError(f"column {name!r} is empty on {len(empty)} of {len(column)} rows (first: "
                            f"{self.files[empty[0]]!r}); fill in the {name} of those images or drop their rows")
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


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
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


def file_column(header: list[str], path: Path) -> int:
    lowered = [h.lower() for h in header]
    for alias in FILE_COLUMN_ALIASES:
        if alias in lowered:
            return lowered.index(alias)
    raise DataError(
        f"{str(path)!r} has no {FILE_COLUMN!r} column; columns that exist: {', '.join(repr(h) for h in header)}; "
        f"rename the image-path column to {FILE_COLUMN!r}"
    )


def _load_csv_labels(path: Path) -> LabelTable:
    header, rows = read_csv_rows(path)
    file_col = file_column(header, path)
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
