"""A summary of a loaded model, for ``clipsurgery inspect`` and reports."""
from __future__ import annotations

from surgery.model.loading import LoadedModel
from surgery.model.towers import get_towers


def describe_model(loaded: LoadedModel) -> dict:
    """JSON-able facts: architecture, towers (layers x heads, head width, ...), size, dtype, sha256."""
    towers = {name: view.summary() for name, view in get_towers(loaded.model).items()}
    return {
        "source": loaded.source,
        "architecture": loaded.arch,
        "format": loaded.format,
        "sha256": loaded.sha256,
        "parameters": loaded.n_parameters,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "embed_dim": int(loaded.config["embed_dim"]),
        "quick_gelu": bool(loaded.config.get("quick_gelu", False)),
        "towers": towers,
        "preprocess": loaded.preprocess,
        "tokenizer": loaded.tokenizer,
    }


def format_description(info: dict) -> str:
    """Human-readable lines of :func:`describe_model`'s output."""
    lines = [
        f"source        {info['source']}",
        f"architecture  {info['architecture']}" + ("  (QuickGELU)" if info["quick_gelu"] else ""),
        f"format        {info['format']}",
        f"sha256        {info['sha256'] or '-'}",
        f"parameters    {info['parameters']:,}",
        f"dtype         {info['dtype']}",
        f"embed dim     {info['embed_dim']}",
    ]
    for name, tower in info["towers"].items():
        lines.append(
            f"{name:<13} {tower['layers']} layers x {tower['heads']} heads, head width {tower['head_dim']}, "
            f"width {tower['width']}, {'causal' if tower['causal'] else 'full'} attention, pooling {tower['pooling']}"
        )
    pre = info["preprocess"]
    lines.append(f"preprocess    size {pre.get('size')}, {pre.get('interpolation')}, resize {pre.get('resize_mode')}")
    lines.append(f"tokenizer     {info['tokenizer']['name']}, context {info['tokenizer']['context_length']}")
    return "\n".join(lines)
