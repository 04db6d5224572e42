"""The exported pair as the server runs it: ONNX Runtime sessions, and the preprocessing and
tokenizer read from the files' own metadata (nothing else about the model is needed).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from surgery.errors import SurgeryError
from surgery.io.metadata import (
    META_ARCH,
    META_GATE,
    META_GRAPH,
    META_NORMALIZED,
    META_PLAN,
    META_PRECISION,
    META_PREPROCESS,
    META_QUANTIZATION,
    META_SOURCE,
    META_TOKENIZER,
)
from surgery.io.onnx import ort_session, read_metadata, resolve_pair
from surgery.model.preprocess import image_transform, tokenize

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class EncoderPair:
    """``OUT.onnx`` (or one of its tower files) opened for serving: ``embed(tower, rows)``."""

    def __init__(self, path: str, provider: str = "cpu", threads: int | None = None, spinning: bool = True):
        if provider not in PROVIDERS:
            raise SurgeryError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        self.path = path
        self.files = resolve_pair(path)
        self.metadata = {tower: read_metadata(file) for tower, file in self.files.items()}
        if provider == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise SurgeryError("--provider cuda: this ONNX Runtime has no CUDA provider; pip install "
                                   "'clipsurgery[gpu]' (onnxruntime-gpu) or serve with --provider cpu")
        self.sessions = {}
        for tower, file in self.files.items():
            # ORT 1.32's CPU graph optimizer crashes on the fp16 graphs; fp32 and int8 files are optimised
            optimize = self.metadata[tower].get(META_PRECISION, "fp32") != "fp16"
            self.sessions[tower] = ort_session(file, PROVIDERS[provider], optimize=optimize, threads=threads,
                                               spinning=spinning, memory_pattern=False, arena=False)
        self.input_names = {t: s.get_inputs()[0].name for t, s in self.sessions.items()}
        self.preprocess = json.loads(self.metadata["vision"][META_PREPROCESS]) if "vision" in self.files else None
        self.tokenizer = json.loads(self.metadata["text"][META_TOKENIZER]) if "text" in self.files else None
        self._transform = image_transform(self.preprocess) if self.preprocess else None
        stem = os.path.basename(path)
        self.name = stem[:-len(".onnx")] if stem.endswith(".onnx") else stem

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(self.files)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> ``(3, H, W)`` float32, open_clip's eval transform from the file's metadata."""
        return self._transform(image).numpy().astype(np.float32, copy=False)

    def tokens(self, texts: list[str]) -> np.ndarray:
        """Texts -> ``(n, ctx)`` int64 token ids with the file's tokenizer."""
        return tokenize(list(texts), self.tokenizer).numpy().astype(np.int64, copy=False)

    def embed(self, tower: str, rows: np.ndarray) -> np.ndarray:
        """``(B, 3, H, W)`` float32 pixels or ``(B, ctx)`` int64 ids -> ``(B, D)`` float32 embeddings."""
        out = self.sessions[tower].run(None, {self.input_names[tower]: rows})[0]
        return np.asarray(out, dtype=np.float32)

    def warm_up(self) -> None:
        """One call per tower, so the first request does not pay for ONNX Runtime's lazy set-up."""
        if "vision" in self.sessions:
            size = self.preprocess["size"]
            h, w = (size, size) if isinstance(size, int) else size
            self.embed("vision", np.zeros((1, 3, h, w), dtype=np.float32))
        if "text" in self.sessions:
            self.embed("text", self.tokens(["a photo"]))

    def describe(self) -> dict:
        """What ``GET /v1/model`` answers: the towers, the plan, provenance and preprocessing."""
        first = next(iter(self.metadata.values()))

        def js(value):
            try:
                return json.loads(value) if value is not None else None
            except json.JSONDecodeError:
                return value

        towers = {}
        for tower, session in self.sessions.items():
            inp, out = session.get_inputs()[0], session.get_outputs()[0]
            meta = self.metadata[tower]
            towers[tower] = {"file": self.files[tower], "input": {"name": inp.name, "shape": inp.shape},
                             "output": {"name": out.name, "shape": out.shape},
                             "precision": meta.get(META_PRECISION, "fp32"), "graph": meta.get(META_GRAPH),
                             "normalized": meta.get(META_NORMALIZED) == "true",
                             "quantization": js(meta.get(META_QUANTIZATION)), "gate": js(meta.get(META_GATE)),
                             "providers": session.get_providers()}
        return {"id": self.name, "object": "model", "towers": towers, "plan": js(first.get(META_PLAN)),
                "provenance": {"arch": first.get(META_ARCH), "source_sha256": first.get(META_SOURCE) or None},
                "preprocess": self.preprocess, "tokenizer": self.tokenizer}
