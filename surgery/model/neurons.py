"""SAE neuron deactivation as it rides in a CLIP: the two exact modules, attached at the SAE's site.

The modules are rebuilt from plain values and buffers (no SAE class, no SurgeryPlan here):
:func:`surgery.sae.deactivation` builds them from an SAE, :func:`surgery.edit.bake.bake` attaches
them, and :func:`surgery.load` re-attaches them from a checkpoint's buffers and the neuron edits
(plain dicts) stored in its metadata.

* :class:`PaperDeactivation` (seed 001, needs the whole SAE)::

      h' = (1 - a) h + a * decode(encode(h) with z_S = 0)

* :class:`ErrorPreservingDeactivation` (needs only the rows of S for ReLU / threshold SAEs)::

      h' = h - a * sum_{i in S} z_i(h) * W_dec[i] * scale        (scale: the SAE's input normalisation)

Both act on the last dimension of ``h`` (``(B, N, D)`` residual tokens or ``(B, D)`` embeddings)
and use only standard ops, so they trace/export to ONNX.

An attached module becomes a submodule
whose buffers travel in the state dict under ``<owner>.clipsurgery_neurons_<site>.*``
(owner ``visual`` for the vision tower, the text owner otherwise) and a forward hook applies it:
before the final norm on every token (site ``residual``) or on the tower's output (``embedding``).
Hooks run during ONNX tracing, so exports include it; a model with neuron edits is no longer a
plain open_clip state dict, and :func:`surgery.load` re-attaches the modules from the plan stored
in the checkpoint's metadata.
"""
from __future__ import annotations

import types
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.model.towers import get_towers

PREFIX = "clipsurgery_neurons_"


def module_name(site: str) -> str:
    return f"{PREFIX}{site}"


def _host(model: nn.Module, tower: str, site: str) -> nn.Module:
    """The module that owns (and runs) the deactivation module: the tower's final norm for the
    residual site, the vision tower / text tower / CLIP itself for the embedding site."""
    if site == "residual":
        return get_towers(model)[tower].final_norm
    if tower == "vision":
        return model.visual
    return model.text if hasattr(model, "text") else model


def _residual_hook(norm: nn.Module, args: tuple) -> tuple:
    # Looked up on the hooked module at call time, so deepcopy / .to() / .half() carry it along.
    return (getattr(norm, module_name_residual)(args[0]),) + tuple(args[1:])


