"""Atomic file output: write to a temporary file beside the target, then rename.

A reader never sees a half-written file, a failed write leaves nothing behind, and an input is
never overwritten by mistake.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from surgery.errors import SurgeryError


def check_output_path(out: str | os.PathLike, *, inputs: tuple = (), force: bool = False) -> Path:
    """Refuse an output equal to an input, or an existing output without ``force``."""
    out_path = Path(out)
    for item in inputs:
        if item is not None and os.path.exists(item) and out_path.exists() and os.path.samefile(out_path, item):
            raise SurgeryError(f"output {out} is the input file; choose another output path")
    if out_path.exists() and not force:
        raise SurgeryError(f"{out} already exists; pass --force to overwrite it")
    if out_path.parent and not out_path.parent.exists():
        raise SurgeryError(f"folder {out_path.parent} does not exist; create it first")
    return out_path


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it is renamed to ``out``, else removed."""
    out_path = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp (and some writers) leave 0600: normal permissions
        os.replace(tmp_path, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return str(path)
