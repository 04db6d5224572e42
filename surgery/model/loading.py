"""``surgery.load``: the one entry point from "a model someone has" to an open_clip CLIP.

Sources, tried in this order:

* ``builtin:tiny`` — the tiny demo CLIP built in-process (:mod:`surgery.model.tiny`);
  ``builtin:world`` — the bundled planted-bias world model (:mod:`surgery.world.train`).
* ``hf-hub:org/name`` — an open_clip repository on the Hugging Face hub (config + weights).
* a local file — ``.safetensors``, ``torch.save`` state dicts (``.pt/.pth/.bin``, optionally
  wrapped in ``{"state_dict": ...}`` and/or prefixed with ``module.``) and OpenAI's TorchScript
  archives. ``torch.load`` is only ever called with ``weights_only=True``; TorchScript archives
  are read without running their code.
* ``NAME:TAG`` or ``NAME`` + ``pretrained=TAG`` — an open_clip registry architecture with a
  pretrained tag (``ViT-B-32:openai``); the weights file is downloaded by open_clip's cache.

The architecture comes from ``arch`` if given, else from the checkpoint's own metadata
(clipsurgery exports) or an ``open_clip_config.json`` beside it, else it is inferred from the
weights' names and shapes (:func:`surgery.model.arch.infer_arch`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field

import open_clip
import torch
from torch import nn

from surgery.errors import ArchitectureError, CheckpointError, SurgeryError
from surgery.io.checkpoint import RawCheckpoint, read_checkpoint, sha256_file
from surgery.io.metadata import META_ARCH, META_MODEL_CONFIG
from surgery.model import arch as arch_mod
from surgery.model.neurons import reattach, split_state
from surgery.model.open_balance import attach_open_balance, open_balance_from_state, split_open_balance_state
from surgery.model.preprocess import default_preprocess, tokenizer_info
from surgery.model.tiny import build_tiny_clip

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
HF_HUB_PREFIX = "hf-hub:"
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: The bundled default model, ``builtin:world`` (trained by examples/train_world.py).
BUNDLED_WORLD_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "world_model.safetensors")


@dataclass
class LoadedModel:
    """An open_clip CLIP plus what is known about where it came from."""
    model: nn.Module  # open_clip CLIP / CustomTextCLIP, eval mode
    arch: str  # registry name, or "custom" for a config carried by the checkpoint
    config: dict  # the open_clip model config it was built from
    source: str  # what was passed to load()
    format: str  # "safetensors" | "torch" | "torchscript" | "builtin"
    sha256: str | None  # of the weights file; None for in-process models
    preprocess: dict  # size, mean, std, interpolation, resize_mode
    tokenizer: dict  # {"name": ..., "context_length": ...}
    metadata: dict = field(default_factory=dict)  # the checkpoint's extra metadata (plan, world, ...)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load(source: str, *, arch: str | None = None, pretrained: str | None = None,
         device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    """Load a CLIP from a file, the hub, the open_clip registry or a built-in demo model."""
    if precision not in _DTYPES:
        raise SurgeryError(f"unknown precision {precision!r}; choose one of {', '.join(_DTYPES)}")
    if not isinstance(source, str) or not source:
        raise SurgeryError("no model given; pass a checkpoint path, NAME:TAG, hf-hub:org/name or builtin:tiny")
    if source.startswith(BUILTIN_PREFIX):
        if arch:
            log.warning("--arch %s is ignored: %s carries its own architecture", arch, source)
        loaded = _load_builtin(source)
    elif source.startswith(HF_HUB_PREFIX):
        loaded = _load_hf_hub(source, arch)
    elif os.path.exists(source) or _looks_like_path(source):
        loaded = load_file(source, arch=arch)
    else:
        loaded = _load_registry(source, pretrained, arch)
    loaded.model.to(device=device, dtype=_DTYPES[precision])
    return loaded


def load_file(path: str, *, arch: str | None = None, source: str | None = None,
              preprocess: dict | None = None) -> LoadedModel:
    """Load a local checkpoint file (see module docstring for formats)."""
    raw = read_checkpoint(path)
    name, cfg = _resolve_config(raw, arch, path)
    arch_mod.check_supported(cfg, name)
    model = arch_mod.build_model(cfg)

    rest, open_state = split_open_balance_state(raw.state_dict)
    plain_state, neuron_state = split_state(rest)
    state = arch_mod.normalise_keys(plain_state, cfg)
    problem = arch_mod.state_dict_matches(state, cfg)
    if problem:
        hint = "check --arch or omit it to infer the architecture" if arch else "pass --arch with the right architecture"
        raise ArchitectureError(f"{path}: weights do not fit {name}: {problem}; {hint}")
    model.load_state_dict(state, strict=True)
    model.float().eval()
    metadata = _extra_metadata(raw)
    if neuron_state:

        if not metadata.get("plan"):
            raise CheckpointError(f"{path}: has neuron-module weights but no plan in its metadata; re-export it")
        reattach(model, _neuron_edits(metadata["plan"], path), neuron_state)
    if open_state:
        attach_open_balance(model, _open_balance(metadata.get("plan"), open_state, path))
    given = preprocess or metadata.pop("preprocess", None) or _sidecar_preprocess(raw) or {}
    pre = {**default_preprocess(cfg), **{k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items()}}
    open_clip.model.set_model_preprocess_cfg(model, _as_preprocess_cfg(pre))
    return LoadedModel(
        model=model, arch=name, config=cfg, source=source or path, format=raw.format,
        sha256=raw.sha256, preprocess=pre, tokenizer=tokenizer_info(cfg), metadata=metadata,
    )


def _neuron_edits(plan: object, path: str) -> list[dict]:
    """The neuron edits (plain dicts) of the plan stored in a checkpoint's metadata."""
    edits = plan.get("neurons", []) if isinstance(plan, dict) else None
    if not isinstance(edits, list) or not all(isinstance(e, dict) and isinstance(e.get("ids"), list) for e in edits):
        raise CheckpointError(f"{path}: the plan in its metadata has malformed neuron edits; re-export it")
    return edits


