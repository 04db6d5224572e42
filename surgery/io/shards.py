"""Image sources for extraction: an image folder, or WebDataset tar shards, cut into *units*.

A unit is the piece of work one rank does at a time and the piece a cache keeps per file: one tar
shard, or ``unit_images`` consecutive files of a folder. Units are numbered in source order and
dealt to ranks round-robin, so any number of ranks covers every unit exactly once, and a cache
read back unit by unit has the same rows in the same order whatever the number of ranks.

Shards follow the layout img2dataset and ``webdataset.TarWriter`` write: ``NNNNN.tar`` holding,
per sample, members that share a key (the member's path up to the first dot of its file name):
``KEY.jpg`` / ``.png`` / ... (the image), ``KEY.txt`` (caption), ``KEY.json`` (labels, metadata).
Shards are given as a path, a brace pattern (``data/{00000..00099}.tar``) or several of those
separated by ``::``; a folder of ``.tar`` files stands for all of them (a folder holding both
shards and image files is refused: which of them is meant cannot be told).

Which member is a sample's image: the one whose extension is ``image_key`` when given (``jpg``,
``seg.png``, ...); otherwise the first of :data:`IMAGE_KEYS` (``jpg``, ``jpeg``, ``png``, ``webp``,
...) that the sample has, never a compound extension such as ``seg.png`` (a mask or another
view). A sample with image members but none chosen by that rule is kept as *unusable* (counted
and reported as a skipped image); one with no image member at all is not a sample (a caption
alone cannot be embedded). Label JSON that cannot be parsed is kept as ``{"_error": reason}``
(:data:`LABEL_ERROR_KEY`) so that it is counted, not silently dropped.

Limits: a member larger than ``max_member_bytes`` (its size after decompression, from the tar
header, checked before it is read) makes its shard unreadable, like a damaged one; file names
that are not UTF-8 are left out of a folder's units and listed (:attr:`ImageSource.bad_names`).
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from surgery.errors import DataError
from surgery.io.images import IMAGE_EXTENSIONS, data_hash, list_images, resolve_images_dir

#: Images per unit of an image folder (a cache file each).
DEFAULT_UNIT_IMAGES = 1024
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Largest tar member read (bytes after decompression): a 3 MB .tar.gz can hold a 4 GB member.
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
#: The image member of a sample, by default: the first of these extensions the sample has.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: The key a sample's metadata gets when its label JSON cannot be parsed (the reason is its value).
LABEL_ERROR_KEY = "_error"


@dataclass(frozen=True)
class ReadOptions:
    """How tar shards are read."""
    image_key: str | None = None  # member extension holding the image ("jpg", "seg.png"); None: IMAGE_KEYS order
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a larger member (decompressed) makes its shard unreadable

    def __post_init__(self) -> None:
        if self.image_key is not None and (not self.image_key or "/" in self.image_key
                                           or self.image_key.startswith(".")):
            raise DataError(f"image key {self.image_key!r} must be a member extension such as jpg or seg.png "
                            "(no leading dot, no '/')")
        if isinstance(self.max_member_bytes, bool) or not isinstance(self.max_member_bytes, int) \
                or self.max_member_bytes < 1:
            raise DataError(f"max_member_bytes must be an integer >= 1, got {self.max_member_bytes!r}")


@dataclass(frozen=True)
class Unit:
    """One piece of a source: a tar shard, or a run of a folder's files."""
    index: int  # position in the source (units are read back in this order)
    name: str  # the shard's path, or "FOLDER[start:stop]"
    kind: str  # "tar" | "folder"
    files: tuple[str, ...] = ()  # folder units: image paths relative to the folder


@dataclass
class Sample:
    """One input: image bytes (or a folder file) with what came beside it in the shard."""
    key: str  # shard key, or the file's path relative to the folder
    image: bytes | None  # encoded image (tar); None for folder samples (read from ``path``)
    path: str | None = None  # folder samples: the file
    caption: str | None = None  # KEY.txt
    meta: dict = field(default_factory=dict)  # KEY.json (labels live here)
    problem: str | None = None  # why it cannot be embedded (no image member by the rule); None: usable


