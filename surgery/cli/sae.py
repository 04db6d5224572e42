"""``clipsurgery sae ...``: train SAEs and find social neurons (a thin click layer over surgery.sae).

Registered in surgery/cli/main.py with ``main.add_command(sae)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import click

from surgery.cli.device import device_options
from surgery.cli.errors import user_errors as _user_errors
from surgery.cli.launch import echo, join_job, launch_options, relaunch_if_asked
from surgery.errors import SurgeryError
from surgery.io.checkpoint import state_dict_hash
from surgery.io.fs import check_folder_writable, check_output_path
from surgery.io.images import ImageFolderDataset, data_hash, resolve_images_dir
from surgery.io.labels import load_labels
from surgery.model.attention import head_masked
from surgery.model.device import resolve_placement
from surgery.model.loading import load
from surgery.model.preprocess import image_transform, preprocess_key, tokenize
from surgery.sae import (
    NeuronOptions,
    SAEConfig,
    Site,
    TrainOptions,
    build_cache,
    evaluate_sae,
    group_prompt_texts,
    load_sae,
    neurons_from_cache,
    neurons_from_images,
    neurons_from_texts,
    open_cache,
    pooled_reduction,
    save_trained,
    site_width,
    train_sae,
    write_neurons,
)


@click.group()
def sae() -> None:
    """Sparse autoencoders on a CLIP tower and the "social neurons" they find (seed 001)."""


def _read_texts(texts_path: str) -> list[str]:
    try:
        with open(texts_path, encoding="utf-8") as fh:
            texts = [ln.strip() for ln in fh if ln.strip()]
    except OSError as exc:
        raise SurgeryError(f"cannot read texts file {texts_path} ({exc.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise SurgeryError(f"{texts_path} is not UTF-8 text; give one text per line") from None
    if not texts:
        raise SurgeryError(f"{texts_path} has no texts; give one text per line")
    return texts


def _reusable_cache(cache_dir: str, model_hash: str, where: Site, source: dict, force: bool):
    """The existing cache when it holds this model's activations of these inputs at this site; None
    when there is none (or --force rebuilds it); otherwise an error naming what differs."""
    if not os.path.isfile(os.path.join(cache_dir, "cache.json")):
        return None
    cache = open_cache(cache_dir)
    differences = [] if cache.model_hash == model_hash else ["the model's weights"]
    if cache.site != where:
        differences.append(f"site {cache.site.tower}/{cache.site.site} vs {where.tower}/{where.site}")
    differences += cache.source_differences(source)
    if not differences:
        return cache
    if force:
        return None
    raise SurgeryError(f"cache {cache_dir} was built from other inputs ({'; '.join(differences)}); pass --force "
                       "to rebuild it (and retrain from scratch), or another --cache / --out")


def _progress(desc: str, unit: str):
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done, total, *_):
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar["bar"].close()
            bar["bar"] = None

    return update


@sae.command("train")
@click.argument("model")
@click.option("--images", "images_dir", type=click.Path(), default=None, help="Image folder (vision tower).")
@click.option("--texts", "texts_path", type=click.Path(), default=None, help="Text file, one per line (text tower).")
@click.option("--site", type=click.Choice(["residual", "embedding"]), default="residual", show_default=True,
              help="residual: every token after the last block (input of ln_post/ln_final); embedding: the output.")
@click.option("--kind", type=click.Choice(["batchtopk", "topk", "relu"]), default="batchtopk", show_default=True)
@click.option("--expansion", type=int, default=8, show_default=True, help="Latents = expansion x width.")
@click.option("--k", type=int, default=20, show_default=True, help="Active latents per row (topk/batchtopk).")
@click.option("--l1", "l1_coeff", type=float, default=1e-3, show_default=True, help="L1 weight (relu).")
@click.option("--matryoshka", default=None, help="Comma-separated nested prefix sizes, e.g. 64,256,1024.")
@click.option("--steps", type=int, default=2000, show_default=True)
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Rows per training step.")
@click.option("--lr", type=float, default=4e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Activation cache folder (default: OUT/cache); reused when it matches the model, site and inputs.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from OUT/checkpoint.safetensors.")
@click.option("--force", is_flag=True, help="Rebuild a cache made from other inputs (and train from scratch).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Steps between checkpoints.")
@device_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@launch_options
@_user_errors
def sae_train(model, images_dir, texts_path, site, kind, expansion, k, l1_coeff, matryoshka, steps, batch_size, lr,
              seed, cache_dir, resume, force, checkpoint_every, device, out_dir, launch):
    """Train an SAE on MODEL's activations of --images (vision) or --texts (text), without labels,
    or on a cache written by 'clipsurgery embed' (--cache DIR alone).

    Writes OUT/weights.safetensors + OUT/cfg.json (config, training history, NMSE, explained variance,
    L0, dead fraction) and keeps OUT/checkpoint.safetensors for resuming. With --nproc N (or under
    torchrun) each step's batch is split over the ranks (data parallel; the same run as one process).
    """
    relaunch_if_asked(launch)
    if images_dir is None and texts_path is None and cache_dir:
        open_cache(cache_dir)  # a missing, unfinished or damaged cache: one line saying which, before any work
        return _train_from_cache(model, cache_dir, site, kind, expansion, k, l1_coeff, matryoshka, steps, batch_size,
                                 lr, seed, resume, checkpoint_every, device, out_dir)
    if (images_dir is None) == (texts_path is None):
        raise click.UsageError("give exactly one of --images DIR or --texts FILE (or --cache DIR of an existing cache)")
    if "WORLD_SIZE" in os.environ:
        raise click.UsageError("on several processes, train from a cache: build it with 'clipsurgery embed' "
                               "(which runs on several processes too), then 'sae train MODEL --cache DIR'")
    images_dir = resolve_images_dir(images_dir) if images_dir else None
    # the SAE stage stays fp32 (the cache feeds an SAE whose edits must match the fp32 model)
    placement = resolve_placement(device, autocast=False)
    for folder in (out_dir, cache_dir):  # a read-only or impossible output: refused before minutes of work
        if folder:
            check_folder_writable(folder)
    loaded = load(model, device=placement.device)
    where = Site("vision" if images_dir else "text", site)
    model_hash = state_dict_hash(loaded.model)
    try:
        prefixes = tuple(int(m) for m in matryoshka.split(",")) if matryoshka else ()
    except ValueError:
        raise click.UsageError(f"--matryoshka takes comma-separated integers, got {matryoshka!r}") from None
    # validated before any activation is computed (k vs width, prefixes, ...)
    cfg = SAEConfig(d_in=site_width(loaded.model, where), expansion=expansion, kind=kind, k=k, l1_coeff=l1_coeff,
                    site=where.site, tower=where.tower, model_hash=model_hash, matryoshka=prefixes)
    options = TrainOptions(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_dir=out_dir, resume=resume,
                           checkpoint_every=checkpoint_every, device=placement.device)
    if images_dir:
        dataset = ImageFolderDataset(images_dir, None, image_transform(loaded.preprocess))
        source = {"kind": "images", "data_hash": data_hash(images_dir, dataset.files),
                  "preprocess": preprocess_key(loaded.preprocess)}
    else:
        texts = _read_texts(texts_path)
        source = {"kind": "texts", "data_hash": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
                  "tokenizer": json.dumps(loaded.tokenizer, sort_keys=True)}
    cache_dir = cache_dir or os.path.join(out_dir, "cache")
    cache = _reusable_cache(cache_dir, model_hash, where, source, force)
    if cache is not None:
        click.echo(f"using cached activations in {cache_dir} ({cache.rows} rows)")
    else:
        if force:  # new activations: a checkpoint trained on the old ones must not be resumed
            options = dataclasses.replace(options, resume=False)
        os.makedirs(out_dir, exist_ok=True)
        if images_dir:
            batches, total = (images for images, _idx in dataset.batches(64)), len(dataset)
        else:
            batches, total = tokenize(texts, loaded.tokenizer).split(256), len(texts)
        with head_masked(loaded.model, towers=(where.tower,), backend=placement.backend):  # no masks: plain attention
            cache = build_cache(loaded.model, where, batches, cache_dir, seed=seed, total=total,
                                progress=_progress("caching activations", "input"), model_hash=model_hash,
                                source=source)
        click.echo(f"cached {cache.rows} rows from {cache.samples} inputs in {cache_dir}")
    trained, history = train_sae(cache, cfg, options, _progress("training", "step"), model_hash=model_hash)
    metrics = evaluate_sae(trained, cache)
    save_trained(trained, out_dir, history, metrics)
    click.echo(placement.describe("sae train"))
    click.echo(f"NMSE {metrics.nmse:.4f}  explained variance {metrics.explained_variance:.4f}  "
               f"L0 {metrics.l0:.1f}  dead {metrics.dead_fraction:.3f}  ({history['steps_per_second']} steps/s)")
    click.echo(f"wrote {os.path.join(out_dir, 'weights.safetensors')} and cfg.json")


def _train_from_cache(model, cache_dir, site, kind, expansion, k, l1_coeff, matryoshka, steps, batch_size, lr, seed,
                      resume, checkpoint_every, device, out_dir):
    """``sae train MODEL --cache DIR``: train on an existing cache, on one rank or many (each rank on
    its local GPU when the job runs on CUDA)."""
    placement = resolve_placement(device, autocast=False)
    check_folder_writable(out_dir)
    ranks = join_job(placement.device)
    if ranks.distributed and placement.device.startswith("cuda"):
        placement = resolve_placement(f"cuda:{ranks.local_rank}", autocast=False)
    try:
        loaded = load(model)
        model_hash = state_dict_hash(loaded.model)
        cache = open_cache(cache_dir)
        cache.check_model(model_hash)
        if cache.site.site != site:
            raise SurgeryError(f"cache {cache_dir} holds {cache.site.tower}/{cache.site.site} activations, not "
                               f"{site}; pass --site {cache.site.site} or build a cache at --site {site}")
        try:
            prefixes = tuple(int(m) for m in matryoshka.split(",")) if matryoshka else ()
        except ValueError:
            raise click.UsageError(f"--matryoshka takes comma-separated integers, got {matryoshka!r}") from None
        cfg = SAEConfig(d_in=cache.d, expansion=expansion, kind=kind, k=k, l1_coeff=l1_coeff, site=cache.site.site,
                        tower=cache.site.tower, model_hash=model_hash, matryoshka=prefixes)
        options = TrainOptions(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_dir=out_dir,
                               resume=resume, checkpoint_every=checkpoint_every, device=placement.device)
        if ranks.main:
            os.makedirs(out_dir, exist_ok=True)
        ranks.barrier()
        echo(ranks, f"training on {cache.rows} cached rows of {cache_dir} ({ranks.world} rank"
                    f"{'s' if ranks.world > 1 else ''}, {batch_size // ranks.world} rows per rank per step)")
        progress = _progress("training", "step") if ranks.main else None
        trained, history = train_sae(cache, cfg, options, progress, model_hash=model_hash, ranks=ranks)
        if ranks.main:
            metrics = evaluate_sae(trained, cache)
            save_trained(trained, out_dir, history, metrics)
            click.echo(f"NMSE {metrics.nmse:.4f}  explained variance {metrics.explained_variance:.4f}  L0 "
                       f"{metrics.l0:.1f}  dead {metrics.dead_fraction:.3f}  ({history['steps_per_second']} steps/s)")
            click.echo(f"wrote {os.path.join(out_dir, 'weights.safetensors')} and cfg.json")
            click.echo(placement.describe("sae train"))
        ranks.barrier()
    finally:
        ranks.close()


@sae.command("neurons")
@click.argument("sae_dir", type=click.Path(file_okay=False))
@click.argument("model")
@click.option("--images", "images_dir", default=None, type=click.Path(), help="Labelled image folder.")
@click.option("--labels", "labels_path", default=None, type=click.Path(), help="Labels CSV (file,<attribute>,...).")
@click.option("--groups", default=None,
              help="No labelled images: comma-separated group names, searched with prompts that name them.")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="A cache from 'clipsurgery embed' at the SAE's site: labels from its shards' JSON "
                   "(or --labels, keyed by file/shard key); the model is not run.")
@click.option("--attribute", required=True, help="Label column holding the groups, e.g. race or gender.")
@click.option("--tau", type=float, default=0.5, show_default=True,
              help="A latent is effective for a group when non-zero on >= tau of its images.")
@click.option("--top-n", type=int, default=3, show_default=True, help="Latents selected per group (ranked score).")
@click.option("--token-reduce", type=click.Choice(["pooled", "max", "mean", "first"]), default="pooled",
              show_default=True, help="Residual SAEs: how a sample's tokens become one activation.")
@device_options
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="neurons.json to write.")
@_user_errors
def sae_neurons(sae_dir, model, images_dir, labels_path, groups, cache_dir, attribute, tau, top_n, token_reduce,
                device, out_path):
    """Find SAE_DIR's social neurons for each group of --attribute, on MODEL's labelled images
    (--images/--labels), on an embed cache (--cache, labels from its shards or --labels) or,
    without labels, on prompts naming the groups (--groups)."""

    if cache_dir:
        if images_dir or groups:
            raise click.UsageError("--cache replaces --images/--groups: give one of them")
    elif bool(groups) == bool(images_dir or labels_path) or bool(images_dir) != bool(labels_path):
        raise click.UsageError("give either --images DIR --labels CSV, --cache DIR [--labels CSV], or --groups g1,g2,...")
    images_dir = resolve_images_dir(images_dir) if images_dir else None
    placement = resolve_placement(device, autocast=False)
    inputs = (labels_path, os.path.join(sae_dir, "cfg.json"), os.path.join(sae_dir, "weights.safetensors"), model)
    check_output_path(out_path, inputs=inputs, exists_hint="'sae neurons' never replaces a file: choose another "
                                                           "--out, or remove that file first")
    loaded = load(model, device=placement.device)
    trained = load_sae(sae_dir)
    options = NeuronOptions(tau=tau, top_n=top_n, token_reduce=token_reduce)
    if cache_dir:
        cache = open_cache(cache_dir)
        cache.check_model(state_dict_hash(loaded.model))
        labels = None
        if labels_path:
            table = load_labels(labels_path, required=[attribute])
            labels = {}  # a folder's sample key is its file name; a shard's is the name without extension
            for file, value in zip(table.files, table.attributes[attribute]):
                labels[file] = value
                labels.setdefault(os.path.splitext(file)[0], value)
        pooled = pooled_reduction(loaded.model, Site(trained.cfg.tower, trained.cfg.site)) \
            if trained.cfg.site == "residual" else "first"
        report = neurons_from_cache(trained, cache, attribute, options, pooled_as=pooled, labels=labels)
    elif groups:
        names = [g.strip() for g in groups.split(",") if g.strip()]
        report = neurons_from_texts(loaded.model, trained, group_prompt_texts(names), loaded.tokenizer, options,
                                    attribute=attribute)
    else:
        tower = trained.cfg.tower
        with head_masked(loaded.model, towers=(tower,), backend=placement.backend):  # no masks: plain attention
            report = neurons_from_images(loaded.model, trained, images_dir, labels_path, attribute,
                                         image_transform(loaded.preprocess), options)
    write_neurons(report, out_path, {"sae_dir": os.path.abspath(sae_dir), "model": model})
    click.echo(placement.describe("sae neurons"))
    if report.bad_labels:
        click.echo(f"{report.bad_labels} samples have label JSON that cannot be parsed; left out of the search")
    for group in report.groups:
        click.echo(f"{group}: rule {len(report.rule.get(group, []))} latents; selected {report.selected.get(group, [])}")
    click.echo(f"wrote {out_path}")


__all__ = ["sae"]
