"""An NVIDIA Triton Inference Server model repository for an exported pair: the path for fleets
(many replicas, GPUs, Triton's own batching, metrics and model management).

    <repo>/clip_visual/config.pbtxt    <repo>/clip_visual/1/model.onnx
    <repo>/clip_text/config.pbtxt      <repo>/clip_text/1/model.onnx

``onnxruntime_onnx`` backend, ``dynamic_batching`` (preferred batch sizes up to ``max_batch``,
queue delay ``max_wait_ms``), and the files' ``clipsurgery.*`` metadata as a model parameter.
Clients send preprocessed pixels / token ids: the preprocessing and tokenizer are in that
parameter (and in ``GET /v1/model`` of ``clipsurgery serve``). Each model folder is built in a
staging folder and renamed into place, so a reader never sees half of one; each carries a marker
file listing what the tool wrote, and ``--force`` replaces only such folders (never a user's
files, never an input).
"""
from __future__ import annotations

import json
import os
import shutil

from surgery.errors import SurgeryError
from surgery.io.fs import check_writable, staging_dir
from surgery.io.onnx import read_metadata, resolve_pair

STAGING_PREFIX = ".clipsurgery-triton-"
MARKER = ".clipsurgery-triton.json"  # in each model folder the tool writes: {"written_by", "source", "files"}
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
    """Write ``repo`` for the pair at ``path`` (OUT.onnx or a tower file); returns the files written.

    A folder that holds files is refused unless ``force``; with ``force`` only the model folders
    this function wrote before (each carries :data:`MARKER` listing its files) are replaced, and
    nothing else in ``repo`` is touched: a model folder the tool did not write, files a user added
    to one, or an input file inside one are refused with one line."""
    if max_batch < 1:
        raise SurgeryError(f"max batch must be >= 1, got {max_batch}")
    if os.path.isdir(path):
        raise SurgeryError(f"{path} is a folder; give the exported OUT.onnx (or one of its .visual.onnx / .text.onnx "
                           "files)")
    files = resolve_pair(path)
    repo = os.path.abspath(repo)
    if os.path.exists(repo) and not os.path.isdir(repo):
        raise SurgeryError(f"{repo} is a file; give a folder for the Triton repository")
    if os.path.isdir(repo) and os.listdir(repo) and not force:
        raise SurgeryError(f"{repo} already holds files; pass --force to replace the model folders clipsurgery wrote "
                           "there (nothing else is touched), or choose another folder")
    parent = os.path.dirname(repo)
    if not os.path.isdir(parent):
        raise SurgeryError(f"folder {parent} does not exist; create it first")
    check_writable(repo if os.path.isdir(repo) else parent)
    targets = {tower: os.path.join(repo, MODEL_NAMES[tower]) for tower in files}
    inputs = [f for file in files.values() for f in (file, file + ".data") if os.path.exists(f)]
    for folder in targets.values():
        if os.path.lexists(folder):
            _check_replaceable(folder, inputs)
    work = staging_dir(STAGING_PREFIX, repo if os.path.isdir(repo) else parent)
    try:
        written = _stage(files, work, repo, max_batch, max_wait_ms)
        if not os.path.isdir(repo):
            os.replace(work, repo)  # a new repository appears whole
        else:
            for tower, folder in targets.items():
                staged = os.path.join(work, MODEL_NAMES[tower])
                if os.path.lexists(folder):
                    os.replace(folder, os.path.join(work, f"old-{MODEL_NAMES[tower]}"))
                os.replace(staged, folder)
    except OSError as exc:
        raise SurgeryError(f"cannot write the Triton repository {repo} ({exc.strerror or exc}); the model folders "
                           "already there are unchanged") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written


def _stage(files: dict[str, str], work: str, repo: str, max_batch: int, max_wait_ms: float) -> list[str]:
    """Write each tower's model folder under ``work``; the paths they will have under ``repo``."""
    written = []
    for tower, file in files.items():
        model_dir = os.path.join(work, MODEL_NAMES[tower])
        folder = os.path.join(model_dir, "1")
        os.makedirs(folder)
        own = ["1/model.onnx", "config.pbtxt"]
        shutil.copyfile(file, os.path.join(folder, "model.onnx"))
        if os.path.exists(file + ".data"):  # external weights keep the name the graph refers to
            shutil.copyfile(file + ".data", os.path.join(folder, os.path.basename(file) + ".data"))
            own.append(f"1/{os.path.basename(file)}.data")
        with open(os.path.join(model_dir, "config.pbtxt"), "w", encoding="utf-8") as fh:
            fh.write(triton_config(file, tower, max_batch, max_wait_ms))
        with open(os.path.join(model_dir, MARKER), "w", encoding="utf-8") as fh:
            json.dump({"written_by": "clipsurgery", "source": os.path.abspath(file), "files": own}, fh)
        written += [os.path.join(repo, MODEL_NAMES[tower], name) for name in own[:2]]
    return written


def _check_replaceable(folder: str, inputs: list[str]) -> None:
    """Refuse to replace ``folder`` unless clipsurgery wrote it and it holds only what it wrote,
    and no input file lies inside it."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise SurgeryError(f"{folder} is not a model folder clipsurgery wrote (it is a file or a link); --force only "
                           "replaces the tool's own model folders: move it away or choose another --triton-repo")
    for file in inputs:
        real = os.path.realpath(file)
        if real == os.path.realpath(folder) or real.startswith(os.path.realpath(folder) + os.sep):
            raise SurgeryError(f"{file} (an input) lies in {folder}, which --force would replace; serve a copy from "
                               "elsewhere or choose another --triton-repo")
    marker = os.path.join(folder, MARKER)
    try:
        with open(marker, encoding="utf-8") as fh:
            record = json.load(fh)
        own = set(record["files"]) if record.get("written_by") == "clipsurgery" else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        own = None
    if own is None:
        raise SurgeryError(f"{folder} was not written by clipsurgery (no valid {MARKER}); --force only replaces the "
                           "tool's own model folders: move it away or choose another --triton-repo")
    found = set()
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    extra = sorted(found - own - {MARKER})
    if extra:
        raise SurgeryError(f"{folder} holds files clipsurgery did not write ({', '.join(extra[:3])}"
                           f"{' ...' if len(extra) > 3 else ''}); --force would remove them: move them away first")
