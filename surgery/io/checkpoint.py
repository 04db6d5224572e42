"""Reading raw state dicts from checkpoint files, safely.

Formats: ``.safetensors``; ``torch.save`` files (``.pt/.pth/.bin``, zip or legacy), always read with
``torch.load(weights_only=True)``; OpenAI's TorchScript archives, read by
:mod:`surgery.io.torchscript` without running their code. Wrappers (``{"state_dict": ...}``,
``{"model": ...}``) and ``module.`` prefixes (DDP) are removed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.errors import CheckpointError
from surgery.io.fs import atomic_output
from surgery.io.torchscript import is_torchscript_archive, read_torchscript_state_dict

log = logging.getLogger(__name__)
#: Sidecar file next to a checkpoint (Hugging Face hub layout of open_clip).
SIDECAR_CONFIG = "open_clip_config.json"

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Non-tensor entries OpenAI's archives carry at the top level.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class RawCheckpoint:
    """A state dict as read from disk, before any model is built."""
    state_dict: dict[str, torch.Tensor]  # name -> tensor, prefixes stripped
    format: str  # "safetensors" | "torch" | "torchscript"
    sha256: str  # of the file's bytes
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata, if any
    sidecar_config: dict | None = None  # open_clip_config.json beside the file, if any


def write_safetensors(state: dict[str, torch.Tensor], path: str, metadata: dict[str, object]) -> None:
    """Write a state dict atomically; non-string metadata values are stored as JSON."""
    from safetensors.torch import save_file

    meta = {k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in metadata.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        sort_safetensors_header_(str(tmp))


def sort_safetensors_header_(path: str) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place.

    safetensors serialises its header from a hash map, so the same tensors and metadata give other
    bytes in another process; sorted, an export is byte-for-byte reproducible. The sorted header
    has the same length (the same pairs, reordered), so the data offsets stay valid; it is padded
    with spaces (as safetensors pads) if it comes out shorter.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        ordered = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(ordered) > size:  # cannot happen for a header safetensors wrote; leave the file as it is
            return
        fh.seek(8)
        fh.write(ordered + b" " * (size - len(ordered)))


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str) -> RawCheckpoint:
    """Read a checkpoint file into a flat state dict, never executing code from it."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file; check the path")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: file is empty; re-download or re-save the checkpoint")
    metadata: dict[str, str] = {}
    if path.endswith(".safetensors"):
        state, metadata, fmt = *_read_safetensors(path), "safetensors"
    elif is_torchscript_archive(path):
        state, fmt = read_torchscript_state_dict(path), "torchscript"
    else:
        state, fmt = _read_torch(path), "torch"
    state = _unwrap(state, path)
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return RawCheckpoint(
        state_dict=state,
        format=fmt,
        sha256=sha256_file(path),
        metadata=metadata,
        sidecar_config=_read_sidecar(path),
    )


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(exc)}); re-download it") from None
    return state, metadata


def _read_torch(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch < 2.14: "Unsupported global: GLOBAL os.system"; 2.14: "Trying to load unsupported GLOBAL posix.system"
        match = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", str(exc), flags=re.IGNORECASE)
        if match is None:
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a readable pickle); re-download or re-save it") from None
        raise CheckpointError(
            f"{path}: refused, loading it would run code from the file (it calls {match.group(1)}); "
            "only plain tensor state dicts are accepted, convert it to safetensors in a trusted environment"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)}); re-download or re-save it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    return obj


def _unwrap(obj: dict, path: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {"module": ...}} nests at most a couple of levels
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found; is this a model checkpoint?")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _read_sidecar(path: str) -> dict | None:
    sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), SIDECAR_CONFIG)
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: unreadable config beside the checkpoint ({exc}); fix or remove it") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes (for models with no file)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
