"""``clipsurgery`` command line: a thin layer over the library.

Library errors (:class:`surgery.errors.SurgeryError`) become one-line messages with exit code 1
and no traceback.
"""
from __future__ import annotations

import json
import logging
import os
import signal

import click

from surgery import __version__
from surgery.audit.run import AuditRunOptions, run_audit
from surgery.cli.device import device_options as _device_options
from surgery.cli.errors import user_errors
from surgery.cli.quantize import export_int8, quantize_options
from surgery.debias.budget import Budget
from surgery.debias.balance import BalanceOptions
from surgery.debias.balance_job import run_balance
from surgery.debias.pipeline import DebiasOptions, run_debias
from surgery.edit.bake import bake as bake_plan
from surgery.edit.plan import SurgeryPlan
from surgery.eval.compare import Row, compare, format_query_cuts, format_table, summary_rows, write_report
from surgery.eval.embedding import EmbedOptions, image_embeddings_from_cache
from surgery.eval.encoders import open_encoder
from surgery.eval.evaluate import evaluate, spec_from_folder
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.export.safetensors import export_safetensors
from surgery.io.fs import check_output_folder
from surgery.io.queries import load_group_prompts, load_queries
from surgery.io.retrieval import load_retrieval_set
from surgery.metrics.bias import BiasConventions
from surgery.model.inspect import describe_model, format_description
from surgery.model.loading import load
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import DEFAULT_EVAL_SIZE, balanced_size, generate, write_split
from surgery.world.params import WorldParams

_user_errors = user_errors
#: ``clipsurgery debias`` wrote its outputs but missed a target on the report's images.
EXIT_TARGETS_MISSED = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clipsurgery")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Find and remove demographic bias inside CLIP encoders, and export the patched model."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, _frame) -> None:
    """SIGTERM unwinds like an error: temp files, staging folders and half-built caches are removed
    by the code that made them, and no output is left half-written (exit 128 + 15)."""
    raise SystemExit(128 + signum)


@main.command()
@click.argument("model")
@click.option("--arch", default=None, help="open_clip architecture name or JSON config (default: inferred).")
@click.option("--pretrained", default=None, help="Pretrained tag when MODEL is an architecture name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def inspect(model: str, arch: str | None, pretrained: str | None, as_json: bool) -> None:
    """Show a model's architecture, towers (layers x heads), size, dtype and sha256.

    MODEL is a checkpoint file (.safetensors, .pt/.pth/.bin, OpenAI TorchScript), NAME:TAG from
    open_clip's registry (e.g. ViT-B-32:openai), hf-hub:ORG/NAME, or builtin:tiny.
    """

    info = describe_model(load(model, arch=arch, pretrained=pretrained))
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


# ---------------------------------------------------------------------------------- bake/export
def _export(loaded, out, plan, tower, precision, normalize, opset, force, graph="auto", inputs=()):
    if out.endswith(".safetensors"):
        export_safetensors(loaded, out, plan, force=force, inputs=inputs)
        click.echo(f"wrote {out}")
    elif out.endswith(".onnx"):
        results = export_onnx(loaded, out, plan, OnnxOptions(tower=tower, precision=precision,
                                                             normalize=normalize, opset=opset, force=force,
                                                             graph=graph, inputs=inputs))
        for name, res in results.items():
            click.echo(f"wrote {res['path']}  ({name}, {res['graph']} graph; ONNX Runtime vs PyTorch max abs error "
                       f"{res['max_abs_error']:.2e})")
    else:
        raise click.UsageError(f"output {out} must end in .safetensors or .onnx")


def _export_options(f):
    f = click.option("--tower", type=click.Choice(["vision", "text", "both"]), default="both", show_default=True,
                     help="ONNX: which encoder(s); both -> OUT.visual.onnx and OUT.text.onnx.")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)(f)
    f = click.option("--normalize/--no-normalize", default=True, show_default=True,
                     help="ONNX: L2-normalise embeddings in the graph.")(f)
    f = click.option("--opset", type=int, default=17, show_default=True)(f)
    f = click.option("--graph", type=click.Choice(["auto", "ort", "plain"]), default="auto", show_default=True,
                     help="ONNX: 'ort' = ONNX Runtime's fused transformer ops (fastest on ORT), 'plain' = standard "
                          "ONNX ops for any runtime; auto = ort for fp32 below opset 23, else plain.")(f)
    f = click.option("--force", is_flag=True, help="Overwrite existing outputs (never the input).")(f)
    f = click.option("--arch", default=None, help="Architecture override (default: inferred).")(f)
    return f


