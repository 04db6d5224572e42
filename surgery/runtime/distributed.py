"""Ranks of a torch.distributed job, and the few collectives the pipeline needs.

A job is launched by ``torchrun`` (``torchrun --nproc-per-node N -m surgery ...``), which sets
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/... in each process's environment; :func:`init_ranks` joins
the process group (gloo on the CPU, NCCL when the job runs on CUDA). Without those variables the
process is a job of one, every collective is the identity and nothing is initialised, so a single
process costs nothing extra.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

import torch

from surgery.errors import DataError

#: torchrun's options that pass through the ``--nproc`` convenience (``--nnodes``, ``--rdzv-endpoint``, ...).
LAUNCH_OPTIONS = ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id", "master_addr", "master_port")


@dataclass
class Ranks:
    """This process's place in the job. ``rank`` 0 of ``world`` 1 is a single process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" | "nccl" when a process group was initialised by init_ranks
    _owns_group: bool = field(default=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over ranks (``sum`` | ``max`` | ``min``); returns ``tensor``. Identity for one process."""
        if self.distributed:
            ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                   "min": torch.distributed.ReduceOp.MIN}
            torch.distributed.all_reduce(tensor, op=ops[op])
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.distributed:
            torch.distributed.broadcast(tensor, src=src)
        return tensor

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable, small), in rank order."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def all_gather_padded(self, values: torch.Tensor, length: int, fill: float) -> torch.Tensor:
        """Concatenate every rank's 1-d ``values`` (each at most ``length`` long), padded with ``fill``:
        (world * length,)."""
        if values.numel() > length:
            raise ValueError(f"{values.numel()} values do not fit a gather of {length}")
        padded = torch.full((length,), fill, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        if not self.distributed:
            return padded
        out = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(out, padded)
        return torch.cat(out)

    def add_counter(self, name: str, amount: int) -> int:
        """Add to a job-wide counter (in the rendezvous store, so ranks need not call it in step);
        returns the new total. A single process keeps it in memory."""
        if not self.distributed:
            counters = self.__dict__.setdefault("_counters", {})
            counters[name] = counters.get(name, 0) + amount
            return counters[name]
        store = torch.distributed.distributed_c10d._get_default_store()
        return int(store.add(f"clipsurgery/{name}", amount))

    def close(self) -> None:
        """Leave the process group if :func:`init_ranks` made it."""
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False


def init_ranks(device: str = "cpu", timeout_s: float = 1800.0) -> Ranks:
    """Join the job torchrun started (its environment variables), or return a job of one.

    ``device``: "cpu" -> gloo, "cuda" -> NCCL (each rank on ``cuda:LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.distributed.is_initialized():
        return Ranks(rank, world, local_rank, torch.distributed.get_backend())
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Ranks(rank, world, local_rank, backend, _owns_group=True)


def agree(ranks: Ranks, what: dict[str, str]) -> None:
    """Refuse to start when ranks disagree on ``what`` (model hash, data, options...): a
    :class:`DataError` naming each differing key and the ranks' values. Every rank raises it."""
    if not ranks.distributed:
        return
    views = ranks.all_gather_objects(dict(what))
    differences = []
    for key in sorted(set().union(*views)):
        values = [str(v.get(key))[:16] for v in views]
        if len(set(values)) > 1:
            differences.append(f"{key}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values)))
    if differences:
        raise DataError("the ranks disagree on " + "; ".join(differences)
                        + "; every rank must see the same model, data and options")


def rank_log_prefix(ranks: Ranks) -> str:
    """Prefix for log lines of ranks other than 0 (rank 0 logs plainly)."""
    return "" if ranks.main else f"[rank {ranks.rank}/{ranks.world}] "


def launch_command(nproc: int, argv: Sequence[str], options: dict[str, Any] | None = None) -> list[str]:
    """The torchrun command that runs ``python -m surgery ARGV`` on ``nproc`` processes per node
    (what ``--nproc N`` launches for the user). ``options``: torchrun's multi-node flags
    (:data:`LAUNCH_OPTIONS`), ``None`` values left out."""
    if nproc < 1:
        raise DataError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    options = dict(options or {})
    if not any(options.get(k) for k in ("nnodes", "rdzv_endpoint", "master_addr")):
        cmd.append("--standalone")  # one machine: a local rendezvous on a free port
    for key in LAUNCH_OPTIONS:
        value = options.get(key)
        if value not in (None, ""):
            cmd.append(f"--{key.replace('_', '-')}={value}")
    return cmd + ["-m", "surgery", *argv]
