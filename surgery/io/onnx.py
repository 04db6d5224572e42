"""Reading exported ONNX files: ONNX Runtime sessions, the tower pair's file names, their metadata.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from surgery.errors import SurgeryError
from surgery.io.metadata import META_TOWER

#: ``--provider`` names -> ONNX Runtime execution providers
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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


def provider_session(path: str, provider: str = "cpu", *, optimize: bool = True, profile_dir: str | None = None):
    """A session on one execution provider (``cpu`` | ``cuda``), refusing a silent fall-back.

    ``cuda`` needs onnxruntime-gpu (``pip install 'clipsurgery[gpu]'``) and a CUDA device; without
    them this is one SurgeryError line, never a session that quietly runs on the CPU. CUDA sessions
    list the CPU provider second, for the nodes the CUDA provider does not implement (see
    :func:`node_placement`). ``profile_dir``: write ONNX Runtime's profile (per-node provider) there.
    """
    if provider not in PROVIDERS:
        raise SurgeryError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise SurgeryError("onnxruntime is not installed; pip install 'clipsurgery[cpu]' (or [gpu])") from None
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise SurgeryError(f"provider {provider}: this onnxruntime ({ort.__version__}) has no {wanted} (it has "
                           f"{', '.join(available)}); install onnxruntime-gpu instead: pip install 'clipsurgery[gpu]'")
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "ort_profile")
    providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    session = ort.InferenceSession(path, options, providers=providers)
    if wanted not in session.get_providers():  # the provider failed to load (e.g. CUDA libraries missing)
        raise SurgeryError(f"provider {provider}: onnxruntime could not start {wanted} for {path} (session runs on "
                           f"{', '.join(session.get_providers())}); check the CUDA and cuDNN libraries it needs")
    return session


@dataclass
class NodePlacement:
    """Which execution provider ran each node of one inference (from ONNX Runtime's profile)."""

    provider: str  # the provider asked for, e.g. CUDAExecutionProvider
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # node name -> (op type, provider that ran it)

    def elsewhere(self) -> list[tuple[str, str, str]]:
        """(node, op type, provider) of every node that ran on another provider than the one asked for."""
        return [(name, op, where) for name, (op, where) in self.nodes.items() if where != self.provider]

    def summary(self) -> str:
        """One line: nodes per provider, and the op types that fell back (if any)."""
        per = Counter(where for _op, where in self.nodes.values())
        text = ", ".join(f"{where} {count} nodes" for where, count in per.most_common())
        away = Counter(op for _name, op, _where in self.elsewhere())
        if away:
            text += "; not on " + self.provider + ": " + ", ".join(f"{op} x{n}" for op, n in sorted(away.items()))
        return text


def node_placement(path: str, provider: str = "cpu", feeds: dict | None = None, *,
                   optimize: bool = True) -> NodePlacement:
    """Run ``path`` once on ``provider`` with profiling on and report where every node ran.

    ``feeds``: input name -> numpy array (default: zeros, dynamic dims set to 1, for every input).
    Raises SurgeryError as :func:`provider_session` does.
    """
    with tempfile.TemporaryDirectory(prefix="clipsurgery-ort-") as tmp:
        session = provider_session(path, provider, optimize=optimize, profile_dir=tmp)
        session.run(None, feeds if feeds is not None else default_feeds(session))
        trace = session.end_profiling()
        with open(trace, encoding="utf-8") as fh:
            events = json.load(fh)
    placement = NodePlacement(PROVIDERS[provider])
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args and event.get("name", "").endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            placement.nodes[name] = (args.get("op_name", "?"), args["provider"])
    return placement


def default_feeds(session) -> dict:
    """Zeros for every input of ``session`` (dynamic dims set to 1), in the input's element type."""
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        if inp.type not in types:
            raise SurgeryError(f"input {inp.name} has type {inp.type}; pass feeds for it")
        feeds[inp.name] = np.zeros(shape, dtype=types[inp.type])
    return feeds


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