@main.command()
@click.argument("model")
@click.argument("plan_path", metavar="PLAN")
@click.argument("out")
@_export_options
@_user_errors
def bake(model, plan_path, out, tower, precision, normalize, opset, graph, force, arch):
    """Bake PLAN's head edits into MODEL's weights and write OUT (.safetensors or .onnx)."""
    plan = SurgeryPlan.load(plan_path)
    loaded = load(model, arch=arch)
    plan.check_fits(loaded.model, loaded.sha256, force=force)
    prior = loaded.metadata.get("plan")
    record = SurgeryPlan.from_dict(prior).merged(plan, stacked=True) if prior else plan  # validates first
    bake_plan(loaded.model, plan)  # only the new edits: the prior ones are already in the weights
    inputs = (plan_path, *(n.sae for n in plan.neurons))  # the plan and its SAE folders are never overwritten
    _export(loaded, out, record, tower, precision, normalize, opset, force, graph, inputs)


@main.command()
@click.argument("model")
@click.argument("out")
@_export_options
@quantize_options
@_user_errors
def export(model, out, tower, precision, normalize, opset, graph, force, arch, quantize, **int8):
    """Export MODEL (any checkpoint, or a patched .safetensors) as .safetensors or .onnx."""
    if quantize:
        return export_int8(model, out, tower=tower, precision=precision, normalize=normalize, opset=opset,
                           graph=graph, force=force, arch=arch, **int8)
    loaded = load(model, arch=arch)
    plan = SurgeryPlan.from_dict(loaded.metadata["plan"]) if loaded.metadata.get("plan") else None
    _export(loaded, out, plan, tower, precision, normalize, opset, force, graph)


# ------------------------------------------------------------------------------------------ audit
@main.command()
@click.argument("model")
@click.option("--images", "images_dir", default=None, type=click.Path(), help="Probe image folder.")
@click.option("--labels", "labels_path", default=None, type=click.Path(),
              help="Labels CSV for the images (also adds scores along supervised CAVs).")
@click.option("--tower", type=click.Choice(["vision", "text", "both"]), default="vision", show_default=True,
              help="text: audited from prompts, no images needed (with --images the bias is measured on them).")
@click.option("--attributes", default=None,
              help="Protected attribute (default: the labels' column; a world: its group; else gender for text).")
@click.option("--prompts", "prompts_path", default=None, type=click.Path(),
              help="Group prompts per attribute, JSON/YAML {attribute: {group: [prompts]}} (default: built-in).")
@click.option("--top-k", type=int, default=3, show_default=True,
              help="Most heads the proposed plan removes (per tower; vision: chosen as a measured set).")
@click.option("--k", type=int, default=50, show_default=True, help="MaxSkew@K.")
@click.option("--n-probe", type=int, default=None,
              help="World models: probe images generated (default: about 1200, a multiple of concepts x groups).")
@click.option("--ablation", type=click.Choice(["mean", "zero"]), default="mean", show_default=True)
@click.option("--no-sweep", is_flag=True,
              help="Skip the causal ablation sweep (c); the proposed set is then measured over the cheap ranking.")
@click.option("--sweep", "sweep_mode", type=click.Choice(["top", "all"]), default="top", show_default=True,
              help="Vision tower: top ablates only the --sweep-top heads of the cheap ranking (a, b, d); all: every head. The text tower's sweep is cheap and always covers every head.")
@click.option("--sweep-top", type=click.IntRange(1), default=16, show_default=True,
              help="Heads the ablation sweep (c) ablates with --sweep top (a model with fewer is swept whole).")
