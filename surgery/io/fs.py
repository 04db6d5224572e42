"""Atomic file output: write to a temporary file beside the target, then rename.

A reader never sees a half-written file, a failed write leaves nothing behind, and an input is
never overwritten by mistake.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from surgery.errors import SurgeryError


#: What a full or read-only disk raises (an OSError's errno): the message says so in one line.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def disk_error_message(exc: BaseException, target: str | os.PathLike | None, *, atomic: bool = True) -> str | None:
    """One line for an OSError of a full, read-only or forbidden disk while writing ``target``
    (``atomic``: the write was atomic, so nothing was left half-written); None for any other error
    (a bug, not the user's disk)."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS:
        return None
    reason = (exc.strerror or os.strerror(exc.errno)).lower()
    hint = "free some space and rerun" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
        "choose a folder you can write in"
    done = "; nothing was half-written" if atomic else ""
    return f"cannot write {target or 'the output'} ({reason}){done}: {hint}"


def check_output_path(out: str | os.PathLike, *, inputs: tuple = (), force: bool = False,
                      exists_hint: str = "pass --force to overwrite it") -> Path:
    """Refuse an output that is an input (a file given, or an existing file inside an input folder:
    ``inputs`` may name files and folders; None entries are skipped), anything that is not a regular
    file (a device, a named pipe, a socket: --force never replaces one), or an existing output without
    ``force`` (``exists_hint`` says what to do instead: commands without --force name another way)."""
    out_path = Path(out)
    check_not_input(out_path, inputs)
    check_regular(out_path)
    if out_path.exists() and not force:
        raise SurgeryError(f"{out} already exists; {exists_hint}")
    if out_path.is_dir():
        raise SurgeryError(f"{out} is a folder; give a file path (--force replaces files, never folders)")
    parent = out_path.parent
    if not parent.exists():
        raise SurgeryError(f"folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise SurgeryError(f"{parent} is a file, not a folder; choose another output path")
    check_writable(parent)
    return out_path


def check_not_input(out: str | os.PathLike, inputs: tuple = ()) -> None:
    """Refuse an output path that is one of ``inputs`` (the same file, a link to it included) or an
    existing file inside an input folder (an image under --images, an SAE's weights)."""
    out_path = Path(out)
    if not os.path.lexists(out_path):
        return
    real = os.path.realpath(out_path)
    for item in inputs:
        if item is None or not os.path.exists(item):
            continue
        if os.path.isdir(item) and not os.path.isdir(out_path):
            folder = os.path.realpath(item)
            if os.path.commonpath([folder, real]) == folder:
                raise SurgeryError(f"output {out} lies in the input folder {item}; choose another output path")
        elif os.path.exists(out_path) and os.path.samefile(out_path, item):
            raise SurgeryError(f"output {out} is the input file {item}; choose another output path")


def check_regular(out: str | os.PathLike) -> None:
    """Refuse an existing output that is not a regular file or a folder (a device such as /dev/null,
    a named pipe, a socket): writing would replace it, or block."""
    try:
        mode = os.stat(out).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the folder checks explain a file above it)
        return
    except OSError as exc:
        raise SurgeryError(f"cannot use {out} as an output ({(exc.strerror or str(exc)).lower()})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise SurgeryError(f"{out} is {kind}, not a regular file; clipsurgery writes regular files only: "
                           "choose another output path")


def check_output_folder(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse a report folder that exists with files in it unless ``force`` (then the tool's own
    files are rewritten and nothing else is touched), a file standing where the folder should be,
    and a place where nothing can be written."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"{out_dir} is a file, not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise SurgeryError(f"{out_dir} already holds files; pass --force to write the report into it, or "
                           "choose another --out")
    check_folder_writable(path)
    return path


def check_folder_writable(folder: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be made or written in: a file stands at it (or above
    it), or the nearest folder that exists is read-only. Nothing is created."""
    path = Path(os.path.abspath(folder))
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"{folder} is a file, not a folder; choose another output folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SurgeryError(f"{existing} is a file, not a folder; choose another output folder")
    check_writable(existing)


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse a folder where a file cannot be created (read-only, /proc, no permission): found by
    creating and removing a probe file, the only test that does not lie (root, special filesystems)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".clipsurgery-probe-", dir=folder)
    except OSError as exc:
        raise SurgeryError(f"cannot write in {folder} ({exc.strerror.lower()}); choose another output folder") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it is renamed to ``out``, else removed."""
    out_path = Path(out)
    check_regular(out_path)  # never replace a device or a named pipe, whoever called
    parent = str(out_path.parent or ".")
    remove_stale_staging(f".{out_path.name}.", parent)  # temp files of a killed (SIGKILL) earlier write
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.{os.getpid()}-", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise SurgeryError(f"cannot write {out} ({exc.strerror.lower()}); choose another output path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp (and some writers) leave 0600: normal permissions
        os.replace(tmp_path, out_path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        message = disk_error_message(exc, out)
        if message:  # a full or read-only disk: one line for the user, and nothing left behind
            raise SurgeryError(message) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return str(path)


def staging_dir(prefix: str, parent: str | None = None) -> str:
    """A new staging folder ``<prefix><pid>-<random>`` in ``parent`` (default: the temp folder).

    Stale ones (their process is gone: killed with SIGKILL, or a crash) are removed first, so a
    killed run leaves nothing behind after the next one.
    """
    parent = parent or tempfile.gettempdir()
    remove_stale_staging(prefix, parent)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def remove_stale_staging(prefix: str, parent: str) -> list[str]:
    """Remove ``<prefix><pid>-*`` folders and files in ``parent`` whose process no longer runs;
    returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.name.startswith(prefix) or entry.is_symlink():
                continue
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