def _open_balance(plan: object, buffers: dict, path: str):
    """The open-balance module of a checkpoint from its buffers and its plan's entry."""
    entries = plan.get("open_balance") if isinstance(plan, dict) else None
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        raise CheckpointError(f"{path}: has open-balance weights but its metadata's plan does not describe exactly "
                              "one open balance; re-export it")
    try:
        return open_balance_from_state(entries[0], buffers)
    except SurgeryError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _resolve_config(raw: RawCheckpoint, arch: str | None, path: str) -> tuple[str, dict]:
    if arch:
        cfg = arch_mod.get_config(arch)
        return (arch if not os.path.isfile(arch) else "custom"), cfg
    if META_MODEL_CONFIG in raw.metadata:
        try:
            cfg = json.loads(raw.metadata[META_MODEL_CONFIG])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: corrupt model config in its metadata; pass --arch") from None
        return raw.metadata.get(META_ARCH, "custom"), cfg
    if raw.sidecar_config is not None:
        return "custom", raw.sidecar_config.get("model_cfg", raw.sidecar_config)
    try:
        name, cfg = arch_mod.infer_arch(raw.state_dict)
    except SurgeryError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    if raw.format == "torchscript" and not cfg.get("quick_gelu"):
        # OpenAI's archives were trained with QuickGELU (open_clip's "-quickgelu" twins).
        cfg["quick_gelu"] = True
        name = name if name.endswith("-quickgelu") else f"{name}-quickgelu"
    log.info("inferred architecture %s for %s", name, path)
    return name, cfg


def _extra_metadata(raw: RawCheckpoint) -> dict:
    meta = {}
    for key, value in raw.metadata.items():
        if key.startswith("clipsurgery.") and key not in (META_MODEL_CONFIG, META_ARCH):
            short = key[len("clipsurgery."):]
            try:
                meta[short] = json.loads(value)
            except (ValueError, RecursionError):  # not JSON (a plain string), or a number past int's digit limit
                meta[short] = value
    return meta


def _sidecar_preprocess(raw: RawCheckpoint) -> dict | None:
    if raw.sidecar_config and "preprocess_cfg" in raw.sidecar_config:
        return raw.sidecar_config["preprocess_cfg"]
    return None


def _as_preprocess_cfg(pre: dict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in pre.items()}


def _load_builtin(source: str) -> LoadedModel:

    name = source[len(BUILTIN_PREFIX):]
    if name == "world":
        if not os.path.isfile(BUNDLED_WORLD_MODEL):
            raise CheckpointError(f"the bundled world model is missing ({BUNDLED_WORLD_MODEL}); "
                                  "reinstall clipsurgery or run examples/train_world.py")
        loaded = load_file(BUNDLED_WORLD_MODEL, source=source)
        return loaded
    if name != "tiny":
        raise SurgeryError(f"unknown built-in model {source!r}; available: builtin:tiny, builtin:world")
    model, cfg = build_tiny_clip(seed=0)
    pre = default_preprocess(cfg)
    open_clip.model.set_model_preprocess_cfg(model, _as_preprocess_cfg(pre))
    return LoadedModel(model=model, arch="custom", config=cfg, source=source, format="builtin",
                       sha256=None, preprocess=pre, tokenizer=tokenizer_info(cfg))