@dataclass(frozen=True)
class ImageSource:
    """Where images come from: a folder, or tar shards."""
    spec: str  # what the user gave
    kind: str  # "folder" | "shards"
    root: str = ""  # the folder (kind "folder")
    shards: tuple[str, ...] = ()  # shard paths in order (kind "shards")
    files: tuple[str, ...] = ()  # kind "folder": its image files (UTF-8 names), listed when opened
    bad_names: tuple[str, ...] = ()  # kind "folder": image files left out, their names not UTF-8 (escaped)

    def units(self, unit_images: int = DEFAULT_UNIT_IMAGES) -> list[Unit]:
        """The source cut into units, in order."""
        if self.kind == "shards":
            return [Unit(i, path, "tar") for i, path in enumerate(self.shards)]
        if unit_images < 1:
            raise DataError(f"unit_images must be >= 1, got {unit_images}")
        files = list(self.files) or folder_files(self.root)[0]
        return [Unit(i, f"{self.root}[{s}:{s + len(chunk)}]", "folder", tuple(chunk))
                for i, s in enumerate(range(0, len(files), unit_images))
                for chunk in [files[s:s + unit_images]]]

    def fingerprint(self) -> str:
        """A cheap identity every rank can compute alike: the units' names and sizes (not their bytes)."""
        digest = hashlib.sha256(self.kind.encode())
        if self.kind == "shards":
            for path in self.shards:
                size = os.path.getsize(path) if os.path.isfile(path) else -1
                digest.update(f"{os.path.basename(path)}\0{size}\0".encode())
        else:
            for name in list(self.files) or folder_files(self.root)[0]:
                digest.update(f"{name}\0{os.path.getsize(os.path.join(self.root, name))}\0".encode())
        return digest.hexdigest()


def folder_files(root: str) -> tuple[list[str], list[str]]:
    """(image files whose names are UTF-8, the others' names shown with escapes) of a folder.

    A name that is not UTF-8 (bytes from another system's encoding) cannot be recorded in a cache's
    JSON or hashed as text: such files are left out and listed, so the caller counts them."""
    good, bad = [], []
    for name in list_images(root):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes came through as surrogate escapes
            bad.append(os.fsencode(name).decode("utf-8", errors="backslashreplace"))
            continue
        good.append(name)
    if not good:
        raise DataError(f"images folder {root!r} holds no image whose file name is UTF-8 ({len(bad)} are not, "
                        f"e.g. {bad[0]!r}); rename them")
    return good, bad


