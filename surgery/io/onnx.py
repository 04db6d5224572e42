"""Reading exported ONNX files: ONNX Runtime sessions, the tower pair's file names, their metadata.
"""
from __future__ import annotations

import os

from surgery.errors import SurgeryError
from surgery.io.metadata import META_TOWER


def onnx_paths(out: str, tower: str) -> dict[str, str]:
    """Where each tower goes: OUT itself for one tower, <stem>.visual/.text.onnx for both."""
    if tower != "both":
        return {tower: out}
    stem = out[:-len(".onnx")] if out.endswith(".onnx") else out
    return {"vision": f"{stem}.visual.onnx", "text": f"{stem}.text.onnx"}


def ort_session(path: str, providers: list[str] | None = None, optimize: bool = True, threads: int | None = None,
                spinning: bool = True, memory_pattern: bool = True, arena: bool = True):
    """An ONNX Runtime session (CPU provider unless ``providers``); ``optimize=False`` turns graph optimisations off;
    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core); ``spinning=False``: idle worker
    threads sleep instead of spinning (for processes that do other work between calls, e.g. a server);
    ``memory_pattern=False``: no memory plan cached per input shape (a server sees every batch size: the
    cached plans would grow its memory with each new size); ``arena=False``: tensors are allocated and freed
    with the system allocator instead of ONNX Runtime's CPU arena, which keeps what it grew to."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SurgeryError("onnxruntime is not installed; pip install 'clipsurgery[cpu]' (or [gpu])") from None
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not arena:
        options.enable_cpu_mem_arena = False
    if not memory_pattern:
        options.enable_mem_pattern = False
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])


def read_metadata(path: str) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file; a file that does not parse is one SurgeryError line."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SurgeryError(f"{path} is not a readable ONNX file ({reason}); it is truncated or was not exported "
                           "by clipsurgery: export it again") from None
    return {p.key: p.value for p in model.metadata_props}


def _check_tower(path: str, tower: str) -> None:
    found = read_metadata(path).get(META_TOWER)
    if found != tower:
        detail = f"no {META_TOWER} metadata" if found is None else f"it holds the {found} tower, not the {tower} one"
        raise SurgeryError(f"{path} was not exported by clipsurgery as the {tower} encoder ({detail}); "
                           "export the pair again")


def resolve_pair(path: str) -> dict[str, str]:
    """{tower: file} for OUT.onnx (one tower, plus a sibling for the other) or the <stem>.visual/.text pair."""
    if os.path.isfile(path):
        tower = read_metadata(path).get(META_TOWER)
        if tower not in ("vision", "text"):
            raise SurgeryError(f"{path} was not exported by clipsurgery (no {META_TOWER} metadata)")
        stem = path[:-len(".onnx")]
        for suffix in (".visual", ".text"):
            if stem.endswith(suffix):
                stem = stem[:-len(suffix)]
        pair = onnx_paths(stem + ".onnx", "both")
        pair[tower] = path
        pair = {t: p for t, p in pair.items() if os.path.isfile(p)}
    else:
        pair = {t: p for t, p in onnx_paths(path, "both").items() if os.path.isfile(p)}
        if not pair:
            raise SurgeryError(f"{path}: no such ONNX file (nor {path[:-5]}.visual.onnx / .text.onnx)")
    for tower, file in pair.items():  # every file of the pair: a broken sibling is refused here, not mid-run
        _check_tower(file, tower)
    return pair
