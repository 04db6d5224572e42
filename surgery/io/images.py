"""Image folders: :class:`ImageFolderDataset` loads with Pillow (RGB), skips and counts unreadable files
and aborts with :class:`DataError` past a skipped fraction.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from surgery.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PRESCAN_MODES = ("none", "header", "full")
#: Largest image decoded (width x height), about 6300 x 6300: a larger one (a decompression bomb, or a
#: scan far beyond any CLIP's input size) is skipped like an unreadable file, before its pixels are read.
DEFAULT_MAX_PIXELS = 40_000_000
#: Largest ratio of the long side to the short side. CLIP's transform resizes the short side to the
#: model's size (224 px), so the long side becomes ``size x ratio``: a 1 x 1,000,000 PNG (3 KB, under any
#: pixel cap) would become 224 x 224,000,000 pixels (6.5 GB) before the crop. At 50:1 the resized image is
#: at most 224 x 11,200 (7.5 MB of RGB); panoramas past that are cropped by the user first.
DEFAULT_MAX_ASPECT = 50.0
# What Pillow raises for missing, non-image, truncated or broken files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def resolve_images_dir(images_dir: str) -> str:
    """The image folder a user meant: a split folder (``images/`` + ``labels.csv`` beside it, as
    ``clipsurgery world generate`` writes) stands for its ``images/``; any other folder is itself."""
    root = Path(images_dir)
    inner = root / "images"
    if inner.is_dir() and (root / "labels.csv").is_file() and not any(
            p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        return str(inner)
    return images_dir


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


# ----------------------------------------------------------------------------------------- images
#: What Pillow raises for missing, non-image, truncated, broken or oversized images (catch these).
DECODE_ERRORS = _DECODE_ERRORS


class ImageTooLarge(ValueError):
    """An image refused from its header: too many pixels, or too long and thin (see :func:`check_image_size`)."""


def check_image_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                     max_aspect: float = DEFAULT_MAX_ASPECT) -> None:
    """Raise :class:`ImageTooLarge` for an image that would cost too much to decode or to resize:
    more than ``max_pixels`` pixels, or a long side more than ``max_aspect`` times the short side
    (resizing the short side to the model's size would blow the long side up by the same factor)."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width} x {height} pixels is over the {max_pixels:,}-pixel cap (max_pixels); "
                            "downscale it")
    short, long = min(width, height), max(width, height)
    if short < 1 or long > max_aspect * short:
        raise ImageTooLarge(f"{width} x {height} pixels is more than {max_aspect:g}:1 long and thin (resizing its "
                            f"short side to the model's size would make it {long / max(short, 1):,.0f} times as "
                            "long); crop it first")


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True,
               max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """An RGB image from a path or encoded bytes. The header is checked first (:func:`check_image_size`:
    more than ``max_pixels`` pixels, or longer than ``max_aspect``:1) and raises :class:`ImageTooLarge`
    (a ValueError) before any pixel is decoded. ``decode=False`` returns the (closed) image after the
    header check. Raises one of :data:`DECODE_ERRORS`."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(fp) as img:  # reads the header only
        check_image_size(*img.size, max_pixels=max_pixels, max_aspect=max_aspect)
        if not decode:
            return img
        img.load()
        return img.convert("RGB")


def decode_reason(exc: BaseException) -> str:
    """One line saying why an image could not be used."""
    return _reason(exc)


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
        max_pixels: int = DEFAULT_MAX_PIXELS,
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
        self.max_pixels = int(max_pixels)
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
        return open_image(self.images_dir / name, self.max_pixels, decode)

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
                f"{first.reason}; fix or remove the unreadable images (at most {self.max_skipped_fraction:.0%} may be "
                "skipped)"
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


_DATA_HASHES: dict[tuple, str] = {}


def data_hash(images_dir: str, files: Sequence[str]) -> str:
    """sha256 over each file's name and bytes, in order (missing files hash as such).

    Memoised for the process on (folder, names, each file's size and mtime), so one compare
    reads the images' bytes for hashing once.
    """
    stamp = []
    for name in files:
        try:
            st = os.stat(os.path.join(images_dir, name))
            stamp.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append((name, -1, -1))
    memo_key = (os.path.abspath(images_dir), tuple(stamp))
    if memo_key not in _DATA_HASHES:
        _DATA_HASHES[memo_key] = _hash_files(images_dir, files)
    return _DATA_HASHES[memo_key]


def _hash_files(images_dir: str, files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        path = os.path.join(images_dir, name)
        try:
            with open(path, "rb") as fh:
                digest.update(hashlib.sha256(fh.read()).digest())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()
