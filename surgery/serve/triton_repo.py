"""An NVIDIA Triton Inference Server model repository for an exported pair: the path for fleets
(many replicas, GPUs, Triton's own batching, metrics and model management).

    <repo>/clip_visual/config.pbtxt    <repo>/clip_visual/1/model.onnx
    <repo>/clip_text/config.pbtxt      <repo>/clip_text/1/model.onnx

``onnxruntime_onnx`` backend, ``dynamic_batching`` (preferred batch sizes up to ``max_batch``,
queue delay ``max_wait_ms``), and the files' ``clipsurgery.*`` metadata as a model parameter.
Clients send preprocessed pixels / token ids: the preprocessing and tokenizer are in that
parameter (and in ``GET /v1/model`` of ``clipsurgery serve``). The repository is built in a staging
folder and renamed into place, so a reader never sees half of it.
"""
from __future__ import annotations

import json
import os
import shutil

from surgery.errors import SurgeryError
from surgery.io.fs import staging_dir
from surgery.io.onnx import read_metadata, resolve_pair

STAGING_PREFIX = "clipsurgery-triton-"
MODEL_NAMES = {"vision": "clip_visual", "text": "clip_text"}


def triton_config(path: str, tower: str, max_batch: int = 64, max_wait_ms: float = 5.0) -> str:
    """config.pbtxt for one tower file."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    inp, out = model.graph.input[0], model.graph.output[0]
    in_dims = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    out_dims = [d.dim_value for d in out.type.tensor_type.shape.dim][1:]
    in_type = "TYPE_FP32" if tower == "vision" else "TYPE_INT64"
    preferred = [b for b in (4, 8, 16, 32, 64, 128) if b <= max_batch] or [max_batch]
    metadata = json.dumps(json.dumps(read_metadata(path)))
    return (
        f'name: "{MODEL_NAMES[tower]}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
        f'input [\n  {{ name: "{inp.name}", data_type: {in_type}, dims: {in_dims} }}\n]\n'
        f'output [\n  {{ name: "{out.name}", data_type: TYPE_FP32, dims: {out_dims} }}\n]\n'
        f"dynamic_batching {{\n  preferred_batch_size: {preferred}\n"
        f"  max_queue_delay_microseconds: {int(round(max_wait_ms * 1000))}\n}}\n"
        f'parameters {{ key: "clipsurgery.metadata", value: {{ string_value: {metadata} }} }}\n'
    )


def write_triton_repository(path: str, repo: str, max_batch: int = 64, max_wait_ms: float = 5.0,
                            force: bool = False) -> list[str]:
    """Write ``repo`` for the pair at ``path`` (OUT.onnx or a tower file); returns the files written."""
    if max_batch < 1:
        raise SurgeryError(f"max batch must be >= 1, got {max_batch}")
    files = resolve_pair(path)
    repo = os.path.abspath(repo)
    if os.path.exists(repo) and not os.path.isdir(repo):
        raise SurgeryError(f"{repo} is a file; give a folder for the Triton repository")
    if os.path.isdir(repo) and os.listdir(repo) and not force:
        raise SurgeryError(f"{repo} already holds files; pass --force to replace it, or choose another folder")
    parent = os.path.dirname(repo)
    if not os.path.isdir(parent):
        raise SurgeryError(f"folder {parent} does not exist; create it first")
    work = staging_dir(STAGING_PREFIX, parent)
    try:
        written = []
        for tower, file in files.items():
            folder = os.path.join(work, MODEL_NAMES[tower], "1")
            os.makedirs(folder)
            shutil.copyfile(file, os.path.join(folder, "model.onnx"))
            if os.path.exists(file + ".data"):  # external weights keep the name the graph refers to
                shutil.copyfile(file + ".data", os.path.join(folder, os.path.basename(file) + ".data"))
            with open(os.path.join(work, MODEL_NAMES[tower], "config.pbtxt"), "w", encoding="utf-8") as fh:
                fh.write(triton_config(file, tower, max_batch, max_wait_ms))
            written += [os.path.join(repo, MODEL_NAMES[tower], "1", "model.onnx"),
                        os.path.join(repo, MODEL_NAMES[tower], "config.pbtxt")]
        if os.path.isdir(repo):
            old = repo + f".old-{os.getpid()}"
            os.replace(repo, old)
            os.replace(work, repo)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, repo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written
