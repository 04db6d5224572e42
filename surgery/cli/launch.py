"""Multi-process runs: ``--nproc N`` relaunches the command under torchrun (as ``accelerate launch``
does), and a command running as one rank of a job finds its place in it."""
from __future__ import annotations

import codecs
import functools
import logging
import os
import re
import subprocess
import sys

import click

from surgery.runtime.distributed import LAUNCH_OPTIONS, Ranks, init_ranks, launch_command, rank_log_prefix

_FLAGS = {name: "--" + name.replace("_", "-") for name in ("nproc", *LAUNCH_OPTIONS)}


def launch_options(fn):
    """``--nproc`` and torchrun's multi-node flags, passed to ``fn`` as one dict ``launch``."""
    options = [
        click.option("--nproc", type=int, default=None,
                     help="Run on N processes per machine (launches torchrun; gloo on CPU, NCCL on GPU)."),
        click.option("--nnodes", default=None, help="torchrun: machines (e.g. 2, or 1:4)."),
        click.option("--node-rank", default=None, help="torchrun: this machine's rank (static rendezvous)."),
        click.option("--rdzv-endpoint", default=None, help="torchrun: HOST:PORT of the rendezvous (many machines)."),
        click.option("--rdzv-backend", default=None, help="torchrun: rendezvous backend (default c10d)."),
        click.option("--rdzv-id", default=None, help="torchrun: job id shared by every machine."),
        click.option("--master-addr", default=None, help="torchrun: rank 0's address (static rendezvous)."),
        click.option("--master-port", default=None, help="torchrun: rank 0's port (static rendezvous)."),
    ]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs["launch"] = {name: kwargs.pop(name) for name in _FLAGS}
        return fn(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc`` and the torchrun flags (``--flag value`` and ``--flag=value``)."""
    out, skip = [], False
    flags = set(_FLAGS.values())
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if arg.split("=", 1)[0] in flags and "=" in arg:
            continue
        out.append(arg)
    return out


def relaunch_if_asked(launch: dict) -> None:
    """With ``--nproc N`` outside a torchrun job: run this same command under torchrun and exit
    with its status. Inside a job (or without --nproc): return.

    The ranks' output passes through as it comes; torchrun's own failure report (a traceback of the
    launcher and a table of exit codes) and the copies of one error printed by every rank are
    dropped unless -v is given, so a bad input still ends in one ``Error:`` line.
    """
    nproc = launch.get("nproc")
    if nproc is None or "WORLD_SIZE" in os.environ:
        return
    cmd = launch_command(nproc, strip_launch_flags(sys.argv[1:]), {k: launch[k] for k in LAUNCH_OPTIONS})
    click.echo("launching: " + " ".join(cmd[1:]), err=True)
    if logging.getLogger().getEffectiveLevel() < logging.WARNING:
        sys.exit(subprocess.call(cmd))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    quiet = LauncherFilter()
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
    for chunk in iter(lambda: os.read(proc.stderr.fileno(), 65536), b""):
        sys.stderr.write(quiet.feed(decode.decode(chunk)))
        sys.stderr.flush()
    sys.stderr.write(quiet.feed("", final=True))
    rc = proc.wait()
    if rc and not quiet.errors:
        click.echo(f"Error: a rank failed (exit code {rc}); rerun with -v to see torchrun's report", err=True)
    sys.exit(rc)


class LauncherFilter:
    """Drops torchrun's agent lines (glog-style ``W1129 12:00:00...``), its OMP_NUM_THREADS notice,
    its failure report (from the launcher's traceback on), and repeats of an ``Error:`` line."""

    _AGENT = re.compile(r"^[WEIF]\d{4} \d\d:\d\d:\d\d")

    def __init__(self) -> None:
        self.pending = ""
        self.errors: set[str] = set()
        self.dropping = False

    def feed(self, text: str, final: bool = False) -> str:
        """The part of the stream seen so far to show (segments end at a newline or carriage return)."""
        self.pending += text
        pieces = re.split(r"(?<=[\n\r])", self.pending)
        self.pending = "" if final else pieces.pop()
        return "".join(piece for piece in pieces if self._keep(piece))

    def _keep(self, piece: str) -> bool:
        line = piece.rstrip("\r\n")
        if line.startswith("Traceback (most recent call last)") and self.errors:
            self.dropping = True  # the launcher's report after a rank's one-line error
        if self.dropping or self._AGENT.match(line) or line.startswith("*****") or "OMP_NUM_THREADS" in line:
            return False
        if line.startswith("Error: "):
            if line in self.errors:
                return False
            self.errors.add(line)
        return True


def join_job(device: str = "cpu") -> Ranks:
    """This process's ranks (a job of one without torchrun); log lines of other ranks get a prefix."""
    ranks = init_ranks(device)
    if ranks.distributed:
        prefix = rank_log_prefix(ranks)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
    return ranks


def echo(ranks: Ranks, message: str) -> None:
    """Print on rank 0 only (the other ranks' output would repeat it)."""
    if ranks.main:
        click.echo(message)
