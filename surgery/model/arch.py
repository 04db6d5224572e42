"""open_clip architectures: configs, building models from them, and inferring one from weights.

An architecture is an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``,
...). Known ones come from open_clip's registry (``open_clip.list_models()``, QuickGELU variants
included); a checkpoint written by clipsurgery carries its own config in its metadata.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

from surgery.errors import ArchitectureError, UnsupportedTowerError

log = logging.getLogger(__name__)

# Defaults of open_clip's CLIPVisionCfg / CLIPTextCfg that matter for tensor shapes.
_VISION_DEFAULTS = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12, "mlp_ratio": 4.0}


@dataclass(frozen=True)
class Signature:
    """The shape facts of a CLIP that its weights reveal (heads do not change any shape)."""
    embed_dim: int
    vision_width: int
    vision_layers: int
    patch_size: int
    vision_tokens: int  # grid cells + class token
    vision_mlp: int
    text_width: int
    text_layers: int
    context_length: int
    vocab_size: int
    text_mlp: int

    def differences(self, other: "Signature") -> list[str]:
        """What differs, phrased as 'field: weights W, config C' (self: config, other: weights)."""
        return [
            f"{name}: weights {getattr(other, name)}, config {getattr(self, name)}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]


def registry_names() -> list[str]:
    return list(open_clip.list_models())


def get_config(arch: str) -> dict:
    """Config dict for a registry name or a path to a JSON config (``model_cfg`` wrapper accepted)."""
    if os.path.isfile(arch):
        try:
            with open(arch, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArchitectureError(f"{arch}: unreadable architecture config ({exc})") from None
        cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
        if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict) \
                or not isinstance(cfg.get("text_cfg"), dict):
            raise ArchitectureError(f"{arch}: an architecture config is a JSON object with 'embed_dim', "
                                    "'vision_cfg' and 'text_cfg' objects (open_clip's model config format)")
        return cfg
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ArchitectureError(
            f"unknown architecture {arch!r}; pass one of open_clip.list_models() (e.g. ViT-B-32) "
            "or a JSON config file, or omit --arch to infer it from the weights"
        )
    return copy.deepcopy(cfg)


def check_supported(cfg: dict, arch: str = "this model") -> None:
    """Raise :class:`UnsupportedTowerError` unless both towers are plain transformers."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        raise UnsupportedTowerError(
            f"{arch}: vision tower is a timm model ({vision['timm_model_name']}); surgery supports "
            "open_clip ViT towers only"
        )
    if isinstance(vision.get("layers"), (list, tuple)):
        raise UnsupportedTowerError(
            f"{arch}: vision tower is a ModifiedResNet; surgery supports open_clip ViT towers only"
        )
    if text.get("hf_model_name"):
        raise UnsupportedTowerError(
            f"{arch}: text tower is a Hugging Face model ({text['hf_model_name']}); surgery supports "
            "open_clip text transformers only"
        )
    if "multimodal_cfg" in cfg:
        raise UnsupportedTowerError(f"{arch}: CoCa-style multimodal decoders are not supported")
    if vision.get("attentional_pool"):
        raise UnsupportedTowerError(f"{arch}: vision tower uses attentional pooling, not supported")
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    if isinstance(width, int) and isinstance(head_width, int) and (head_width < 1 or width % head_width):
        raise ArchitectureError(f"{arch}: vision width {width} is not a multiple of head_width {head_width}; "
                                "fix the config (heads = width / head_width)")
    width, heads = text.get("width", 512), text.get("heads", 8)
    if isinstance(width, int) and isinstance(heads, int) and (heads < 1 or width % heads):
        raise ArchitectureError(f"{arch}: text width {width} is not a multiple of its {heads} heads; fix the config")


