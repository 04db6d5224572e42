"""``clipsurgery debias``: audit -> choose edits -> plan -> bake -> export -> verify -> compare."""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from surgery.audit.probe import folder_probe_set, world_probe_set
from surgery.audit.vision import AuditOptions, audit_vision
from surgery.debias.heads import SearchOptions, plan_from_search, search_heads
from surgery.debias.neurons import NeuronTargets, choose_neurons
from surgery.edit.bake import bake
from surgery.errors import SurgeryError
from surgery.eval.compare import Row, compare, format_table, write_report
from surgery.eval.embedding import EmbedOptions
from surgery.eval.encoders import TorchEncoder, open_encoder
from surgery.eval.evaluate import PROTECTED_COLUMNS, spec_from_folder
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.export.safetensors import export_safetensors
from surgery.io.fs import check_output_path
from surgery.io.labels import load_labels, split_label_table, write_labels_csv
from surgery.io.onnx import onnx_paths
from surgery.metrics.bias import BiasConventions
from surgery.model.encode import text_embeddings
from surgery.model.loading import load
from surgery.model.preprocess import images_to_tensor
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import CAPTIONS_CSV, WORLD_JSON, generate, split_dir, write_split

SELECTION_SEED_OFFSET = 1000  # the selection probe is another draw of the world than the report's


@dataclass
class DebiasOptions:
    max_bias_ratio: float = 0.5  # target: mean MaxSkew@K after / before
    max_accuracy_drop: float = 0.02  # target: concept accuracy drop (fraction)
    max_recall_drop: float = 0.02  # target: text->image Recall@5 drop (fraction; probes with captions)
    max_heads: int = 8  # most heads edited
    k: int = 50  # MaxSkew@K
    n_probe: int = 1200  # world models: images per generated split
    selection_draws: int = 8  # world models: independent selection draws the search averages over
    tower: str = "both"  # ONNX towers
    force: bool = False  # overwrite outputs
    heads: bool = True  # search head edits
    neurons: bool = True  # train an SAE and deactivate social neurons (vision embedding)
    # The edits are chosen on selection probes (other draws than the report's images); the accuracy
    # and recall budgets are tightened by this much there so that they still hold on the report's split.
    selection_margin: float = 0.005
    # ... and the bias target by this much (MaxSkew@K of 6-12 queries on a new draw is noisy).
    selection_bias_margin: float = 0.05
    # Folder probes: this fraction of the labelled images (of each group) is held out of the edit
    # search and used for the report only; 0 chooses and reports on the same images.
    holdout: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.max_bias_ratio <= 1:
            raise SurgeryError(f"--max-bias-ratio must be in (0, 1], got {self.max_bias_ratio}")
        for name in ("max_accuracy_drop", "max_recall_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise SurgeryError(f"--{name.replace('_', '-')} must be between 0 and 100 points, "
                                   f"got {100 * getattr(self, name):g}")
        if not 0 <= self.holdout < 1:
            raise SurgeryError(f"--holdout must be at least 0 and below 1, got {self.holdout}")


