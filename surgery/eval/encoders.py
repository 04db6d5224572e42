"""Encoders: anything that turns images and token ids into CLIP embeddings.

``compare`` and ``eval`` take "anything the tool loads": a checkpoint or patched safetensors
(:class:`TorchEncoder`), or an exported ONNX file run through ONNX Runtime (added by the export
stage). Every encoder states its preprocessing, its tokenizer and an ``identity`` hash that keys
the embedding cache.
"""
from __future__ import annotations

import hashlib
import json
from typing import Protocol

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.io.checkpoint import sha256_file, state_dict_hash
from surgery.io.metadata import META_NORMALIZED, META_PRECISION, META_PREPROCESS, META_TOKENIZER
from surgery.io.onnx import ort_session, read_metadata, resolve_pair
from surgery.model.loading import LoadedModel, load


class Encoder(Protocol):
    name: str  # what the user passed
    identity: str  # sha256 of the weights as they are now: keys the embedding cache
    preprocess: dict  # size, mean, std, interpolation, resize_mode
    tokenizer: dict  # name, context_length

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        ...

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, ctx) int64 -> (B, D)
        ...


class TorchEncoder:
    """A loaded open_clip model, run in PyTorch."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu"):
        self.loaded = loaded
        self.model = loaded.model.to(device).eval()
        self.device = torch.device(device)
        self.name = loaded.source
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer

    @property
    def identity(self) -> str:
        """Hash of the weights as they are now (edits after loading change it).

        Memoised on every tensor's identity and in-place version counter, so it is recomputed
        only after the weights change.
        """
        stamp = tuple((id(t), t._version) for t in self.model.state_dict().values())
        if getattr(self, "_identity_stamp", None) != stamp:
            self._identity = state_dict_hash(self.model)
            self._identity_stamp = stamp
        return self._identity

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(images.to(self.device, dtype)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device)).float().cpu()


def open_encoder(source: str, *, arch: str | None = None, device: str = "cpu") -> Encoder:
    """An encoder for a model path or name; ``.onnx`` files run in ONNX Runtime."""
    if source.endswith(".onnx"):
        return OnnxEncoder(source, device=device)
    return TorchEncoder(load(source, arch=arch, device=device), device=device)


class OnnxEncoder:
    """Image and text ONNX encoders (CPU provider unless ``device`` is cuda).

    ``fallback``: an encoder for a tower that was not exported (a vision-only deployment compared
    with its patched PyTorch text tower); without one, both files must exist.
    """

    def __init__(self, path: str, device: str = "cpu", fallback: Encoder | None = None):
        self.name = path
        self.files = resolve_pair(path)
        missing = {"vision", "text"} - set(self.files)
        if missing and fallback is None:
            raise SurgeryError(f"{path}: the {missing.pop()} encoder is missing; export with --tower both")
        self.fallback = fallback if missing else None
        self.preprocess = (json.loads(read_metadata(self.files["vision"])[META_PREPROCESS]) if "vision" in self.files
                           else fallback.preprocess)
        self.tokenizer = (json.loads(read_metadata(self.files["text"])[META_TOKENIZER]) if "text" in self.files
                          else fallback.tokenizer)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        self.sessions = {}
        for tower, file in self.files.items():
            # ORT 1.32's CPU graph optimizer crashes on the fp16 graphs; fp32 and int8 files are optimised
            optimize = read_metadata(file).get(META_PRECISION, "fp32") != "fp16"
            self.sessions[tower] = ort_session(file, providers, optimize=optimize)
        self.normalized = read_metadata(next(iter(self.files.values()))).get(META_NORMALIZED) == "true"

    @property
    def identity(self) -> str:
        parts = [sha256_file(self.files[t]) if t in self.files else self.fallback.identity for t in ("vision", "text")]
        return hashlib.sha256("".join(parts).encode()).hexdigest()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if "vision" not in self.sessions:
            return self.fallback.encode_images(images)
        session = self.sessions["vision"]
        out = session.run(None, {session.get_inputs()[0].name: images.float().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        if "text" not in self.sessions:
            return self.fallback.encode_texts(tokens)
        session = self.sessions["text"]
        out = session.run(None, {session.get_inputs()[0].name: tokens.long().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
