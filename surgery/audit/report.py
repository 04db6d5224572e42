"""Audit outputs: audit.json, one heatmap PNG per score (layers x heads), report.md, plan.json."""
from __future__ import annotations

import json
import os

import torch

from surgery.edit.plan import SurgeryPlan
from surgery.io.fs import atomic_output, write_text_atomic

AUDIT_JSON = "audit.json"
REPORT_MD = "report.md"
PLAN_JSON = "plan.json"

SCORE_TITLES = {
    "cav": "(a) group separation along the CAV (effect size)",
    "group_acc": "(b) zero-shot group accuracy from the head alone",
    "gradient": "(d) gradient: first-order bias removed by ablation",
    "ablation": "(c) MaxSkew removed by mean-ablating the head",
    "cav_supervised": "(a') group separation along the supervised CAV",
    "group_acc_supervised": "(b') group accuracy against the supervised prototypes",
}
TEXT_TITLES = {
    "ablation": "(c) text: bias removed by ablating the head",
    "gradient": "(d) text: first-order bias removed by ablation",
}


def write_audit(out_dir: str, result, context: dict, text=None) -> list[str]:
    """Write every output of an audit; each file atomically. ``context``: model, probe, conventions.

    ``result``: the vision audit (:class:`surgery.audit.AuditResult`) or None; ``text``: the text
    audit (:class:`surgery.audit.text.TextAuditResult`) or None. audit.json holds the vision
    results at the top level and the text ones under ``"text"``; plan.json holds both towers' edits.
    """
    if result is None and text is None:
        raise ValueError("write_audit needs a vision or a text audit result")
    os.makedirs(out_dir, exist_ok=True)
    record = {**context, "towers": [t for t, r in (("vision", result), ("text", text)) if r is not None]}
    if result is not None:
        record.update(result.to_dict())
    if text is not None:
        record["text"] = text.to_dict()
    written = []
    for tower, res in (("vision", result), ("text", text)):
        if res is None:
            continue
        titles = {**SCORE_TITLES, **(TEXT_TITLES if tower == "text" else {})}
        sweep = getattr(res, "sweep", None)
        for name, scores in res.scores.items():
            path = os.path.join(out_dir, f"heatmap_{tower}_{name}.png")
            title = f"{tower}: {titles.get(name, name)}"
            if name == "ablation" and sweep is not None and sweep.swept is not None:
                title += f"\n{int(sweep.swept.sum())} of {sweep.swept.numel()} heads swept (the cheap ranking's top); blank: not swept"
            with atomic_output(path) as tmp:
                heatmap(scores, title, str(tmp), marked=[(e.layer, e.head) for e in res.plan.heads])
            written.append(path)
    plan = combined_plan(result, text)
    record["plan"] = plan.to_dict()
    path = os.path.join(out_dir, PLAN_JSON)
    plan.save(path)
    written.append(path)
    written.append(write_text_atomic(os.path.join(out_dir, AUDIT_JSON), json.dumps(record, indent=2)))
    parts = []
    if result is not None:
        parts.append(markdown(record, result))
    if text is not None:
        parts.append(text_markdown(record, text, header=result is None))
    written.append(write_text_atomic(os.path.join(out_dir, REPORT_MD), "\n".join(parts)))
    return written


def combined_plan(result, text) -> SurgeryPlan:
    """One plan with the vision audit's head edits and the text audit's (either may be None)."""
    plans = [r.plan for r in (result, text) if r is not None]
    if len(plans) == 1:
        return plans[0]
    return SurgeryPlan(source=plans[0].source or plans[1].source, heads=[*plans[0].heads, *plans[1].heads],
                       provenance={"vision": plans[0].provenance, "text": plans[1].provenance}).validate()