@click.option("--max-accuracy-drop", "audit_accuracy_drop", type=click.FloatRange(0, 100), default=2.0,
              show_default=True, help="Points of concept accuracy the proposed vision set may cost on the probe.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@_device_options
@click.option("--autocast/--no-autocast", default=True, show_default=True,
              help="On CUDA: bf16 autocast for the ablation sweep (c) only (it ranks heads; every proposed set "
                   "is measured in fp32). No effect on the CPU.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Write into an --out folder that already holds files.")
@_user_errors
def audit(model, images_dir, labels_path, tower, attributes, prompts_path, top_k, k, n_probe, ablation, no_sweep,
          sweep_mode, sweep_top, audit_accuracy_drop, batch_size, device, autocast, out_dir, force):
    """Locate bias in single attention heads; write audit.json, heatmaps, report.md and plan.json."""
    if (images_dir is None) != (labels_path is None):
        raise click.UsageError("--images and --labels go together")
    options = AuditRunOptions(tower=tower, attribute=attributes.split(",")[0] if attributes else None,
                              prompts_path=prompts_path, top_k=top_k, k=k, n_probe=n_probe, ablation=ablation,
                              sweep=not no_sweep, sweep_top=None if sweep_mode == "all" else sweep_top,
                              batch_size=batch_size, max_accuracy_drop=audit_accuracy_drop / 100, device=device,
                              autocast=autocast)
    placement = options.placement()  # one-line error for --device cuda without CUDA, before any work
    check_output_folder(out_dir, force=force)
    run = run_audit(model, out_dir, options, images_dir=images_dir, labels_path=labels_path, progress=_StageBar(),
                    placement=placement)
    click.echo(placement.describe("audit"))  # after the run, so that an error stays one line
    for line in run.summary_lines(options):
        click.echo(line)
    click.echo(f"wrote {out_dir}/audit.json, report.md, plan.json and heatmaps")


_balance_mode_option = click.option(
    "--balance-mode", type=click.Choice(["auto", "open", "fixed"]), default="auto", show_default=True,
    help="open: every text gets its own correction at run time from a bank of probe images (covers queries nobody "
         "listed; texts naming a group are left alone); fixed: one map fitted on the query list, folded into "
         "text_projection; auto: open when it alone meets the targets on the selection draws, else fixed.")
_group_prompts_option = click.option(
    "--group-prompts", "group_prompts_path", default=None, type=click.Path(),
    help="How each group value is named in a zero-shot prompt: a CSV 'group,prompt' or a JSON object "
         "(default: as people, 'a photo of a {value} person'). The balance edit keeps these prompts "
         "still and the group-accuracy budget is measured with them.")



def _retrieval_options(f):
    f = click.option("--retrieval", "retrieval_path", default=None, type=click.Path(),
                     help="Captioned images to measure recall on (and, in debias/balance, whose captions anchor the "
                          "balance edit): a CSV of image,caption rows, for probes with group labels only.")(f)
    f = click.option("--retrieval-images", "retrieval_images", default=None, type=click.Path(),
                     help="Folder the --retrieval CSV's image paths are relative to (default: the CSV's folder, or "
                          "its images/).")(f)
    return f


def _retrieval_set(retrieval_path, retrieval_images):
    if retrieval_images is not None and retrieval_path is None:
        raise click.UsageError("--retrieval-images goes with --retrieval")
    return load_retrieval_set(retrieval_path, retrieval_images) if retrieval_path else None


@main.command()
@click.argument("model_in", metavar="IN")
@click.argument("out", metavar="OUT")
@click.option("--images", "images_dir", default=None, type=click.Path(), help="Probe images (default: the model's world).")
@click.option("--labels", "labels_path", default=None, type=click.Path())
@click.option("--attributes", default=None, help="Protected attribute column.")
@click.option("--queries", "queries_path", default=None, type=click.Path(),
              help="Neutral queries file (one per line or a JSON list; default: the world's concepts, or the "
                   "built-in occupations and traits).")
@_group_prompts_option
@_retrieval_options
@click.option("--max-bias-ratio", type=float, default=0.5, show_default=True, help="Target: MaxSkew after/before.")
@click.option("--max-accuracy-drop", type=float, default=2.0, show_default=True, help="Target: points of concept accuracy.")
@click.option("--max-recall-drop", type=float, default=2.0, show_default=True,
              help="Target: points of Recall@5, text->image and image->text each (probes with captions: a world's own).")
@click.option("--max-group-accuracy-drop", type=float, default=2.0, show_default=True,
              help="Target: points of zero-shot group accuracy with the group prompts (attribute retention).")
@click.option("--max-heads", type=int, default=8, show_default=True)
@click.option("--k", type=int, default=50, show_default=True)
@click.option("--n-probe", type=int, default=None,
              help="World models: images per generated split (default: about 1200, a multiple of concepts x groups).")
@click.option("--selection-draws", type=click.IntRange(1, 16), default=8, show_default=True,
              help="World models: independent draws the edit search averages over.")
@click.option("--holdout", type=float, default=None,
              help="--images probes: fraction of each group's images kept out of the edit search for the report "
                   "(default 0.5; 0: report on the images the edits were chosen on).")
@click.option("--tower", type=click.Choice(["vision", "text", "both"]), default="both", show_default=True,
              help="ONNX towers to export.")
@click.option("--heads-only", is_flag=True, help="Only soft-prune heads (no SAE neurons, no balance edit).")
@click.option("--neurons-only", is_flag=True, help="Only deactivate SAE neurons (no head edits, no balance edit).")
@click.option("--balance-only", is_flag=True, help="Only the balance edit (no head or neuron edits).")
@click.option("--no-balance", is_flag=True, help="Only removal edits (heads and neurons, the seeds' methods).")
@click.option("--search-trials", type=click.IntRange(1), default=1000, show_default=True,
              help="The edit search measures at most this many sets (it then keeps its best so far).")
@click.option("--search-seconds", type=float, default=None, help="...and runs at most this long (default: no limit).")
@_balance_mode_option
@click.option("--removal", type=click.Choice(["auto", "always"]), default="auto", show_default=True,
              help="auto: search head and neuron edits only when the balance edit alone misses the targets on the "
                   "selection draws; always: search them in any case.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs (never the input).")
@click.option("--allow-miss", is_flag=True,
              help=f"Exit 0 even when the targets are not met on the report's images (default: exit {EXIT_TARGETS_MISSED}).")
@_user_errors
def debias(model_in, out, images_dir, labels_path, attributes, queries_path, group_prompts_path, retrieval_path,
           retrieval_images, max_bias_ratio, max_accuracy_drop, max_recall_drop,
           max_group_accuracy_drop, max_heads, k, n_probe, selection_draws, holdout, tower, heads_only, neurons_only,
           balance_only, no_balance, search_trials, search_seconds, balance_mode, removal, force, allow_miss):
    """Choose edits for IN (balance, heads, neurons), bake them, export OUT (.onnx or .safetensors), and compare.

    Exit status: 0 when the targets hold on the report's images, 1 on an error, 2 on bad usage,
    3 when the outputs were written but a target was missed (pipelines can gate on it; --allow-miss
    exits 0 then).
    """
    if not out.endswith((".onnx", ".safetensors")):
        raise click.UsageError(f"output {out} must end in .onnx or .safetensors")
    if (images_dir is None) != (labels_path is None):
        raise click.UsageError("--images and --labels go together")
    only = [name for name, on in (("--heads-only", heads_only), ("--neurons-only", neurons_only),
                                  ("--balance-only", balance_only)) if on]
    if len(only) > 1:
        raise click.UsageError(f"{only[0]} and {only[1]} exclude each other")
    if balance_only and no_balance:
        raise click.UsageError("--balance-only and --no-balance exclude each other")
    if group_prompts_path is not None and images_dir is None:
        raise click.UsageError("--group-prompts names the groups of an --images/--labels probe (a world names its own)")
    if holdout is not None and images_dir is None:
        raise click.UsageError("--holdout applies to --images probes only (a world model's report is on its own "
                               "eval split)")
    if retrieval_path is not None and images_dir is None:
        raise click.UsageError("--retrieval goes with --images/--labels (a world model's draws carry their own captions)")
    budget = Budget(max_bias_ratio=max_bias_ratio, max_accuracy_drop=max_accuracy_drop / 100.0,
                    max_recall_drop=max_recall_drop / 100.0, max_group_accuracy_drop=max_group_accuracy_drop / 100.0)
    options = DebiasOptions(budget=budget, max_heads=max_heads, k=k, n_probe=n_probe,
                            selection_draws=selection_draws, holdout=0.5 if holdout is None else holdout,
                            tower=tower, force=force, removal=removal, search_trials=search_trials,
                            balance_mode=balance_mode,
                            search_seconds=search_seconds,
                            heads=not (neurons_only or balance_only), neurons=not (heads_only or balance_only),
                            balance=not (heads_only or neurons_only or no_balance))
    summary = run_debias(model_in, out, options, images_dir=images_dir, labels_path=labels_path,
                         attribute=attributes.split(",")[0] if attributes else None,
                         queries=load_queries(queries_path) if queries_path else None,
                         group_prompts=load_group_prompts(group_prompts_path) if group_prompts_path else None,
                         inputs=(queries_path, group_prompts_path),
                         retrieval=_retrieval_set(retrieval_path, retrieval_images),
                         progress=lambda msg: click.echo(msg, err=True))
    click.echo(summary["table"])
    for line in summary["lines"]:
        click.echo(line)
    if not summary["met"] and not allow_miss:
        click.echo(f"exit {EXIT_TARGETS_MISSED}: a target was missed on the report's images (--allow-miss exits 0)",
                   err=True)
        click.get_current_context().exit(EXIT_TARGETS_MISSED)


@main.command()
@click.argument("model_in", metavar="MODEL")
@click.option("--images", "images_dir", default=None, type=click.Path(),
              help="Labelled probe images (default: draws of the model's world).")
@click.option("--labels", "labels_path", default=None, type=click.Path())
@click.option("--attributes", default=None, help="Protected attribute column.")
@click.option("--queries", "queries_path", default=None, type=click.Path(),
              help="Neutral queries to balance (one per line or a JSON list; default: the world's concepts, or the "
                   "built-in occupations and traits).")
@_group_prompts_option
@_retrieval_options
@click.option("--out", "plan_out", required=True, type=click.Path(), help="Plan JSON to write.")
@click.option("--side", type=click.Choice(["text", "image"]), default="text", show_default=True,
              help="Which embedding the fixed map moves: text (folded into text_projection) or image (visual.proj).")
@_balance_mode_option
@click.option("--k", type=int, default=50, show_default=True)
@click.option("--selection-draws", type=click.IntRange(1, 16), default=8, show_default=True,
              help="World models: independent draws the fit uses.")
@click.option("--max-bias-ratio", type=float, default=0.5, show_default=True,
              help="Target: MaxSkew after/before on the probe (less the selection margin).")
@click.option("--max-accuracy-drop", type=float, default=2.0, show_default=True)
@click.option("--max-recall-drop", type=float, default=2.0, show_default=True)
@click.option("--max-group-accuracy-drop", type=float, default=2.0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing plan (never an input).")
@click.option("--allow-miss", is_flag=True,
              help=f"Exit 0 even when the bias target is missed on the probe (default: exit {EXIT_TARGETS_MISSED}).")
@_user_errors
def balance(model_in, images_dir, labels_path, attributes, queries_path, group_prompts_path, retrieval_path,
            retrieval_images, plan_out, side, balance_mode,
            k, selection_draws,
            max_bias_ratio, max_accuracy_drop, max_recall_drop, max_group_accuracy_drop, force, allow_miss):
    """Fit only the balance edit of MODEL (equal evidence per group for each neutral query) and write its plan.

    Exit status: 0 when the targets hold on the probe, 1 on an error, 2 on bad usage, 3 when the plan
    was written but the bias target was missed (--allow-miss exits 0 then), as debias.
    """
    if (images_dir is None) != (labels_path is None):
        raise click.UsageError("--images and --labels go together")
    if group_prompts_path is not None and images_dir is None:
        raise click.UsageError("--group-prompts names the groups of an --images/--labels probe (a world names its own)")
    budget = Budget(max_bias_ratio=max_bias_ratio, max_accuracy_drop=max_accuracy_drop / 100.0,
                    max_recall_drop=max_recall_drop / 100.0, max_group_accuracy_drop=max_group_accuracy_drop / 100.0)
    if balance_mode == "open" and side != "text":
        raise click.UsageError("--balance-mode open corrects texts; it does not go with --side image")
    options = DebiasOptions(budget=budget, k=k, selection_draws=selection_draws, heads=False, neurons=False,
                            balance_options=BalanceOptions(side=side, k=k), balance_mode=balance_mode)
    summary = run_balance(model_in, plan_out, options, images_dir=images_dir, labels_path=labels_path,
                          attribute=attributes.split(",")[0] if attributes else None,
                          queries=load_queries(queries_path) if queries_path else None,
                          group_prompts=load_group_prompts(group_prompts_path) if group_prompts_path else None,
                          force=force, inputs=(queries_path, group_prompts_path),
                          retrieval=_retrieval_set(retrieval_path, retrieval_images),
                          progress=lambda msg: click.echo(msg, err=True))
    for line in summary["lines"]:
        click.echo(line)
    if not summary["met"] and not allow_miss:
        click.echo(f"exit {EXIT_TARGETS_MISSED}: missed on the probe: {'; '.join(summary['missed'])} (the plan was "
                   "written; --allow-miss exits 0)", err=True)
        click.get_current_context().exit(EXIT_TARGETS_MISSED)


class _StageBar:
    def __init__(self):
        self.bar = None

    def __call__(self, stage, done, total):
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=stage, unit="img", leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------ world
@main.group()
def world() -> None:
    """The planted-bias world: synthetic shapes whose colour/texture stands in for a demographic group."""


@world.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write (must not exist).")
@click.option("--split", type=click.Choice(["train", "eval"]), default="eval", show_default=True)
@click.option("--n", type=int, default=None,
              help="Images (default: 1200; eval: a multiple of concepts x groups, by default the nearest to 1200).")
@click.option("--like", "like", default=None, help="Use the world a trained MODEL was trained on.")
@click.option("--seed", type=int, default=None)
@click.option("--concepts", default=None, help="Comma-separated shapes (4-8), e.g. circle,square,triangle,cross.")
@click.option("--groups", default=None, help="Comma-separated colours or textures (2-4), e.g. red,blue.")
@click.option("--attribute-kind", type=click.Choice(["color", "texture"]), default=None)
@click.option("--bias-strength", type=float, default=None, help="P(concept shown with its group) in train.")
@click.option("--group-in-caption", type=float, default=None, help="P(train caption names the group).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@_user_errors
def world_generate(out_dir, split, n, like, seed, concepts, groups, attribute_kind, bias_strength, group_in_caption, force):
    """Write a split of a world: images/*.png, labels.csv, captions.csv, world.json."""
    base = WorldParams()
    if like:

        found = world_params_of(load(like))
        if found is None:
            raise click.ClickException(f"{like} carries no world parameters; it was not trained on a world")
        base = found
    overrides = {
        "seed": seed, "attribute_kind": attribute_kind, "bias_strength": bias_strength,
        "group_in_caption": group_in_caption,
        "concepts": tuple(concepts.split(",")) if concepts else None,
        "groups": tuple(groups.split(",")) if groups else None,
    }
    data = base.to_dict()
    data.update({k: v for k, v in overrides.items() if v is not None})
    if attribute_kind and not groups:
        data["groups"] = None
    params = WorldParams.from_dict(data)
    if n is None:
        n = balanced_size(params, DEFAULT_EVAL_SIZE) if split == "eval" else DEFAULT_EVAL_SIZE
    path = write_split(generate(params, split, n), out_dir, overwrite=force)
    click.echo(f"wrote {n} {split} images to {path} (world {params.hash()[:12]})")


# ------------------------------------------------------------------------------------ eval/compare
def _eval_options(f):
    f = click.option("--images", "images_dir", required=True, type=click.Path(), help="Image folder.")(f)
    f = click.option("--labels", "labels_path", required=True, type=click.Path(), help="Labels CSV (or the UTKFace folder).")(f)
    f = click.option("--captions", "captions_path", default=None, type=click.Path(),
                     help="Captions of the labelled images: CSV or Karpathy JSON.")(f)
    f = _retrieval_options(f)
    f = click.option("--queries", "queries_path", default=None, type=click.Path(), help="Neutral queries file (one per line or JSON list).")(f)
    f = click.option("--attributes", default=None, help="Comma-separated protected-attribute columns.")(f)
    f = click.option("--group-prompts", "group_prompts_path", default=None, type=click.Path(),
                     help="How each group value is named for zero-shot group accuracy: CSV 'group,prompt' or JSON "
                          "(default: as people).")(f)
    f = click.option("--k", type=int, default=50, show_default=True, help="Top-K for Skew and NDKL.")(f)
    f = click.option("--target", type=click.Choice(["uniform", "dataset"]), default="uniform", show_default=True)(f)
    f = click.option("--reduce", type=click.Choice(["mean", "sum"]), default="mean", show_default=True,
                     help="How bias is aggregated over queries.")(f)
    f = click.option("--batch-size", type=int, default=256, show_default=True)(f)
    f = click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
                     help="Embedding cache folder (default: OUT/.cache).")(f)
    f = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder.")(f)
    f = click.option("--force", is_flag=True, help="Write into an --out folder that already holds files.")(f)
    return f


def _spec_and_options(images_dir, labels_path, captions_path, retrieval_path, retrieval_images, queries_path,
                      group_prompts_path, attributes, k, target, reduce, batch_size, cache_dir, out_dir, force):
    check_output_folder(out_dir, force=force)
    spec = spec_from_folder(
        images_dir, labels_path, captions_path=captions_path, retrieval=_retrieval_set(retrieval_path, retrieval_images),
        queries=load_queries(queries_path) if queries_path else None,
        attributes=attributes.split(",") if attributes else None,
        conventions=BiasConventions(k=k, target=target, reduce=reduce),
        group_prompts=load_group_prompts(group_prompts_path) if group_prompts_path else None,
    )
    options = EmbedOptions(batch_size=batch_size, cache_dir=cache_dir or os.path.join(out_dir, ".cache"))
    return spec, options


class _Bar:
    """tqdm progress for the library's (done, total) callbacks; one bar per model."""

    def __init__(self, labels):
        self.labels = list(labels)
        self.bar = None

    def __call__(self, done, total):
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"embedding {self.labels.pop(0) if self.labels else ''}",
                            unit="img", leave=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


@main.command("eval")
@click.argument("model")
@_eval_options
@click.option("--embed-cache", "embed_cache", default=None, type=click.Path(file_okay=False),
              help="Image embeddings from 'clipsurgery embed MODEL --site embedding' instead of running the model.")
@_user_errors
def eval_cmd(model, out_dir, embed_cache, **kwargs):
    """Bias, zero-shot accuracy and retrieval of one MODEL on a labelled image set."""
    spec, options = _spec_and_options(out_dir=out_dir, **kwargs)
    encoder = open_encoder(model)
    images = image_embeddings_from_cache(embed_cache, spec.labels.files, encoder) if embed_cache else None
    report = evaluate(encoder, spec, options, _Bar([model]), images=images)
    rows = summary_rows(report, None, spec.conventions.k)
    result = {"spec": spec.describe(), "before": report, "after": None,
              "rows": [{**vars(r), "change": None} for r in rows]}
    write_report(out_dir, result, title="clipsurgery eval")
    click.echo(format_table(rows, single=True))
    click.echo(f"report: {os.path.join(out_dir, 'report.md')}")


@main.command("compare")
@click.argument("before")
@click.argument("after")
@_eval_options
@_user_errors
def compare_cmd(before, after, out_dir, **kwargs):
    """Compare BEFORE and AFTER (checkpoints, patched safetensors or ONNX) on one labelled set."""
    spec, options = _spec_and_options(out_dir=out_dir, **kwargs)
    result = compare(open_encoder(before), open_encoder(after), spec, options, _Bar(["before", "after"]))
    write_report(out_dir, result)
    rows = [Row(r["metric"], r["before"], r["after"], r["better"]) for r in result["rows"]]
    click.echo(format_table(rows))
    for line in format_query_cuts(result["per_query"], spec.conventions.k):
        click.echo(line)
    click.echo(f"report: {os.path.join(out_dir, 'report.md')}")


from surgery.cli.embed import embed as _embed_command  # noqa: E402
from surgery.cli.sae import sae as _sae_group  # noqa: E402
from surgery.cli.serve import serve as _serve_command  # noqa: E402

main.add_command(_sae_group)
main.add_command(_embed_command)
main.add_command(_serve_command)

if __name__ == "__main__":  # pragma: no cover
    main()
