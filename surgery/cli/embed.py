"""``clipsurgery embed``: a CLIP's activations over an image folder or WebDataset shards, into a
cache folder ``sae train``/``sae neurons`` read (a thin click layer over surgery.sae.extract)."""
from __future__ import annotations

import click
import torch

from surgery.cli.errors import user_errors
from surgery.cli.launch import echo, join_job, launch_options, relaunch_if_asked
from surgery.io.checkpoint import state_dict_hash
from surgery.io.shards import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_UNIT_IMAGES, open_source
from surgery.model.loading import load
from surgery.model.preprocess import image_transform, preprocess_key
from surgery.sae.activations import Site
from surgery.sae.extract import ExtractOptions, check_cache_folder, extract


def rate_bar(desc: str, unit: str):
    """A progress callback (done, total) drawing one tqdm bar; total 0 = unknown."""
    from tqdm import tqdm

    state = {"bar": None}

    def update(done: int, total: int) -> None:
        if state["bar"] is None:
            state["bar"] = tqdm(total=total or None, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        state["bar"].update(done - state["bar"].n)

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    update.close = close
    return update


@click.command("embed")
@click.argument("model")
@click.option("--images", "source", required=True,
              help="Image folder, or WebDataset shards: a .tar, a brace pattern 'data/{00000..00099}.tar', "
                   "a folder of .tar files, or several joined by '::'.")
@click.option("--site", type=click.Choice(["residual", "embedding"]), default="residual", show_default=True,
              help="residual: every token after the last block; embedding: the image embedding.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Cache folder.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--unit-images", type=int, default=DEFAULT_UNIT_IMAGES, show_default=True,
              help="Images per cache part for folders (a shard is one part).")
@click.option("--seed", type=int, default=0, show_default=True, help="Row order within each part.")
@click.option("--max-failed-shards", type=float, default=0.05, show_default=True,
              help="Fraction of missing or damaged shards skipped (counted) before the job is refused.")
@click.option("--max-skipped-images", type=float, default=0.05, show_default=True,
              help="Fraction of undecodable images skipped (counted) before the job is refused.")
@click.option("--max-bad-labels", type=float, default=0.05, show_default=True,
              help="Fraction of samples whose label JSON cannot be parsed (counted) before the job is refused.")
@click.option("--image-key", default=None,
              help="Shards: the member extension holding the image (e.g. jpg, or seg.png). Default: the first of "
                   "jpg, jpeg, png, webp, bmp, gif, tif, tiff that a sample has (never KEY.seg.png and the like).")
@click.option("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES, show_default=True,
              help="Shards: largest member read (bytes, after decompression); a shard with a larger one is "
                   "counted as damaged.")
@click.option("--force", is_flag=True, help="Delete an earlier run's parts in --out and start over (only the "
                                            "tool's own part-NNNNN files and cache.json).")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda (each rank on its local GPU).")
@launch_options
@user_errors
def embed(model, source, site, out_dir, batch_size, unit_images, seed, max_failed_shards, max_skipped_images,
          max_bad_labels, image_key, max_member_bytes, force, device, launch):
    """Embed --images through MODEL's vision tower at --site into the cache folder --out.

    Resumable: rerun the same command after a kill and the finished parts are kept (parts whose
    images or shards changed since are redone). With --nproc N (or under torchrun) the parts are
    shared out over the ranks; the cache is the same.
    """
    options = ExtractOptions(batch_size=batch_size, unit_images=unit_images, seed=seed,
                             max_skipped_fraction=max_skipped_images, max_failed_shards=max_failed_shards,
                             max_bad_labels=max_bad_labels, image_key=image_key, max_member_bytes=max_member_bytes)
    src = open_source(source)  # bad options and sources are refused before any process starts
    check_cache_folder(out_dir, src)
    relaunch_if_asked(launch)
    ranks = join_job(device)
    try:
        if device.startswith("cuda"):
            device = f"cuda:{ranks.local_rank}" if ranks.distributed else device
        loaded = load(model)
        model_hash = state_dict_hash(loaded.model)
        net = loaded.model.to(device)
        transform = image_transform(loaded.preprocess)
        if device != "cpu":
            base = transform
            transform = lambda image: base(image).to(device)  # noqa: E731
        bar = rate_bar("embedding", "img") if ranks.main else None
        with torch.inference_mode():
            result = extract(net, Site("vision", site), src, out_dir, transform, options, ranks=ranks,
                             model_hash=model_hash, preprocess=preprocess_key(loaded.preprocess), force=force,
                             progress=bar)
        if bar is not None:
            bar.close()
        redone = f", {result.redone_parts} redone (their sources changed)" if result.redone_parts else ""
        echo(ranks, f"embedded {result.images} images into {result.cache.rows} rows of width {result.cache.d} "
                    f"({len(result.cache.shards)} parts, {result.reused_parts} kept from an earlier run{redone}, "
                    f"{ranks.world} rank{'s' if ranks.world > 1 else ''}) in {out_dir}; "
                    f"{result.seconds:.1f} s, {result.images / max(result.seconds, 1e-9):.1f} images/s")
        if result.skipped:
            echo(ranks, f"skipped {len(result.skipped)} unreadable images, e.g. {result.skipped[0][0]}: "
                        f"{result.skipped[0][1]}")
        if result.bad_labels:
            echo(ranks, f"{len(result.bad_labels)} samples have label JSON that cannot be parsed (kept, unlabelled), "
                        f"e.g. {result.bad_labels[0][0]}")
        for shard, reason in result.failed_shards:
            echo(ranks, f"skipped shard {shard}: {reason}")
    finally:
        ranks.close()


__all__ = ["embed"]