def _embedding_hook(tower: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return getattr(tower, module_name_embedding)(out)


def _encode_text_with_neurons(self: nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """CLIP keeps its text tower on the model itself: encode_text, then the embedding-site module."""
    out = getattr(self, module_name_embedding)(type(self).encode_text(self, text, normalize=False))
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


module_name_residual = f"{PREFIX}residual"
module_name_embedding = f"{PREFIX}embedding"


def attach(model: nn.Module, tower: str, site: str, module: nn.Module) -> None:
    """Attach ``module`` (h -> h') at ``tower``'s ``site``: a child of its host module plus a hook
    that finds it by name (no closures), so copies of the model run their own copy of it."""
    host = _host(model, tower, site)
    name = module_name(site)
    if hasattr(host, name):
        raise SurgeryError(f"{tower}/{site} already has a neuron edit; merge the ids into one edit")
    host.add_module(name, module)
    if site == "residual":
        host.register_forward_pre_hook(_residual_hook)
    elif host is model:  # CLIP's text embedding: a bound method, rebound by deepcopy
        model.encode_text = types.MethodType(_encode_text_with_neurons, model)
    else:
        host.register_forward_hook(_embedding_hook)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(open_clip part, neuron-module part) of a patched state dict."""
    neurons = {k: v for k, v in state.items() if PREFIX in k}
    return {k: v for k, v in state.items() if PREFIX not in k}, neurons


def reattach(model: nn.Module, edits: Sequence[Mapping], state: dict[str, torch.Tensor]) -> None:
    """Rebuild the neuron modules of a loaded patched checkpoint from its stored buffers.

    ``edits``: the neuron edits of the checkpoint's plan as plain dicts (``tower``, ``site``,
    ``form``, ``kind``, ``k``, ``alpha``, ``ids``); every stored neuron weight must belong to one.
    """
    names = {id(m): n for n, m in model.named_modules()}
    claimed: set[str] = set()
    for edit in edits:
        tower, site = edit.get("tower", "vision"), edit.get("site", "residual")
        if edit.get("kind") is None:
            raise SurgeryError("checkpoint's plan lacks the SAE kind of a neuron edit; re-bake it with this version")
        host_path = names[id(_host(model, tower, site))]
        prefix = f"{host_path + '.' if host_path else ''}{module_name(site)}."
        buffers = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not buffers:
            raise SurgeryError(f"checkpoint's plan has a {tower}/{site} neuron edit but no weights for it")
        claimed.update(prefix + k for k in buffers)
        module = deactivation_module(edit.get("form", "paper"), buffers, kind=edit["kind"], k=int(edit.get("k") or 0),
                                     alpha=float(edit.get("alpha", 0.6)), ids=list(edit["ids"]))
        attach(model, tower, site, module)
    stray = sorted(set(state) - claimed)
    if stray:
        raise SurgeryError(f"checkpoint has neuron-module weights its plan does not describe (e.g. {stray[0]}); "
                           "it was re-baked without merging plans: bake again from the original")


class PaperDeactivation(nn.Module):
    """``h' = (1 - a) h + a * decode(encode(h) * keep)``, ``keep[i] = 0`` for i in S else 1."""
    BUFFERS = ("W_enc", "b_enc", "W_dec", "b_dec", "shift", "scale", "threshold", "keep")

    def __init__(self, buffers: Mapping[str, torch.Tensor], *, kind: str, k: int, alpha: float, ids: Sequence[int]):
        """``buffers``: W_enc (D, F), b_enc (F,), W_dec (F, D), b_dec (D,), shift, scale, threshold, keep (F,)."""
        super().__init__()
        self.kind, self.k, self.alpha, self.ids = kind, int(k), float(alpha), list(ids)
        _register(self, buffers, self.BUFFERS)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        x_n = (h - self.shift) / self.scale
        pre = (x_n - self.b_dec) @ self.W_enc + self.b_enc  # (..., F)
        if self.kind == "relu":
            z = torch.relu(pre)
        elif self.kind == "topk":
            top = pre.topk(self.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        else:  # batchtopk at inference: the learned threshold
            z = pre * (pre > self.threshold).to(pre.dtype)
        recon = ((z * self.keep) @ self.W_dec + self.b_dec) * self.scale + self.shift  # (..., D)
        return (1.0 - self.alpha) * h + self.alpha * recon


class ErrorPreservingDeactivation(nn.Module):
    """``h' = h - a * (z_S(h) @ W_dec[S]) * scale``; keeps only S's encoder columns and decoder rows
    (the whole encoder for TopK SAEs, see the module docstring)."""

    BUFFERS = ("b_dec", "shift", "scale", "threshold", "W_dec_S")
    TOPK_BUFFERS = ("W_enc", "b_enc", "idx")  # TopK: the whole encoder (D, F), (F,) and the ids (S,)
    SUBSET_BUFFERS = ("W_enc_S", "b_enc_S")  # otherwise: S's encoder columns (D, S) and biases (S,)

    def __init__(self, buffers: Mapping[str, torch.Tensor], *, kind: str, k: int, alpha: float, ids: Sequence[int]):
        """``buffers``: b_dec (D,), shift, scale, threshold, W_dec_S (S, D), then TOPK_ or SUBSET_BUFFERS."""
        super().__init__()
        self.kind, self.k, self.alpha, self.ids = kind, int(k), float(alpha), list(ids)
        _register(self, buffers, self.BUFFERS + (self.TOPK_BUFFERS if kind == "topk" else self.SUBSET_BUFFERS))

    def latents(self, h: torch.Tensor) -> torch.Tensor:
        """z_S(h): (..., D) -> (..., S)."""
        x_n = (h - self.shift) / self.scale - self.b_dec
        if self.kind == "topk":
            pre = x_n @ self.W_enc + self.b_enc  # (..., F)
            top = pre.topk(self.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            return z.index_select(-1, self.idx)
        pre = x_n @ self.W_enc_S + self.b_enc_S  # (..., S)
        if self.kind == "relu":
            return torch.relu(pre)
        return pre * (pre > self.threshold).to(pre.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return h - self.alpha * (self.latents(h) @ self.W_dec_S) * self.scale


FORMS = {"paper": PaperDeactivation, "error_preserving": ErrorPreservingDeactivation}


def _register(module: nn.Module, buffers: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in buffers]
    if missing:
        raise SurgeryError(f"neuron module {type(module).__name__} lacks buffers {', '.join(missing)}; "
                           "the checkpoint is damaged or from another version: bake it again")
    for name in names:
        module.register_buffer(name, buffers[name])


def deactivation_module(form: str, buffers: Mapping[str, torch.Tensor], *, kind: str, k: int, alpha: float,
                        ids: Sequence[int]) -> nn.Module:
    """The deactivation module of ``form`` ("paper" | "error_preserving") from its buffers, in eval mode."""
    if form not in FORMS:
        raise SurgeryError(f"unknown deactivation form {form!r}; allowed: {', '.join(FORMS)}")
    return FORMS[form](buffers, kind=kind, k=k, alpha=alpha, ids=ids).eval()
