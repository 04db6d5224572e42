"""The open-vocabulary balance as it rides in a CLIP's text tower: a per-text closed-form correction.

For every text embedding ``t`` (unnormalised, ``(B, D)``) the module looks up, in a bank of
group-labelled image embeddings (rows L2-normalised, sorted by group), each group's ``M`` images
nearest ``t``, takes their means ``m_g`` and applies the least change of ``t`` that gives it equal
evidence in every group (METHODS.md, "Open vocabulary")::

    D     = [m_1 - m_0, ..., m_{G-1} - m_0]                 (B, G-1, D)
    delta = -D^T (D D^T)^-1 D t                             (B, D): D (t + delta) = 0
    t'    = t + gate(t) * delta

``gate(t)`` leaves texts that name a group alone. A text's *lean* is how far it points toward one
group prompt, in units of the group prompts' own lean::

    c_g      = p_g - mean_h p_h          (p: the normalised group prompts; c: ``contrast``, (G, D))
    lean(t)  = max_g (t / |t|) . c_g / lean_ref,   lean_ref = mean_g p_g . c_g
    gate(t)  = clamp((gate_hi - lean(t)) / (gate_hi - gate_lo), 0, 1)

so a group prompt itself has lean 1 and gate 0, and a text leaning no more than ``gate_lo`` is
corrected fully. ``iterations > 1`` re-chooses the neighbourhoods under the corrected text and
solves again from ``t`` (the gate stays that of ``t``).

The (G-1) x (G-1) solve is an unrolled Cholesky factorisation (G is fixed by the bank), so the
module uses only MatMul, TopK, Gather, ReduceMean/Max, Sqrt, Div and Clip: it exports to standard
ONNX ops with the text tower. Buffers travel in the state dict under
``clipsurgery_open_balance.*``; a plain open_clip ``load_state_dict(strict=True)`` refuses them by
that name, and :func:`surgery.load` re-attaches the module from the plan in the checkpoint's metadata.
"""
from __future__ import annotations

import types
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from surgery.errors import SurgeryError

MODULE_NAME = "clipsurgery_open_balance"
#: The Gram matrix's ridge, relative to its mean diagonal (two neighbourhood means that coincide
#: would make it singular).
GRAM_RIDGE = 1e-6
_TINY = 1e-12