def open_source(spec: str) -> ImageSource:
    """An image folder, one shard, a brace pattern of shards, a folder of shards, or ``A::B``."""
    spec = str(spec)
    if os.path.isdir(spec):
        spec = resolve_images_dir(spec)  # a split folder (images/ + labels.csv) stands for its images/
        tars = sorted(str(p) for p in Path(spec).iterdir() if p.name.endswith(TAR_SUFFIXES))
        images = sum(1 for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if tars and images:
            raise DataError(f"{spec} holds both tar shards ({len(tars)}, e.g. {os.path.basename(tars[0])}) and "
                            f"image files ({images}); which to embed is ambiguous: give the shards by name or "
                            f"pattern (e.g. '{os.path.join(spec, '{00000..00009}.tar')}'), or move the images "
                            "to a folder of their own")
        if tars:
            return ImageSource(spec, "shards", shards=tuple(tars))
        files, bad = folder_files(spec)
        return ImageSource(spec, "folder", root=spec, files=tuple(files), bad_names=tuple(bad))
    paths = [p for part in spec.split("::") if part for p in braceexpand(part)]
    if not paths or not all(p.endswith(TAR_SUFFIXES) for p in paths):
        raise DataError(f"{spec!r} is neither an image folder nor tar shards (.tar, or a brace pattern such as "
                        "data/{00000..00099}.tar); check the path")
    if len(set(paths)) != len(paths):
        raise DataError(f"{spec!r} names a shard twice; each shard may appear once")
    if not any(os.path.isfile(p) for p in paths):
        raise DataError(f"none of the {len(paths)} shards of {spec!r} exists (first: {paths[0]}); check the pattern")
    return ImageSource(spec, "shards", shards=tuple(paths))


# ------------------------------------------------------------------------------------ reading
class ShardError(DataError):
    """A shard that is missing or cannot be read as a tar file."""


def sample_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member as WebDataset splits it: ``dir/00001.jpg`` -> (``dir/00001``, ``jpg``)."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def read_unit(unit: Unit, root: str = "", options: ReadOptions | None = None) -> tuple[list[Sample], str]:
    """All samples of a unit, in order, and the unit's content hash (sha256 of its bytes).

    Tar units are read whole (a unit's memory is bounded by the shard's size and
    ``options.max_member_bytes`` per member, never by the data set's); a missing or damaged tar,
    or one with a member over the cap, raises :class:`ShardError` naming it. Samples without an
    image member are dropped (a caption alone cannot be embedded); see the module doc for which
    member is the image.
    """
    opt = options or ReadOptions()
    if unit.kind == "folder":
        samples = [Sample(key=name, image=None, path=os.path.join(root, name)) for name in unit.files]
        return samples, data_hash(root, list(unit.files))
    if not os.path.isfile(unit.name):
        raise ShardError(f"shard {unit.name} is missing")
    try:
        with open(unit.name, "rb") as fh:
            blob = fh.read()
        content = hashlib.sha256(blob).hexdigest()
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.size > opt.max_member_bytes:  # the header's size, before any byte is read
                    raise ShardError(f"shard {unit.name} has a member of {member.size:,} bytes ({member.name[:80]}), "
                                     f"over the {opt.max_member_bytes:,}-byte cap (--max-member-bytes)")
                key, ext = sample_key(member.name)
                handle = tar.extractfile(member)
                members.setdefault(key, {})[ext] = handle.read() if handle else b""
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise ShardError(f"shard {unit.name} is damaged ({type(exc).__name__}: {str(exc)[:80]})") from None
    return [_sample(key, parts, unit.name, opt.image_key) for key, parts in members.items()
            if _has_image(parts, opt.image_key)], content


def content_hash(unit: Unit, root: str = "") -> str:
    """The content hash :func:`read_unit` returns, without parsing the unit (OSError if it is gone)."""
    if unit.kind == "folder":
        return data_hash(root, list(unit.files))
    digest = hashlib.sha256()
    with open(unit.name, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_image_ext(ext: str) -> bool:
    return "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _has_image(parts: dict[str, bytes], image_key: str | None) -> bool:
    return (image_key is not None and image_key in parts) or any(_is_image_ext(ext) for ext in parts)


def image_member(parts: dict[str, bytes], image_key: str | None = None) -> tuple[str | None, str | None]:
    """(extension of the member that is the image, None) or (None, why none is) by the module's rule."""
    if image_key is not None:
        if image_key in parts:
            return image_key, None
        return None, f"no '{image_key}' member (has {', '.join(sorted(parts))}); check --image-key"
    for ext in IMAGE_KEYS:
        if ext in parts:
            return ext, None
    found = sorted(ext for ext in parts if _is_image_ext(ext))
    return None, (f"no plain image member (only {', '.join(found)}); pass --image-key {found[0]} "
                  "to embed that one")


def _sample(key: str, parts: dict[str, bytes], shard: str, image_key: str | None = None) -> Sample:
    caption = parts["txt"].decode("utf-8", errors="replace").strip() if "txt" in parts else None
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            meta = {LABEL_ERROR_KEY: f"{shard}: {key}.json is not valid JSON"}
        if not isinstance(meta, dict):
            meta = {"_value": meta}
    ext, problem = image_member(parts, image_key)
    return Sample(key=key, image=parts[ext] if ext else None, caption=caption, meta=meta, problem=problem)


def iter_units(units: list[Unit], rank: int, world: int) -> Iterator[Unit]:
    """The units rank ``rank`` of ``world`` works on (round-robin; disjoint, together all)."""
    return (u for u in units if u.index % world == rank)
