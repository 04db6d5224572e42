"""What ``clipsurgery audit`` does, out of the CLI: open the model, build the probes, audit the
vision and/or text tower, write audit.json, heatmaps, report.md and plan.json."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from surgery.audit.cav import CAVs, prompt_set
from surgery.audit.probe import ProbeSet, folder_probe_set, world_probe_set
from surgery.audit.report import write_audit
from surgery.audit.supervised import probe_image_embeddings, supervised_image_cavs, supervised_vision_scores
from surgery.audit.text import TextAuditOptions, TextAuditResult, audit_text
from surgery.audit.text_probe import TextProbe, text_probe, world_text_probe
from surgery.audit.vision import DEFAULT_SWEEP_TOP, AuditOptions, AuditResult, audit_vision
from surgery.errors import SurgeryError
from surgery.model.device import DEVICE_CHOICES, Placement, resolve_placement
from surgery.model.loading import LoadedModel, load
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import balanced_size, check_eval_size

TOWER_CHOICES = ("vision", "text", "both")


@dataclass
class AuditRunOptions:
    tower: str = "vision"  # "vision" | "text" (from prompts, no images needed) | "both"
    attribute: str | None = None  # protected attribute (default: the labels' column; a world: group; else gender)
    prompts_path: str | None = None  # group prompts per attribute, JSON/YAML (default: built-in)
    top_k: int = 3  # heads the proposed plan soft-prunes (per tower; vision: at most, chosen as a measured set)
    max_accuracy_drop: float = 0.02  # vision: concept accuracy (fraction) the proposed set may cost on the probe
    k: int = 50  # MaxSkew@K
    n_probe: int | None = None  # world models: probe images generated (None: ~1200, a multiple of concepts x groups)
    ablation: str = "mean"  # "mean" | "zero"
    sweep: bool = True  # run the causal ablation sweep (c)
    sweep_top: int | None = DEFAULT_SWEEP_TOP  # ...on the top of the cheap ranking (None: every head)
    batch_size: int = 64
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:N"
    autocast: bool = True  # on CUDA: bf16 autocast for the ablation sweep (c) only; everything else stays fp32

    def __post_init__(self) -> None:
        if self.tower not in TOWER_CHOICES:
            raise SurgeryError(f"unknown tower {self.tower!r}; choose one of {', '.join(TOWER_CHOICES)}")
        if not (self.device in DEVICE_CHOICES or self.device.startswith("cuda:")):
            raise SurgeryError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")

    def placement(self) -> Placement:
        """The resolved (device, attention backend, autocast dtype) this audit runs with."""
        return resolve_placement(self.device, autocast=self.autocast)


@dataclass
class AuditRun:
    """The results of one audit run: either tower's result (or None) and the report's context."""

    vision: AuditResult | None
    text: TextAuditResult | None
    context: dict = field(default_factory=dict)
    placement: Placement | None = None  # where it ran (device, attention backend, autocast)

    def summary_lines(self, options: AuditRunOptions) -> list[str]:
        lines = []
        if self.vision is not None:
            lines.append(f"unedited: mean MaxSkew@{options.k} {self.vision.baseline.get('max_skew', float('nan')):.4f}")
            if self.vision.spearman_gradient_vs_ablation is not None:
                lines.append(f"Spearman (d) gradient vs (c) ablation: {self.vision.spearman_gradient_vs_ablation:.3f}")
            lines.append("top heads by the cheap scores: "
                         + ", ".join(f"L{l}.H{h}" for l, h in self.vision.cheap_rank[:options.top_k]))
            prov = self.vision.plan.provenance
            chosen = ", ".join(f"L{e.layer}.H{e.head}" for e in self.vision.plan.heads) or "none (no head lowered bias"
            chosen += "" if self.vision.plan.heads else " within the accuracy budget)"
            lines.append(f"proposed set (measured together): {chosen}; mean MaxSkew@{options.k} "
                         f"{prov['before']['max_skew']:.4f} -> {prov['after']['max_skew']:.4f}")
        if self.text is not None:
            measure = self.text.measure
            lines.append(f"text tower: unedited {measure} {self.text.baseline[measure]:.4f}")
            if self.text.spearman_gradient_vs_ablation is not None:
                lines.append(f"text tower: Spearman (d) gradient vs (c) ablation: "
                             f"{self.text.spearman_gradient_vs_ablation:.3f}")
            lines.append("text tower top heads: " + ", ".join(f"L{l}.H{h}" for l, h in self.text.cheap_rank[:options.top_k]))
        return lines


def run_audit(model: str, out_dir: str, options: AuditRunOptions, *, images_dir: str | None = None,
              labels_path: str | None = None, progress: Callable | None = None,
              placement: Placement | None = None) -> AuditRun:
    """Audit ``model`` and write the audit files into ``out_dir``.

    ``placement``: where to run (default: ``options.placement()``); the model is loaded onto its device.
    """
    if (images_dir is None) != (labels_path is None):
        raise SurgeryError("--images and --labels go together")
    placement = placement or options.placement()
    loaded = load(model, device=placement.device)
    probe, extra = build_probe(loaded, model, options, images_dir, labels_path)
    prompts = build_text_probe(loaded, probe, options)  # built (and so validated) before any model pass
    image_emb, cavs = supervised_cavs(loaded, probe, options) if labels_path else (None, None)
    vision = audit_vision_tower(loaded, probe, extra, cavs, options, progress, placement)
    text = audit_text_tower(loaded, prompts, probe, image_emb, cavs, options, placement)
    context = audit_context(loaded, probe, options)
    context["placement"] = {"device": placement.device, "backend": placement.backend,
                            "autocast": str(placement.autocast).removeprefix("torch.") if placement.autocast else None,
                            "autocast_applies_to": "ablation sweep (c)" if placement.autocast else None}
    run = AuditRun(vision, text, context, placement)
    write_audit(out_dir, vision, run.context, text=text)
    return run


def build_probe(loaded: LoadedModel, model: str, options: AuditRunOptions, images_dir: str | None,
                labels_path: str | None) -> tuple[ProbeSet | None, list[str]]:
    """(probe images or None, extra TextSpan descriptions): a labelled folder, or a world model's own draw."""
    if images_dir:
        return folder_probe_set(images_dir, labels_path, options.attribute, loaded.preprocess), []
    if options.tower == "text":
        return None, []
    params = world_params_of(loaded)
    if params is None:
        raise SurgeryError(f"the vision audit needs probe images: pass --images DIR --labels CSV "
                           f"({model} carries no world to generate them from); --tower text audits from prompts")
    extra = [f"a {params.group_word(g)} shape" for g in range(params.n_groups)] + [f"a {c}" for c in params.concepts]
    n = balanced_size(params) if options.n_probe is None else check_eval_size(params, options.n_probe, "--n-probe")
    return world_probe_set(params, loaded.preprocess, n), extra