def _load_hf_hub(source: str, arch: str | None) -> LoadedModel:
    from open_clip.pretrained import download_pretrained_from_hf

    repo = source[len(HF_HUB_PREFIX):]
    if not repo or "/" not in repo:
        raise SurgeryError(f"{source!r}: expected hf-hub:ORG/NAME")
    try:
        with _quiet_hub():
            cfg_path = download_pretrained_from_hf(repo, filename="open_clip_config.json")
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise CheckpointError(f"could not fetch {source} config ({_short(exc)}); check the name and network") from None
    last_error: Exception | None = None
    for filename in _HF_WEIGHT_FILES:
        try:
            with _quiet_hub():
                weights = download_pretrained_from_hf(repo, filename=filename)
            break
        except Exception as exc:  # try the next file name
            last_error = exc
    else:
        raise CheckpointError(f"could not fetch weights of {source} ({_short(last_error)}); check the name and network")
    if arch is None:
        with open(cfg_path, encoding="utf-8") as fh:
            sidecar = json.load(fh)
        arch = None
        loaded = _load_with_config(weights, sidecar.get("model_cfg", sidecar), sidecar.get("preprocess_cfg"), source)
        return loaded
    return load_file(weights, arch=arch, source=source)


def _load_with_config(path: str, cfg: dict, preprocess: dict | None, source: str) -> LoadedModel:
    tmp_cfg = _write_temp_config(cfg)
    try:
        loaded = load_file(path, arch=tmp_cfg, source=source, preprocess=preprocess)
    finally:
        os.unlink(tmp_cfg)
    return loaded


def _write_temp_config(cfg: dict) -> str:
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=".json", prefix="clipsurgery-cfg-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    return tmp


def _load_registry(source: str, pretrained: str | None, arch: str | None) -> LoadedModel:
    name, _, tag = source.partition(":")
    tag = tag or pretrained
    if open_clip.get_model_config(name) is None:
        raise SurgeryError(
            f"{source!r} is neither a file nor a known model; pass a checkpoint path, NAME:TAG "
            "(e.g. ViT-B-32:openai), hf-hub:org/name or builtin:tiny"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tag:
        raise SurgeryError(f"{name} names an architecture only; add a pretrained tag ({name}:TAG, tags: {', '.join(tags) or 'none'}) or pass a checkpoint file")
    if tag not in tags:
        raise SurgeryError(f"{name} has no pretrained tag {tag!r}; available: {', '.join(tags) or 'none'}")
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    try:
        with _quiet_hub():
            path = open_clip.pretrained.download_pretrained(pcfg)
    except Exception as exc:  # network or hub errors
        raise CheckpointError(f"could not download {name}:{tag} ({_short(exc)}); check the network or pass a local file") from None
    if not path:
        raise CheckpointError(f"{name}:{tag} has no downloadable weights; pass a local checkpoint file")
    cfg = arch_mod.get_config(arch or name)
    if pcfg.get("quick_gelu"):
        cfg["quick_gelu"] = True
    pre = default_preprocess(cfg)
    pre.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()
                if k in ("mean", "std", "interpolation", "resize_mode")})
    loaded = _load_with_config(path, cfg, pre, source)
    loaded.arch = f"{name}-quickgelu" if cfg.get("quick_gelu") and not name.endswith("quickgelu") else name
    return loaded


def _looks_like_path(source: str) -> bool:
    return os.sep in source or source.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _short(exc: BaseException | None, limit: int = 160) -> str:
    """One line about a download failure: its root cause (the innermost exception, e.g. a DNS error
    under huggingface_hub's wrapper), cut at a word boundary, never mid-word."""
    root = exc
    while root is not None and (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    lines = str(root).strip().splitlines() if root is not None else []
    text = lines[0] if lines else type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return text


@contextlib.contextmanager
def _quiet_hub():
    """Downloads without huggingface_hub's per-retry warning lines (a failure is reported once, by us)."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def sha256_of(path: str) -> str:
    return sha256_file(path)