class OpenBalance(nn.Module):
    """See the module docstring. ``bank (n, D)`` rows sorted by group, ``group_counts`` rows per
    group (each >= ``neighbours``), ``contrast (G, D)``."""

    def __init__(self, bank: torch.Tensor, contrast: torch.Tensor, *, group_counts: Sequence[int], neighbours: int,
                 lean_ref: float, gate_lo: float, gate_hi: float, iterations: int = 1):
        super().__init__()
        counts = [int(c) for c in group_counts]
        if len(counts) < 2 or sum(counts) != bank.shape[0] or contrast.shape != (len(counts), bank.shape[1]):
            raise SurgeryError(f"open balance: bank {tuple(bank.shape)}, group counts {counts} and contrast "
                               f"{tuple(contrast.shape)} do not fit (n = sum of counts, G >= 2, D shared)")
        if min(counts) < neighbours or neighbours < 1:
            raise SurgeryError(f"open balance: every group needs at least {neighbours} bank images, counts {counts}")
        if not gate_hi > gate_lo:
            raise SurgeryError(f"open balance: gate_hi {gate_hi} must be above gate_lo {gate_lo}")
        self.register_buffer("bank", bank.float())
        self.register_buffer("contrast", contrast.float())
        self.group_counts, self.neighbours, self.iterations = counts, int(neighbours), int(iterations)
        self.lean_ref, self.gate_lo, self.gate_hi = float(lean_ref), float(gate_lo), float(gate_hi)
        starts = [0]
        for c in counts[:-1]:
            starts.append(starts[-1] + c)
        self.starts = starts

    def lean(self, t: torch.Tensor) -> torch.Tensor:
        """(B,): how far each text points toward one group prompt (1 = as far as a group prompt)."""
        unit = t / t.norm(dim=-1, keepdim=True).clamp_min(_TINY)
        return (unit @ self.contrast.T).max(dim=-1).values / self.lean_ref

    def gate(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) in [0, 1]: the share of the correction applied (0 for a text naming a group)."""
        return ((self.gate_hi - self.lean(t)) / (self.gate_hi - self.gate_lo)).clamp(0.0, 1.0)

    def neighbourhood_means(self, t: torch.Tensor) -> torch.Tensor:
        """(B, G, D): each group's mean bank image over its ``neighbours`` images nearest ``t``."""
        scores = t @ self.bank.T  # (B, n); the ranking needs no normalisation of t
        means = []
        for start, count in zip(self.starts, self.group_counts):
            rows = self.bank[start:start + count]  # (n_g, D)
            top = scores[:, start:start + count].topk(self.neighbours, dim=-1).indices  # (B, M)
            means.append(rows[top].mean(dim=1))  # (B, D)
        return torch.stack(means, dim=1)

    def correction(self, t: torch.Tensor, around: torch.Tensor) -> torch.Tensor:
        """(B, D): the least change of ``t`` with equal scores on the neighbourhoods of ``around``."""
        means = self.neighbourhood_means(around)  # (B, G, D)
        diffs = means[:, 1:] - means[:, :1]  # (B, G-1, D)
        gram = diffs @ diffs.transpose(1, 2)  # (B, G-1, G-1)
        rhs = (diffs @ t.unsqueeze(-1)).squeeze(-1)  # (B, G-1)
        coef = spd_solve(gram, rhs)  # (B, G-1)
        return -(coef.unsqueeze(-1) * diffs).sum(dim=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        gate = self.gate(t).unsqueeze(-1)  # (B, 1)
        current = t
        for _ in range(self.iterations):
            current = t + gate * self.correction(t, current)
        return current


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with ``a x = b`` for symmetric positive semi-definite ``a (B, k, k)``, ``b (B, k)``, by an
    unrolled Cholesky factorisation of ``a + ridge`` (elementwise ops only: exports for a fixed k)."""
    k = a.shape[-1]
    scale = sum(a[:, i, i] for i in range(k)) / k  # (B,)
    ridge = GRAM_RIDGE * scale + _TINY
    low: list[list[torch.Tensor | None]] = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            s = a[:, i, j] + (ridge if i == j else 0.0)
            for p in range(j):
                s = s - low[i][p] * low[j][p]
            low[i][j] = s.clamp_min(_TINY).sqrt() if i == j else s / low[j][j]
    y: list[torch.Tensor] = []
    for i in range(k):
        s = b[:, i]
        for p in range(i):
            s = s - low[i][p] * y[p]
        y.append(s / low[i][i])
    x: list[torch.Tensor | None] = [None] * k
    for i in reversed(range(k)):
        s = y[i]
        for p in range(i + 1, k):
            s = s - low[p][i] * x[p]
        x[i] = s / low[i][i]
    return torch.stack(x, dim=-1)


def _encode_text_with_open_balance(self: nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """CLIP keeps its text tower on the model itself: encode_text, then the open balance."""
    out = getattr(self, MODULE_NAME)(type(self).encode_text(self, text, normalize=False))
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _text_output_hook(tower: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return getattr(tower, MODULE_NAME)(out)


def text_host(model: nn.Module) -> nn.Module:
    """The module that owns the text embedding: ``model.text`` (CustomTextCLIP) or CLIP itself."""
    return model.text if hasattr(model, "text") else model


def attach_open_balance(model: nn.Module, module: OpenBalance) -> None:
    """Run ``module`` on ``model``'s text embedding (a child module found by name at call time, so
    copies of the model run their own copy)."""
    host = text_host(model)
    if hasattr(host, MODULE_NAME):
        raise SurgeryError("the text tower already has an open balance; a plan holds at most one")
    host.add_module(MODULE_NAME, module.eval())
    if host is model:
        model.encode_text = types.MethodType(_encode_text_with_open_balance, model)
    else:
        host.register_forward_hook(_text_output_hook)


def split_open_balance_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the rest, the open balance's buffers by their names inside the module) of a state dict."""
    mine = {k.split(f"{MODULE_NAME}.", 1)[1]: v for k, v in state.items() if f"{MODULE_NAME}." in k}
    return {k: v for k, v in state.items() if f"{MODULE_NAME}." not in k}, mine


def open_balance_from_state(edit: Mapping, buffers: Mapping[str, torch.Tensor]) -> OpenBalance:
    """Rebuild the module from a checkpoint's buffers and its plan entry (a plain dict)."""
    missing = [name for name in ("bank", "contrast") if name not in buffers]
    if missing:
        raise SurgeryError(f"the checkpoint's open balance lacks {', '.join(missing)}; export it again")
    try:
        return OpenBalance(buffers["bank"], buffers["contrast"], group_counts=list(edit["group_counts"]),
                           neighbours=int(edit["neighbours"]), lean_ref=float(edit["lean_ref"]),
                           gate_lo=float(edit["gate_lo"]), gate_hi=float(edit["gate_hi"]),
                           iterations=int(edit.get("iterations", 1)))
    except (KeyError, TypeError, ValueError) as exc:
        raise SurgeryError(f"the checkpoint's plan has a malformed open balance entry ({exc}); export it again") from None
