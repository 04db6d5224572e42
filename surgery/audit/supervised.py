"""Supervised CAVs from labelled images: the probe images' normalised embeddings, their class-mean
CAVs, and scores (a), (b) of every vision head along them.
"""
from __future__ import annotations

import torch
from torch import nn

from surgery.audit.cav import CAVError, CAVs, supervised_cavs
from surgery.audit.decompose import decompose
from surgery.audit.head_scores import GroupAccuracyAccumulator, SeparationAccumulator
from surgery.audit.probe import ProbeSet
from surgery.errors import TextAuditError
from surgery.model.encode import image_embeddings


# ------------------------------------------------------------------------------------- supervised CAVs
@torch.no_grad()
def probe_image_embeddings(model: nn.Module, probe: ProbeSet, batch_size: int = 64) -> torch.Tensor:
    """(N, D) normalised image embeddings of the probe images (unedited model), on the CPU."""
    return image_embeddings(model, (imgs for imgs, _ in probe.batches(batch_size)))


def supervised_image_cavs(model: nn.Module, probe: ProbeSet, batch_size: int = 64,
                          image_emb: torch.Tensor | None = None) -> CAVs:
    """Supervised CAVs of the probe's attribute: class means of the normalised image embeddings."""
    emb = image_emb if image_emb is not None else probe_image_embeddings(model, probe, batch_size)
    try:
        return supervised_cavs(emb, probe.groups, probe.group_names, attribute=probe.attribute)
    except CAVError as exc:
        raise TextAuditError(f"supervised CAVs of attribute {probe.attribute!r}: {exc}") from None


@torch.no_grad()
def supervised_vision_scores(model: nn.Module, probe: ProbeSet, cavs: CAVs, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """(a) and (b) of every vision head along supervised CAVs: ``cav_supervised`` (effect size of the
    groups along the supervised CAV basis) and ``group_acc_supervised`` (accuracy against the
    supervised prototypes), streamed over the probe images (one decomposition pass)."""
    device = next(model.parameters()).device
    k = cavs.basis().shape[1]
    dirs = torch.cat([cavs.basis().T, cavs.prototypes]).to(device)  # (k + G, D)
    sep, acc = SeparationAccumulator(cavs.n_groups), GroupAccuracyAccumulator(cavs.n_groups)
    for imgs, sl in probe.batches(batch_size):
        proj = (decompose(model, "vision", imgs.to(device)).heads @ dirs.T).cpu()  # (b, L, H, k + G)
        sep.update(proj[..., :k], probe.groups[sl])
        acc.update(proj[..., k:], probe.groups[sl])
    return {"cav_supervised": sep.result(), "group_acc_supervised": acc.result()}
