"""The exported pair as the server runs it: ONNX Runtime sessions, and the preprocessing and
tokenizer read from the files' own metadata (nothing else about the model is needed).

Opening a pair checks everything a request would otherwise trip over, so a server starts or
fails in one line (:class:`SurgeryError`), never half-starts: the two files must be one model's
pair (same source, config, plan, preprocessing and tokenizer), the metadata must be JSON, the
preprocessing must produce the image tower's input shape, the tokenizer must be one the tool
ships with the text tower's context length, and ONNX Runtime must accept both graphs.
:meth:`EncoderPair.warm_up` then runs one call per tower.
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
    META_MODEL_CONFIG,
    META_NORMALIZED,
    META_PLAN,
    META_PRECISION,
    META_PREPROCESS,
    META_QUANTIZATION,
    META_SOURCE,
    META_TOKENIZER,
)
from surgery.io.onnx import ort_session, read_metadata, resolve_pair
from surgery.model.preprocess import image_transform
from surgery.serve.tokenizer import ServeTokenizer, check_tokenizer

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
#: what both files of a pair must agree on (JSON values compared parsed), with the words for a refusal
PAIR_KEYS = {META_SOURCE: "source sha256", META_ARCH: "architecture", META_MODEL_CONFIG: "model config",
             META_PLAN: "surgery plan", META_PREPROCESS: "preprocessing", META_TOKENIZER: "tokenizer",
             META_NORMALIZED: "normalisation"}
MAX_IMAGE_SIDE = 4096  # a preprocess size above this in a file's metadata is refused (CLIPs use 224-448)


class EncoderPair:
    """``OUT.onnx`` (or one of its tower files) opened for serving: ``embed(tower, rows)``."""

    def __init__(self, path: str, provider: str = "cpu", threads: int | None = None, spinning: bool = True):
        if provider not in PROVIDERS:
            raise SurgeryError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if os.path.isdir(path):
            raise SurgeryError(f"{path} is a folder; give the exported OUT.onnx (or one of its .visual.onnx / "
                               ".text.onnx files)")
        self.path = path
        self.files = resolve_pair(path)
        self.metadata = {tower: read_metadata(file) for tower, file in self.files.items()}
        check_same_model(self.files, self.metadata)
        if provider == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise SurgeryError("--provider cuda: this ONNX Runtime has no CUDA provider; pip install "
                                   "'clipsurgery[gpu]' (onnxruntime-gpu) or serve with --provider cpu")
        self.sessions = {}
        for tower, file in self.files.items():
            # ORT 1.32's CPU graph optimizer crashes on the fp16 graphs; fp32 and int8 files are optimised
            optimize = self.metadata[tower].get(META_PRECISION, "fp32") != "fp16"
            try:
                self.sessions[tower] = ort_session(file, PROVIDERS[provider], optimize=optimize, threads=threads,
                                                   spinning=spinning, memory_pattern=False, arena=False)
            except SurgeryError:
                raise
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own classes for a graph it rejects
                raise SurgeryError(f"{file}: ONNX Runtime cannot load this graph ({_first_line(exc)}); export the "
                                   "pair again") from None
        self.input_names = {t: s.get_inputs()[0].name for t, s in self.sessions.items()}
        self._per_row = {t: self.per_row(t) for t in self.sessions}  # dynamic int8: one row per call
        self.preprocess = self._check_preprocess() if "vision" in self.files else None
        self.tokenizer = self._check_tokenizer() if "text" in self.files else None
        self._transform = image_transform(self.preprocess) if self.preprocess else None
        self._tokenize = ServeTokenizer(self.tokenizer["context_length"]) if self.tokenizer else None
        self._check_outputs()
        stem = os.path.basename(path)
        self.name = stem[:-len(".onnx")] if stem.endswith(".onnx") else stem

    # ----------------------------------------------------------------------------- start-up checks
    def _input_dims(self, tower: str) -> list:
        return list(self.sessions[tower].get_inputs()[0].shape)[1:]

    def _check_preprocess(self) -> dict:
        file = self.files["vision"]
        pre = json_metadata(self.metadata["vision"], META_PREPROCESS, file)
        size = pre.get("size") if isinstance(pre, dict) else None
        sides = [size, size] if isinstance(size, int) else size
        if (not isinstance(sides, list) or len(sides) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_IMAGE_SIDE for s in sides)):
            raise SurgeryError(f"{file}: preprocess size {size!r} is not a side (or [height, width]) in 1-"
                               f"{MAX_IMAGE_SIDE}; export the pair again")
        want = self._input_dims("vision")  # [3, H, W] (ints, or names where the graph left them free)
        fixed = [d for d in want[1:] if isinstance(d, int)]
        if len(want) != 3 or (len(fixed) == 2 and fixed != sides):
            raise SurgeryError(f"{file}: the metadata's preprocess size {size} does not match the graph's input "
                               f"{want}; the metadata was changed: export the pair again")
        try:
            shape = tuple(image_transform(pre)(Image.new("RGB", (37, 23))).shape)
        except Exception as exc:  # noqa: BLE001 - open_clip's transform rejects bad values with assorted errors
            raise SurgeryError(f"{file}: the preprocess metadata cannot build a transform ({_first_line(exc)}); "
                               "export the pair again") from None
        if shape != (3, *sides):
            raise SurgeryError(f"{file}: the preprocess metadata makes {list(shape)} inputs, the graph takes "
                               f"[3, {sides[0]}, {sides[1]}]; export the pair again")
        return pre

    def _check_tokenizer(self) -> dict:
        file = self.files["text"]
        info = json_metadata(self.metadata["text"], META_TOKENIZER, file)
        _, ctx = check_tokenizer(info, file)
        dims = self._input_dims("text")
        if len(dims) != 1 or (isinstance(dims[0], int) and dims[0] != ctx):
            raise SurgeryError(f"{file}: the metadata's context length {ctx} does not match the graph's input {dims}; "
                               "the metadata was changed: export the pair again")
        return info

    def _check_outputs(self) -> None:
        dims = {t: s.get_outputs()[0].shape[-1] for t, s in self.sessions.items()}
        fixed = {t: d for t, d in dims.items() if isinstance(d, int)}
        if len(set(fixed.values())) > 1:
            sizes = ", ".join(f"{t} {d}" for t, d in fixed.items())
            raise SurgeryError(f"the pair's towers embed to different sizes ({sizes}); serve the two files of one export")

    # ------------------------------------------------------------------------------------ serving
    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(self.files)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> ``(3, H, W)`` float32, open_clip's eval transform from the file's metadata."""
        return self._transform(image).numpy().astype(np.float32, copy=False)

    def tokens(self, texts: list[str]) -> np.ndarray:
        """Texts -> ``(n, ctx)`` int64 token ids with the file's tokenizer (bounded work and memory)."""
        return self._tokenize(list(texts))

    def per_row(self, tower: str) -> bool:
        """Whether ``tower`` runs one row per call: a dynamic-int8 file computes its activation scales
        per call, so a row's embedding would depend on the other requests batched with it (issue 29);
        one row at a time it is what the quantization gate measured at batch 1, whoever else is served."""
        try:
            quantization = json.loads(self.metadata[tower].get(META_QUANTIZATION) or "{}")
        except ValueError:
            return False
        return isinstance(quantization, dict) and quantization.get("calibration") == "dynamic"

    def embed(self, tower: str, rows: np.ndarray) -> np.ndarray:
        """``(B, 3, H, W)`` float32 pixels or ``(B, ctx)`` int64 ids -> ``(B, D)`` float32 embeddings."""
        session, name = self.sessions[tower], self.input_names[tower]
        if self._per_row.get(tower):
            out = np.concatenate([session.run(None, {name: rows[i:i + 1]})[0] for i in range(len(rows))])
        else:
            out = session.run(None, {name: rows})[0]
        return np.asarray(out, dtype=np.float32)

    def warm_up(self) -> None:
        """One call per tower, so the first request does not pay for ONNX Runtime's lazy set-up; a
        graph that fails on a real input is one SurgeryError line here, before the server listens."""
        for tower in self.sessions:
            try:
                if tower == "vision":
                    out = self.embed("vision", self.pixels(Image.new("RGB", (64, 48), (127, 127, 127)))[None])
                else:
                    out = self.embed("text", self.tokens(["a photo"]))
            except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime raises for this graph
                raise SurgeryError(f"{self.files[tower]}: the {tower} tower fails on a test input "
                                   f"({_first_line(exc)}); export the pair again") from None
            if out.ndim != 2 or out.shape[0] != 1 or not np.isfinite(out).all():
                raise SurgeryError(f"{self.files[tower]}: the {tower} tower answers a test input with shape "
                                   f"{list(out.shape)} or non-finite values; export the pair again")

    def describe(self) -> dict:
        """What ``GET /v1/model`` answers: the towers, the plan, provenance and preprocessing."""
        first = next(iter(self.metadata.values()))

        def js(value):
            try:
                return json.loads(value) if value is not None else None
            except (json.JSONDecodeError, RecursionError):
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


def json_metadata(meta: dict[str, str], key: str, file: str):
    """The JSON value of ``key`` in a file's metadata, or one SurgeryError line."""
    if key not in meta:
        raise SurgeryError(f"{file} has no {key} metadata; export the pair again")
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError):
        raise SurgeryError(f"{file}: metadata {key} is not JSON; the file was changed: export the pair again") from None


def check_same_model(files: dict[str, str], metadata: dict[str, dict[str, str]]) -> None:
    """Refuse a vision file and a text file that are not one export of one model."""
    if len(files) < 2:
        return
    (t1, m1), (t2, m2) = metadata.items()
    for key, what in PAIR_KEYS.items():
        a, b = m1.get(key), m2.get(key)
        if a == b:
            continue
        try:
            if a is not None and b is not None and json.loads(a) == json.loads(b):
                continue  # the same JSON written with other spacing or key order
        except (json.JSONDecodeError, RecursionError):
            pass
        raise SurgeryError(f"{files[t1]} and {files[t2]} are not one model's pair (their {what} differs); serve the "
                           "two files of one export")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