def heatmap(scores: torch.Tensor, title: str, path: str, marked=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * H + 2), max(3, 0.4 * L + 1.5)))
    image = ax.imshow(scores.numpy(), cmap="magma", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    for layer, head in marked:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def markdown(record: dict, result) -> str:
    base = record["baseline"]
    lines = [
        "# clipsurgery audit (vision tower)", "",
        f"- model: `{record.get('model')}` (sha256 {str(record.get('sha256'))[:12]})",
        f"- probe set: {record.get('probe', {}).get('n_images')} images, attribute `{record.get('probe', {}).get('attribute')}`,"
        f" hash {str(record.get('probe', {}).get('hash'))[:12]}",
        f"- bias metric: mean MaxSkew@{record.get('conventions', {}).get('k')} over {record.get('probe', {}).get('n_queries')} "
        "neutral queries, uniform target; heads removed by "
        f"{record.get('ablation')}-ablation",
        f"- unedited model: MaxSkew {base['max_skew']:.4f}" + (f", concept accuracy {base['accuracy']:.4f}" if base.get("accuracy") is not None else ""),
    ]
    if result.spearman_gradient_vs_ablation is not None:
        lines.append(f"- Spearman rank correlation of (d) gradient vs (c) ablation: {result.spearman_gradient_vs_ablation:.3f}")
    swept = record.get("swept_heads")
    if swept is not None:
        lines.append(f"- the ablation sweep (c) ran on {len(swept)} heads, the top of the cheap ranking (`--sweep-top`); "
                     "the others have no (c) figure (`--sweep all` sweeps every head)")
    sup = "cav_supervised" in result.scores
    lines += ["", "## Heads by the cheap scores (a, b, d)", "",
              "| rank | layer.head | (a) cav | (b) group acc | " + ("(a') cav sup. | (b') acc sup. | " if sup else "")
              + "(d) gradient | (c) ablation | acc. drop | descriptions (CCS) |",
              "| ---: | --- | ---: | ---: | " + ("---: | ---: | " if sup else "") + "---: | ---: | ---: | --- |"]
    by_head = {(h["layer"], h["head"]): h for h in record["heads"]}
    for rank, key in enumerate(result.cheap_rank[:12]):
        h = by_head[key]
        desc = "; ".join(h.get("descriptions", [])[:3])
        if "ccs" in h:
            desc += f" (CCS {h['ccs'].get('score')}, {h['ccs'].get('label')})"
        extra = f"{h['cav_supervised']:.3f} | {h['group_acc_supervised']:.3f} | " if sup else ""
        lines.append(
            f"| {rank + 1} | L{key[0]}.H{key[1]} | {h['cav']:.3f} | {h['group_acc']:.3f} | {extra}{h['gradient']:.4f} | "
            f"{_opt(h.get('ablation'))} | {_opt(h.get('accuracy_drop'))} | {desc} |"
        )
    if sup:
        lines += ["", "(a') and (b'): the same scores along supervised CAVs (class means of the labelled images' "
                  "normalised embeddings) instead of the zero-shot ones."]
    lines += ["", "## Proposed plan", "", *_selection_lines(result.plan.provenance),
              "```json", json.dumps(result.plan.to_dict()["heads"], indent=1)[:2000], "```", "",
              *[f"![{name}](heatmap_vision_{name}.png)" for name in result.scores], ""]
    return "\n".join(lines)


def _selection_lines(provenance: dict) -> list[str]:
    """How the proposed set was chosen and what it measured on the probe (set-level plans only)."""
    before, after = provenance.get("before"), provenance.get("after")
    if not before or not after:
        return []
    heads = [s for s in provenance.get("search", []) if s.get("chosen")]
    lines = [f"Chosen at set level ({provenance.get('method', '')}): heads added one at a time, each the one whose "
             f"removal, measured together with those already chosen, lowered mean MaxSkew the most within a "
             f"{100 * provenance.get('max_accuracy_drop', 0):g}-point concept-accuracy budget; candidates: "
             f"{provenance.get('candidates', '')}.", "",
             "| step | head added | mean MaxSkew | concept accuracy |", "| ---: | --- | ---: | ---: |",
             f"| 0 | (none) | {before['max_skew']:.4f} | {_opt(before.get('accuracy'))} |"]
    for i, step in enumerate(heads):
        lines.append(f"| {i + 1} | L{step['head'][0]}.H{step['head'][1]} | {step['max_skew']:.4f} | "
                     f"{_opt(step.get('accuracy'))} |")
    if not heads:
        lines.append("| | no head lowered bias within the budget | | |")
    return [*lines, ""]


def text_markdown(record: dict, text, header: bool = True) -> str:
    """The text tower's section of report.md (with the model lines when it is the only section)."""
    section = record["text"]
    probe, base = section["probe"], section["baseline"]
    lines = []
    if header:
        lines += ["# clipsurgery audit (text tower)", "",
                  f"- model: `{record.get('model')}` (sha256 {str(record.get('sha256'))[:12]})", ""]
    lines += ["## Text tower", "",
              f"- prompts: {probe['n_queries']} neutral queries, {probe['n_group_prompts']} group-naming prompts, "
              f"{probe['n_cav_prompts']} CAV prompts; attribute `{probe['attribute']}` (groups {', '.join(probe['groups'])})",
              f"- bias measure of (c) and (d): `{section['measure']}`: {section['measure_definition']}"
              + (f" (K = {probe['k']}, {probe['n_images']} images)" if "n_images" in probe else ""),
              f"- unedited model: {section['measure']} {base[section['measure']]:.4f}"
              + (f", text-only cav_projection {base['cav_projection']:.4f}" if section["measure"] != "cav_projection" else "")
              + (f", concept accuracy {base['accuracy']:.4f}" if base.get("accuracy") is not None else ""),
              f"- heads removed by {record.get('ablation', 'mean')}-ablation (mean over the probe prompts' tokens)"]
    if text.spearman_gradient_vs_ablation is not None:
        lines.append(f"- Spearman rank correlation of (d) gradient vs (c) ablation: {text.spearman_gradient_vs_ablation:.3f}")
    if section.get("supervised") and section["supervised"].get("skipped"):
        lines.append(f"- supervised CAVs: {section['supervised']['skipped']}")
    sup = "cav_supervised" in text.scores
    lines += ["", "| rank | layer.head | (a) cav | (b) group acc | " + ("(a') cav sup. | (b') acc sup. | " if sup else "")
              + "(d) gradient | (c) ablation | query shift | acc. drop |",
              "| ---: | --- | ---: | ---: | " + ("---: | ---: | " if sup else "") + "---: | ---: | ---: | ---: |"]
    by_head = {(h["layer"], h["head"]): h for h in section["heads"]}
    for rank, key in enumerate(text.cheap_rank[:12]):
        h = by_head[key]
        extra = f"{h['cav_supervised']:.3f} | {h['group_acc_supervised']:.3f} | " if sup else ""
        lines.append(f"| {rank + 1} | L{key[0]}.H{key[1]} | {h['cav']:.3f} | {h['group_acc']:.3f} | {extra}"
                     f"{h['gradient']:.4f} | {_opt(h.get('ablation'))} | {_opt(h.get('query_shift'))} | "
                     f"{_opt(h.get('accuracy_drop'))} |")
    lines += ["", "(c) is baseline minus ablated (positive: ablating the head lowers the bias measure); "
              "query shift: 1 - mean cosine of the ablated neutral-query embeddings to the unedited ones (a head "
              "whose ablation moves the queries a lot can raise the text-only measure by moving them at random)."]
    lines += ["", "### Proposed text edits", "",
              *[f"- L{e.layer}.H{e.head}: scale {e.scale}, {e.ablation}-ablation" for e in text.plan.heads], "", *[f"![text {name}](heatmap_text_{name}.png)" for name in text.scores], ""]
    return "\n".join(lines)


def _opt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
