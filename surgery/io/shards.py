"""Image sources for extraction: an image folder, or WebDataset tar shards, cut into *units*.

A unit is the piece of work one rank does at a time and the piece a cache keeps per file: one tar
shard, or ``unit_images`` consecutive files of a folder. Units are numbered in source order and
dealt to ranks round-robin, so any number of ranks covers every unit exactly once, and a cache
read back unit by unit has the same rows in the same order whatever the number of ranks.

Shards follow the layout img2dataset and ``webdataset.TarWriter`` write: ``NNNNN.tar`` holding,
per sample, members that share a key (the member's path up to the first dot of its file name):
``KEY.jpg`` / ``.png`` / ... (the image), ``KEY.txt`` (caption), ``KEY.json`` (labels, metadata).
Shards are given as a path, a brace pattern (``data/{00000..00099}.tar``) or several of those
separated by ``::``; a folder of ``.tar`` files stands for all of them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from surgery.errors import DataError
from surgery.io.images import IMAGE_EXTENSIONS, data_hash, list_images, resolve_images_dir

#: Images per unit of an image folder (a cache file each).
DEFAULT_UNIT_IMAGES = 1024
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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


@dataclass(frozen=True)
class ImageSource:
    """Where images come from: a folder, or tar shards."""
    spec: str  # what the user gave
    kind: str  # "folder" | "shards"
    root: str = ""  # the folder (kind "folder")
    shards: tuple[str, ...] = ()  # shard paths in order (kind "shards")

    def units(self, unit_images: int = DEFAULT_UNIT_IMAGES) -> list[Unit]:
        """The source cut into units, in order."""
        if self.kind == "shards":
            return [Unit(i, path, "tar") for i, path in enumerate(self.shards)]
        if unit_images < 1:
            raise DataError(f"unit_images must be >= 1, got {unit_images}")
        files = list_images(self.root)
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
            for name in list_images(self.root):
                digest.update(f"{name}\0{os.path.getsize(os.path.join(self.root, name))}\0".encode())
        return digest.hexdigest()


def open_source(spec: str) -> ImageSource:
    """An image folder, one shard, a brace pattern of shards, a folder of shards, or ``A::B``."""
    spec = str(spec)
    if os.path.isdir(spec):
        spec = resolve_images_dir(spec)  # a split folder (images/ + labels.csv) stands for its images/
        tars = sorted(str(p) for p in Path(spec).iterdir() if p.name.endswith(TAR_SUFFIXES))
        images = [p for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
        if tars and not images:
            return ImageSource(spec, "shards", shards=tuple(tars))
        return ImageSource(spec, "folder", root=spec)
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


def read_unit(unit: Unit, root: str = "") -> tuple[list[Sample], str]:
    """All samples of a unit, in order, and the unit's content hash (sha256 of its bytes).

    Tar units are read whole (a unit's memory is bounded by the shard's size, never by the data
    set's); a missing or damaged tar raises :class:`ShardError` naming it. Samples without an
    image member are dropped (a caption alone cannot be embedded).
    """
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
                key, ext = sample_key(member.name)
                handle = tar.extractfile(member)
                members.setdefault(key, {})[ext] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ShardError(f"shard {unit.name} is damaged ({type(exc).__name__}: {str(exc)[:80]})") from None
    return [_sample(key, parts, unit.name) for key, parts in members.items() if _image_ext(parts)], content


def _image_ext(parts: dict[str, bytes]) -> str | None:
    for ext in parts:
        if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return ext
    return None


def _sample(key: str, parts: dict[str, bytes], shard: str) -> Sample:
    caption = parts["txt"].decode("utf-8", errors="replace").strip() if "txt" in parts else None
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {"_error": f"{shard}: {key}.json is not valid JSON"}
        if not isinstance(meta, dict):
            meta = {"_value": meta}
    return Sample(key=key, image=parts[_image_ext(parts)], caption=caption, meta=meta)


def iter_units(units: list[Unit], rank: int, world: int) -> Iterator[Unit]:
    """The units rank ``rank`` of ``world`` works on (round-robin; disjoint, together all)."""
    return (u for u in units if u.index % world == rank)