def build_text_probe(loaded: LoadedModel, probe: ProbeSet | None, options: AuditRunOptions) -> TextProbe | None:
    """The text audit's prompt set (None for a vision-only audit)."""
    if options.tower == "vision":
        return None
    params = world_params_of(loaded)
    attr = options.attribute or (probe.attribute if probe is not None else ("group" if params is not None else "gender"))
    if params is not None and attr == "group" and options.prompts_path is None:
        return world_text_probe(params)
    return text_probe(attr, prompt_set(attr, options.prompts_path))


def supervised_cavs(loaded: LoadedModel, probe: ProbeSet, options: AuditRunOptions
                    ) -> tuple[torch.Tensor, CAVs]:
    """(normalised image embeddings (N, D), supervised CAVs) of the labelled probe images."""
    image_emb = probe_image_embeddings(loaded.model, probe, options.batch_size)
    return image_emb, supervised_image_cavs(loaded.model, probe, options.batch_size, image_emb)


def audit_vision_tower(loaded: LoadedModel, probe: ProbeSet | None, extra: list[str], cavs: CAVs | None,
                       options: AuditRunOptions, progress: Callable | None,
                       placement: Placement | None = None) -> AuditResult | None:
    if options.tower == "text":
        return None
    placement = placement or options.placement()
    audit_options = AuditOptions(k=options.k, top_k=options.top_k, batch_size=options.batch_size,
                                 ablation=options.ablation, sweep=options.sweep, sweep_top=options.sweep_top,
                                 max_accuracy_drop=options.max_accuracy_drop, backend=placement.backend,
                                 sweep_autocast=placement.autocast)
    result = audit_vision(loaded.model, probe, loaded.tokenizer, audit_options, extra, progress=progress)
    if cavs is not None:
        result.scores.update(supervised_vision_scores(loaded.model, probe, cavs, options.batch_size))
    result.plan.source = {"arch": loaded.arch, "sha256": loaded.sha256}
    return result


def audit_text_tower(loaded: LoadedModel, prompts: TextProbe | None, probe: ProbeSet | None,
                     image_emb: torch.Tensor | None, cavs: CAVs | None, options: AuditRunOptions,
                     placement: Placement | None = None) -> TextAuditResult | None:
    if prompts is None:
        return None
    placement = placement or options.placement()
    text_options = TextAuditOptions(k=options.k, top_k=options.top_k, batch_size=options.batch_size,
                                    ablation=options.ablation, sweep=options.sweep, backend=placement.backend)  # text sweep: every head (it restarts from stored residuals, cheap)
    result = audit_text(loaded.model, loaded.tokenizer, prompts, text_options, images=probe, image_emb=image_emb,
                        supervised=cavs)
    result.plan.source = {"arch": loaded.arch, "sha256": loaded.sha256}
    return result


def audit_context(loaded: LoadedModel, probe: ProbeSet | None, options: AuditRunOptions) -> dict:
    """What audit.json records about the run: model, ablation, metric conventions, probe."""
    context = {"model": loaded.source, "sha256": loaded.sha256, "ablation": options.ablation,
               "conventions": {"k": options.k, "target": "uniform", "reduce": "mean", "zero_count": 1.0}}
    if probe is not None:
        context["probe"] = {"n_images": len(probe), "attribute": probe.attribute, "n_queries": len(probe.queries),
                            **probe.source}
    return context