def build_model(cfg: dict, device: str | torch.device = "cpu") -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP) with random weights, in eval mode."""
    kwargs = {k: v for k, v in cfg.items() if k not in ("custom_text",)}
    kwargs["vision_cfg"] = dict(cfg["vision_cfg"])
    kwargs["text_cfg"] = dict(cfg["text_cfg"])
    cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
    with torch.device(device):
        model = cls(**kwargs)
    return model.eval()


def signature_of_config(cfg: dict) -> Signature:
    vision = {**_VISION_DEFAULTS, **cfg["vision_cfg"]}
    text = {**_TEXT_DEFAULTS, **cfg["text_cfg"]}
    image, patch = _pair(vision["image_size"]), _pair(vision["patch_size"])
    return Signature(
        embed_dim=int(cfg["embed_dim"]),
        vision_width=int(vision["width"]),
        vision_layers=int(vision["layers"]),
        patch_size=int(patch[0]),
        vision_tokens=(image[0] // patch[0]) * (image[1] // patch[1]) + 1,
        vision_mlp=int(vision["width"] * vision["mlp_ratio"]),
        text_width=int(text["width"]),
        text_layers=int(text["layers"]),
        context_length=int(text["context_length"]),
        vocab_size=int(text["vocab_size"]),
        text_mlp=int(text["width"] * text["mlp_ratio"]),
    )


def signature_of_state_dict(sd: dict[str, torch.Tensor]) -> Signature | None:
    """Shape facts read off a CLIP state dict; None when it is not a ViT/transformer CLIP."""
    text_prefix = "text." if "text.token_embedding.weight" in sd else ""
    try:
        conv = sd["visual.conv1.weight"]
        proj = sd["visual.proj"]
        tok = sd[f"{text_prefix}token_embedding.weight"]
        return Signature(
            embed_dim=int(proj.shape[1]),
            vision_width=int(conv.shape[0]),
            vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
            patch_size=int(conv.shape[-1]),
            vision_tokens=int(sd["visual.positional_embedding"].shape[0]),
            vision_mlp=int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            text_width=int(tok.shape[1]),
            text_layers=_count_blocks(sd, f"{text_prefix}transformer.resblocks."),
            context_length=int(sd[f"{text_prefix}positional_embedding"].shape[0]),
            vocab_size=int(tok.shape[0]),
            text_mlp=int(sd[f"{text_prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        )
    except KeyError:
        return None


def describe_non_vit(sd: dict[str, torch.Tensor]) -> str | None:
    """Name the tower type of a state dict surgery cannot handle, if recognisable."""
    if any(k.startswith("visual.trunk.") for k in sd):
        return "vision tower is a timm model (e.g. ConvNeXt)"
    if "visual.attnpool.positional_embedding" in sd or any(k.startswith("visual.layer1.") for k in sd):
        return "vision tower is a ModifiedResNet"
    if any(k.startswith("text.transformer.embeddings.") or k.startswith("text.transformer.encoder.") for k in sd):
        return "text tower is a Hugging Face transformer"
    return None


def infer_arch(sd: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """The registry architecture whose parameter names and shapes equal those of ``sd``.

    QuickGELU variants have the same shapes as their plain twins: the plain name is preferred and
    the ambiguity is logged (pass ``arch`` explicitly for QuickGELU-trained weights such as
    OpenAI's, which :func:`surgery.load` recognises by their TorchScript format).
    """
    sig = signature_of_state_dict(sd)
    if sig is None:
        kind = describe_non_vit(sd)
        if kind:
            raise UnsupportedTowerError(f"{kind}; surgery supports open_clip ViT towers only")
        raise ArchitectureError(
            "these weights are not an open_clip CLIP state dict (no visual.conv1 / token_embedding); "
            "check the file, or pass --arch with a matching config"
        )
    scored: list[tuple[int, str, list[str]]] = []
    exact: list[str] = []
    for name in registry_names():
        cfg = open_clip.get_model_config(name)
        try:
            check_supported(cfg, name)
            diffs = signature_of_config(cfg).differences(sig)
        except (UnsupportedTowerError, KeyError, TypeError):
            continue
        if diffs:
            scored.append((len(diffs), name, diffs))
        elif state_dict_matches(sd, cfg) is None:
            exact.append(name)
    if exact:
        exact.sort(key=lambda n: ("quickgelu" in n.lower(), len(n)))
        if len(exact) > 1:
            log.warning("weights match %s; using %s (pass --arch to choose)", ", ".join(exact), exact[0])
        return exact[0], get_config(exact[0])
    scored.sort()
    near = "; ".join(f"{name} ({len(diffs)} differ: {', '.join(diffs[:3])})" for _, name, diffs in scored[:3])
    raise ArchitectureError(
        f"no known open_clip architecture matches these weights; closest: {near}. "
        "Pass --arch with a JSON model config that matches"
    )


def state_dict_matches(sd: dict[str, torch.Tensor], cfg: dict) -> str | None:
    """None when ``sd`` has exactly the parameter names and shapes of ``cfg``'s model, else why not."""
    expected = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    got = {k: tuple(v.shape) for k, v in normalise_keys(sd, cfg).items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} of other shape (e.g. {shapes[0]}: {got[shapes[0]]} vs {expected[shapes[0]]})")
    return "; ".join(problems) or None


def normalise_keys(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Map between the two open_clip text layouts (top-level vs ``text.``) as ``cfg`` needs."""
    sd = dict(sd)
    for key in ("attn_mask", "text.attn_mask"):  # non-persistent buffers TorchScript archives keep
        sd.pop(key, None)
    wants_custom = bool(cfg.get("custom_text"))
    has_custom = "text.token_embedding.weight" in sd
    if wants_custom and not has_custom:
        sd = open_clip.model.convert_to_custom_text_state_dict(sd)
    elif has_custom and not wants_custom:
        sd = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    for key in ("logit_scale", "logit_bias"):
        if key in sd and sd[key].ndim == 1 and sd[key].numel() == 1 and not cfg.get("nonscalar_logit_scale"):
            sd[key] = sd[key].reshape(())
    return sd


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len(ids)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


#: clipsurgery's own model configs, one JSON file per architecture (as open_clip keeps its model_configs/).
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def bundled_config(name: str) -> dict:
    """The model config ``configs/<name>.json`` (a fresh copy each call)."""
    path = os.path.join(CONFIG_DIR, f"{name}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
        raise ArchitectureError(f"no bundled model config {name!r}; known: {', '.join(known)}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
