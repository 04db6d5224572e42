"""Replay a fixed-shape forward as a CUDA graph: one capture, then a copy-in and a replay per call.

The audit's ablation sweep runs the same masked forward (blocks ``l..L-1`` under one (H*b, H) head
mask) for every batch of probe images; on a GPU at ViT-B sizes the host time of launching its
kernels (attention, matmuls, norms) is a large share of each call. :class:`StaticShapeGraph`
captures ``fn`` once per input signature and replays it with the new inputs copied into static
buffers. Off CUDA (or disabled) it calls ``fn`` eagerly, so callers need no second code path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Signature = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


class StaticShapeGraph:
    """``fn(*tensors) -> tensor``, captured as a CUDA graph per input signature and replayed.

    On CUDA (``enabled``): the first call with a given signature (shapes, dtypes, devices of the
    inputs) runs ``fn`` ``warmup`` times on a side stream (compiles Triton kernels and fills their
    launch cache, so no autotuning happens during capture), then captures one call on static copies
    of the inputs. Every call copies its inputs into those buffers, replays the graph and returns a
    clone of the static output. Elsewhere: ``fn(*tensors)``.

    ``fn`` must read its varying data only from its tensor arguments (anything else it reads, e.g.
    weights or a constant fill, must stay alive and unchanged while the wrapper is used), must not
    synchronise the host (no ``.item()``, no ``bool(tensor)``), and should run under ``torch.no_grad``.
    Ambient state such as ``torch.autocast`` applies at capture time; use ``cache_enabled=False``
    with autocast. Graphs captured by one wrapper share one memory pool (they are replayed one at a
    time, and each output is cloned before the next replay).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, enabled: bool = True, warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.fn = fn
        self.enabled = enabled
        self.warmup = warmup
        self._graphs: dict[Signature, tuple[list[torch.Tensor], torch.Tensor, object]] = {}
        self._pool = None

    @property
    def captured(self) -> int:
        """How many graphs (input signatures) this wrapper holds."""
        return len(self._graphs)

    def uses_graphs(self, *tensors: torch.Tensor) -> bool:
        """True when a call with these inputs replays a CUDA graph (enabled, all inputs on CUDA)."""
        return self.enabled and bool(tensors) and all(t.is_cuda for t in tensors)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if not self.uses_graphs(*tensors):
            return self.fn(*tensors)
        key: Signature = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(tensors)
        static_in, static_out, graph = entry
        for buf, t in zip(static_in, tensors):
            buf.copy_(t)
        graph.replay()
        return static_out.clone()

    def _capture(self, tensors: tuple[torch.Tensor, ...]):
        static_in = [t.clone() for t in tensors]
        side = torch.cuda.Stream(device=static_in[0].device)
        side.wait_stream(torch.cuda.current_stream(static_in[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_in)
        torch.cuda.current_stream(static_in[0].device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.fn(*static_in)
        return static_in, static_out, graph

    def reset(self) -> None:
        """Drop every captured graph (and its memory)."""
        self._graphs.clear()
        self._pool = None
