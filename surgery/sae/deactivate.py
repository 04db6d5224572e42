"""Deactivating SAE latents ("social neurons") inside a CLIP: the two exact modules, built from an SAE.

The modules themselves live in :mod:`surgery.model.neurons` (they ride in baked checkpoints);
this module takes what they need out of a :class:`SparseAutoencoder`.

Both act on the last dimension of ``h`` (``(B, N, D)`` residual tokens or ``(B, D)`` embeddings),
use only standard ops (matmul, add, mul, compare, ``topk`` for TopK SAEs) and carry their weights as
buffers, so they trace/export to ONNX and can be baked.

* :class:`PaperDeactivation` (seed 001, needs the whole SAE)::

      h' = (1 - a) h + a * decode(encode(h) with z_S = 0)

* :class:`ErrorPreservingDeactivation` (needs only the rows of S for ReLU / threshold SAEs)::

      h' = h - a * sum_{i in S} z_i(h) * W_dec[i] * scale        (scale: the SAE's input normalisation)

  ``z_i(h) = act((x_n - b_dec) W_enc[:, i] + b_enc[i])`` is exact per latent when ``act`` is
  elementwise: ReLU, or BatchTopK at inference (``pre * (pre > threshold)``). A TopK SAE needs the
  whole encoder to know which latents fire, so for ``kind="topk"`` the module keeps the full
  encoder (still exact, no longer small).

How they relate (exact algebra, any SAE): ``paper(h) = error_preserving(h) - a * (h - sae(h))``.
So the two forms are equal exactly when ``a = 0`` or the SAE reconstructs ``h`` perfectly
(``sae(h) = h``); otherwise the paper form also moves ``h`` toward its reconstruction by ``a``
times the SAE's error, and the error-preserving form leaves that error in place.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgery.model.neurons import FORMS as _MODULES
from surgery.model.neurons import deactivation_module
from surgery.sae.model import SAEError, SparseAutoencoder

FORMS = tuple(_MODULES)  # ("paper", "error_preserving")


def _check(sae: SparseAutoencoder, ids: Sequence[int], alpha: float) -> list[int]:
    ids = sorted({int(i) for i in ids})
    bad = [i for i in ids if not 0 <= i < sae.cfg.width]
    if bad:
        raise SAEError(f"latent ids {bad[:5]} are outside [0, {sae.cfg.width}); check neurons.json against the SAE")
    if not 0.0 <= float(alpha) <= 1.0:
        raise SAEError(f"alpha must be in [0, 1], got {alpha}")
    return ids


def deactivation_buffers(sae: SparseAutoencoder, ids: Sequence[int], form: str) -> dict[str, torch.Tensor]:
    """The buffers the ``form`` module keeps of ``sae`` for latents ``ids`` (sorted, in range)."""
    if form == "paper":
        keep = torch.ones(sae.cfg.width)  # (F,)
        keep[list(ids)] = 0.0
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "shift", "scale", "threshold")
        return {**{n: getattr(sae, n).detach().clone() for n in names}, "keep": keep}
    idx = torch.tensor(list(ids), dtype=torch.long)  # (S,)
    buffers = {n: getattr(sae, n).detach().clone() for n in ("b_dec", "shift", "scale", "threshold")}
    buffers["W_dec_S"] = sae.W_dec.detach()[idx].clone()  # (S, D)
    if sae.cfg.kind == "topk":  # which latents fire needs the whole encoder
        buffers.update(W_enc=sae.W_enc.detach().clone(), b_enc=sae.b_enc.detach().clone(), idx=idx)  # (D, F), (F,)
    else:
        buffers.update(W_enc_S=sae.W_enc.detach()[:, idx].clone(), b_enc_S=sae.b_enc.detach()[idx].clone())
    return buffers


def deactivation(sae: SparseAutoencoder, ids: Sequence[int], alpha: float = 0.6, form: str = "paper") -> nn.Module:
    """The deactivation module of ``form`` ("paper" | "error_preserving") for latents ``ids`` of ``sae``."""
    if form not in FORMS:
        raise SAEError(f"unknown deactivation form {form!r}; allowed: {', '.join(FORMS)}")
    ids = _check(sae, ids, alpha)
    return deactivation_module(form, deactivation_buffers(sae, ids, form), kind=sae.cfg.kind, k=sae.cfg.k,
                               alpha=alpha, ids=ids)