def run_debias(model_in: str, out: str, options: DebiasOptions, *, images_dir: str | None = None,
               labels_path: str | None = None, attribute: str | None = None,
               progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda msg: None)
    outputs = onnx_paths(out, options.tower) if out.endswith(".onnx") else {"model": out}
    for path in outputs.values():
        check_output_path(path, inputs=(model_in,), force=options.force)
    stem = out[: -len(".onnx")] if out.endswith(".onnx") else out[: -len(".safetensors")]
    plan_path, report_dir, sae_dir = f"{stem}.plan.json", f"{stem}.report", f"{stem}.sae"
    check_output_path(plan_path, force=options.force)

    loaded = load(model_in)
    work = tempfile.mkdtemp(prefix="clipsurgery-debias-")
    try:
        return _run(loaded, model_in, out, options, work, plan_path, report_dir, sae_dir, images_dir, labels_path,
                    attribute, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def split_folder_labels(images_dir: str, labels_path: str, attribute: str | None, holdout: float,
                        out_dir: str) -> tuple[str, str]:
    """Write the (selection, report) labels CSVs of a folder probe into ``out_dir``.

    ``holdout`` of each group's images (``attribute``, or the first protected column present)
    go to the report. A world split's ``world.json`` and ``captions.csv`` are copied beside both,
    so the report still finds its concepts and captions.
    """

    table = load_labels(labels_path, images_dir)
    stratify = attribute if attribute in table.attributes else next(
        (c for c in PROTECTED_COLUMNS if c in table.attributes), None)
    keep, held = split_label_table(table, holdout, stratify)
    if len(keep) == 0 or len(held) == 0:
        raise SurgeryError(f"--holdout {holdout} leaves no images on one side of the {len(table)} labelled ones; "
                           "pass more images or another --holdout")
    os.makedirs(out_dir, exist_ok=True)
    side = str(split_dir(labels_path, images_dir))
    for name in (WORLD_JSON, CAPTIONS_CSV):
        if os.path.isfile(os.path.join(side, name)):
            shutil.copyfile(os.path.join(side, name), os.path.join(out_dir, name))
    paths = os.path.join(out_dir, "selection.csv"), os.path.join(out_dir, "report.csv")
    write_labels_csv(keep, paths[0])
    write_labels_csv(held, paths[1])
    return paths


def _caption_embeddings(loaded, probe) -> torch.Tensor | None:
    """(N, D) normalised text embedding of each probe image's caption, or None without captions."""
    if probe.captions is None:
        return None
    unique = sorted(set(probe.captions))
    emb = text_embeddings(loaded.model, unique, loaded.tokenizer)  # (U, D)
    index = {text: i for i, text in enumerate(unique)}
    return emb[torch.tensor([index[t] for t in probe.captions])]


def _run(loaded, model_in, out, options, work, plan_path, report_dir, sae_dir, images_dir, labels_path, attribute,
         say) -> dict:
    params = world_params_of(loaded)
    if images_dir:
        eval_images, eval_labels, selection_labels = images_dir, labels_path, labels_path
        if options.holdout > 0:
            selection_labels, eval_labels = split_folder_labels(images_dir, labels_path, attribute, options.holdout,
                                                                os.path.join(work, "split"))
            say(f"folder probe: choosing the edits on {1 - options.holdout:.0%} of the labelled images, reporting on "
                f"the other {options.holdout:.0%} (--holdout)")
        else:
            say("warning: --holdout 0: the report is on the same images the edits were chosen on")
        probe = folder_probe_set(images_dir, selection_labels, attribute, loaded.preprocess)
        selection_probes = [probe]
        sae_images = None  # the probe images themselves (labels unused for training)
    elif params is not None:
        selection_probes = [
            world_probe_set(dataclasses.replace(params, seed=params.seed + SELECTION_SEED_OFFSET + i),
                            loaded.preprocess, options.n_probe) for i in range(max(1, options.selection_draws))]
        probe = selection_probes[0]
        write_split(generate(params, "eval", options.n_probe), os.path.join(work, "eval"))
        eval_images, eval_labels = os.path.join(work, "eval", "images"), os.path.join(work, "eval", "labels.csv")
        sae_images = images_to_tensor(generate(params, "train", 4000).images, loaded.preprocess)
        say(f"probing on {len(selection_probes)} generated draws of the model's world (selection seeds "
            f"{params.seed + SELECTION_SEED_OFFSET}+; report on its own eval split, {options.n_probe} images)")
    else:
        raise SurgeryError(f"vision surgery needs probe images: pass --images DIR --labels CSV "
                           f"({model_in} carries no world to generate them from)")

    if not (options.heads or options.neurons):
        raise SurgeryError("nothing to do: --heads-only and --neurons-only exclude each other")
    # The report's images are checked (K, groups, labels) before anything is chosen or written.
    spec = spec_from_folder(eval_images, eval_labels, conventions=BiasConventions(k=options.k))
    say("auditing heads (cheap scores a, b, d)")
    audit = audit_vision(loaded.model, probe, loaded.tokenizer,
                         AuditOptions(k=options.k, sweep=False, textspan_iterations=0))
    queries = text_embeddings(loaded.model, probe.queries, loaded.tokenizer)
    classes = text_embeddings(loaded.model, probe.class_prompts, loaded.tokenizer) if probe.class_prompts else None
    budget = max(0.0, options.max_accuracy_drop - options.selection_margin)
    recall_budget = max(0.0, options.max_recall_drop - options.selection_margin)
    selection_ratio = max(0.05, options.max_bias_ratio - options.selection_bias_margin)
    search_opt = SearchOptions(max_bias_ratio=selection_ratio, max_accuracy_drop=budget,
                               max_recall_drop=recall_budget, max_heads=options.max_heads if options.heads else 0,
                               k=options.k)
    caption_embs = [_caption_embeddings(loaded, p) for p in selection_probes]
    if classes is None or probe.concepts is None:
        say("warning: the probe has no concept labels, so the accuracy budget cannot be checked")
    if all(c is None for c in caption_embs):
        say("warning: the probe has no captions, so the recall budget cannot be checked")
    neuron_edit, post, neuron_summary = None, None, None
    if options.neurons:
        say("training an SAE on unlabelled vision embeddings and finding social neurons")

        train = sae_images if sae_images is not None else probe.images[0:len(probe)]
        neuron_edit, post, neuron_summary = choose_neurons(
            loaded.model, train, selection_probes, sae_dir, queries, classes,
            NeuronTargets(max_bias_ratio=selection_ratio, max_accuracy_drop=budget,
                          max_recall_drop=recall_budget, k=options.k), caption_embs=caption_embs)
        if neuron_edit is None:
            say("no social neuron lowered bias within the accuracy and recall budgets; continuing with heads only")
            shutil.rmtree(sae_dir, ignore_errors=True)
    say("choosing head edits (confirmed by forward passes)")
    unedited = neuron_summary["selection"]["before"] if neuron_summary else None  # the same draws, measured once
    search = search_heads(loaded.model, selection_probes, audit, queries, classes, search_opt, post=post,
                          before=unedited, caption_embs=caption_embs)
    plan = plan_from_search(search, audit, {"arch": loaded.arch, "sha256": loaded.sha256}, search_opt)
    if images_dir:
        plan.provenance["probe"] = {"images": images_dir, "labels": labels_path, "holdout": options.holdout,
                                    "selection_images": len(probe)}
    if neuron_edit is not None:
        plan.neurons = [neuron_edit]
        plan.provenance["neurons"] = neuron_summary
    plan.validate()
    if not plan.heads and not plan.neurons:
        raise SurgeryError("no edit lowered bias within the accuracy and recall budgets; raise --max-accuracy-drop "
                           "or --max-recall-drop")

    patched = copy.copy(loaded)
    patched.model = bake(copy.deepcopy(loaded.model), plan)
    say(f"baked {len(plan.heads)} head edits and {sum(len(n.ids) for n in plan.neurons)} neuron deactivations; "
        f"exporting {out}")
    if out.endswith(".onnx"):
        results = export_onnx(patched, out, plan, OnnxOptions(tower=options.tower, force=options.force),
                              probe_images=probe.images[0:64])
        exported = [f"{r['path']} (ONNX Runtime vs PyTorch max abs error {r['max_abs_error']:.1e})" for r in results.values()]
    else:
        export_safetensors(patched, out, plan, force=options.force)
        exported = [out]
    plan.save(plan_path)

    say("comparing before / after")
    after = open_encoder(out)
    result = compare(TorchEncoder(loaded), after, spec, EmbedOptions(cache_dir=os.path.join(work, "cache")))
    result["plan"] = plan.to_dict()
    write_report(report_dir, result, title="clipsurgery debias")
    rows = [Row(r["metric"], r["before"], r["after"], r["better"]) for r in result["rows"]]
    met = "met" if search.met else "NOT met"
    lines = [*(f"wrote {p}" for p in exported), f"wrote {plan_path}", f"report: {report_dir}/report.md",
             *([f"SAE: {sae_dir}/ (the plan's neuron edit refers to it)"] if plan.neurons else []),
             f"targets on the selection probe ({met}): MaxSkew@{options.k} {search.before['max_skew']:.3f} -> "
             f"{search.after['max_skew']:.3f} (ratio {search.after['max_skew'] / max(search.before['max_skew'], 1e-12):.2f} "
             f"vs <= {selection_ratio:g}, the target less a {options.selection_bias_margin:g} margin)",
             report_targets(result, options)]
    return {"table": format_table(rows), "lines": lines, "result": result, "search": search}


def report_targets(result: dict, options: DebiasOptions) -> str:
    """One line: the targets checked on the report's images (not the selection probe)."""
    before, after = result["before"], result["after"]
    parts, met = [], True
    for name, summ in before["bias"].items():
        ratio = after["bias"][name]["max_skew"] / summ["max_skew"] if summ["max_skew"] > 0 else 1.0
        met &= ratio <= options.max_bias_ratio
        parts.append(f"{name} MaxSkew@{options.k} ratio {ratio:.2f} (<= {options.max_bias_ratio})")
    if "zero_shot_accuracy" in before:
        drop = 100 * (before["zero_shot_accuracy"] - after["zero_shot_accuracy"])
        met &= drop <= 100 * options.max_accuracy_drop + 1e-9
        parts.append(f"accuracy drop {drop:.1f} points (<= {100 * options.max_accuracy_drop:g})")
    else:
        parts.append("accuracy not measured (no concept labels)")
    if "t2i@5" in before.get("retrieval", {}):
        drop = 100 * (before["retrieval"]["t2i@5"] - after["retrieval"]["t2i@5"])
        met &= drop <= 100 * options.max_recall_drop + 1e-9
        parts.append(f"text->image Recall@5 drop {drop:.1f} points (<= {100 * options.max_recall_drop:g})")
    else:
        parts.append("recall not measured (no captions)")
    return f"targets on the report's images ({'met' if met else 'NOT met'}): " + ", ".join(parts)
