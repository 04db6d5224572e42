"""Export a (patched) CLIP: safetensors for PyTorch/open_clip, ONNX for serving.

* safetensors: the whole model (both towers) with the open_clip config, the plan, preprocessing
  and tokenizer in the metadata; ``surgery.load(out)`` restores it exactly, and a model with head
  edits only has the plain open_clip state dict (``open_clip.create_model(arch, pretrained=out)``).
* ONNX: one file per tower. ``--tower vision`` or ``text`` writes OUT as given; ``both`` writes
  ``<stem>.visual.onnx`` and ``<stem>.text.onnx``. Inputs ``pixel_values`` (B, 3, H, W) float32
  and ``input_ids`` (B, ctx) int64, dynamic batch; output ``embeddings`` (B, D) float32
  (L2-normalised unless ``normalize=False``); fp16 files compute in fp16 but take and return fp32
  (converted from the fp32 graph with ONNX Runtime's float16 tool). ONNX Runtime 1.32's CPU graph
  optimizer segfaults on these fp16 graphs: on the CPU, open them with graph optimizations off.
  Every file carries ``clipsurgery.*`` metadata_props: plan, preprocessing, tokenizer, config,
  and ``clipsurgery.graph`` (``ort`` or ``plain``, below).
* Graph kinds (``OnnxOptions.graph``). ``plain``: standard ONNX ops only (opset >= 17), what
  ``torch.onnx.export`` emits; runs on any ONNX runtime. ``ort``: each transformer block is exported
  as ONNX Runtime's com.microsoft contrib ops (``Attention`` with ``unidirectional`` for the causal
  text tower, ``SkipLayerNormalization`` for residual add + LayerNorm, also across blocks,
  ``BiasGelu`` / ``FastGelu`` / ``QuickGelu``), the fusions ORT's transformer optimizer would find
  on an HF-layout graph and finds none of on open_clip's; and the vision tower's last block runs
  only the class token's query and MLP (``MultiHeadAttention``; keys and values from every token)
  since the class token is all the tower pools. ONNX Runtime (CPU and CUDA providers) only; fp32,
  opset < 23. ``auto`` (default): ``ort`` for fp32 below opset 23, falling back to ``plain`` for a
  tower whose blocks it cannot express (logged) or whose fused file misses the parity bound.
* Parity gate: before a file is moved into place, ONNX Runtime runs it on random inputs and on
  any probe inputs given and must match PyTorch (fp32: max abs error <= 1e-4 on normalised
  embeddings; fp16: <= 2e-2); otherwise nothing is written and :class:`ExportParityError` says by
  how much it missed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surgery.edit.plan import SurgeryPlan
from surgery.errors import ExportParityError, SurgeryError
from surgery.export.inputs import check_finite_outputs, example_inputs, gate_inputs
from surgery.export.ort_fused import (
    ORT_CONTRIB_DOMAIN,
    UnfusableBlockError,
    fuse_blocks_,
    fuse_residual_norms,
)
from surgery.export.safetensors import model_metadata
from surgery.io.fs import check_output_path, staging_dir
from surgery.io.metadata import META_GRAPH, META_NORMALIZED, META_PRECISION, META_TOWER
from surgery.io.onnx import onnx_paths, ort_session
from surgery.model.attention import swap_attention
from surgery.model.loading import LoadedModel

log = logging.getLogger(__name__)
TOWER_CHOICES = ("vision", "text", "both")
GRAPH_CHOICES = ("auto", "ort", "plain")
STAGING_PREFIX = "clipsurgery-onnx-"  # staging folders beside the output, removed when done (or by the next run)
PARITY_BOUND = {"fp32": 1e-4, "fp16": 2e-2}
_TWO_GB = 2 * 1024**3


@dataclass
class OnnxOptions:
    tower: str = "both"  # "vision" | "text" | "both"
    precision: str = "fp32"  # "fp32" | "fp16"
    normalize: bool = True  # L2-normalise the output embeddings inside the graph
    opset: int = 17  # ONNX opset (>= 17)
    force: bool = False  # replace existing outputs
    inputs: tuple = ()  # other files and folders the run read (a plan, its SAE, probe data): never overwritten
    # "ort": transformer blocks as ONNX Runtime contrib ops (com.microsoft Attention,
    # SkipLayerNormalization, BiasGelu; runs on ONNX Runtime only, fp32, opset < 23);
    # "plain": standard ONNX ops only (any runtime); "auto": "ort" where it applies, else "plain"
    graph: str = "auto"

    def __post_init__(self) -> None:
        if self.tower not in TOWER_CHOICES:
            raise SurgeryError(f"unknown tower {self.tower!r}; choose one of {', '.join(TOWER_CHOICES)}")
        if self.precision not in PARITY_BOUND:
            raise SurgeryError(f"unknown precision {self.precision!r}; choose fp32 or fp16")
        if self.opset < 17:
            raise SurgeryError(f"opset {self.opset} is too old; use 17 or newer")
        if self.graph not in GRAPH_CHOICES:
            raise SurgeryError(f"unknown graph {self.graph!r}; choose one of {', '.join(GRAPH_CHOICES)}")
        if self.graph == "ort" and (self.precision != "fp32" or self.opset >= FUSED_ATTENTION_OPSET):
            raise SurgeryError(f"graph 'ort' needs fp32 and an opset below {FUSED_ATTENTION_OPSET}; "
                               "use graph 'plain' for fp16 or the ONNX Attention op")

    def resolved_graph(self) -> str:
        """The graph kind tried first: "ort" or "plain"."""
        if self.graph != "auto":
            return self.graph
        return "ort" if self.precision == "fp32" and self.opset < FUSED_ATTENTION_OPSET else "plain"


# ------------------------------------------------------------------------------------------ ONNX
class ImageEncoder(nn.Module):
    """pixel_values (B, 3, H, W) float32 -> embeddings (B, D) float32."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.visual = model.visual
        self.normalize = normalize
        object.__setattr__(self, "full_model", model)  # for swapping attention; not a submodule

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.visual.conv1.weight.dtype
        emb = self.visual(pixel_values.to(dtype)).float()
        return F.normalize(emb, dim=-1) if self.normalize else emb


class TextEncoder(nn.Module):
    """input_ids (B, ctx) int64 -> embeddings (B, D) float32."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.encode_text(input_ids).float()
        return F.normalize(emb, dim=-1) if self.normalize else emb


def export_onnx(loaded: LoadedModel, out: str, plan: SurgeryPlan | None = None, options: OnnxOptions | None = None,
                probe_images: torch.Tensor | None = None, probe_tokens: torch.Tensor | None = None) -> dict[str, dict]:
    """Export, verify with ONNX Runtime, then move into place. Returns {tower: {"path", "max_abs_error"}}."""
    opt = options or OnnxOptions()
    paths = onnx_paths(out, opt.tower)
    for path in paths.values():
        check_output_path(path, inputs=(loaded.source, *opt.inputs), force=opt.force)
    check_finite_outputs(loaded, tuple(paths))
    metadata = {k: json.dumps(v) if not isinstance(v, str) else v
                for k, v in model_metadata(loaded, plan).items() if v is not None}
    work = staging_dir(STAGING_PREFIX, os.path.dirname(os.path.abspath(out)))
    results = {}
    try:
        staged = {}
        for tower, path in paths.items():
            tmp = os.path.join(work, Path(path).name)
            inputs = example_inputs(loaded, tower)
            module = _encoder_module(loaded, tower, opt)  # the reference: open_clip's own modules
            probes = [inputs[0], *gate_inputs(loaded, tower)]
            real = probe_images if tower == "vision" else probe_tokens
            if real is not None:
                probes.append(real[:64])
            graph, error = _export_checked(module, inputs, tower, tmp, opt, probes,
                                           {**metadata, META_TOWER: tower, META_NORMALIZED: str(opt.normalize).lower(),
                                            META_PRECISION: opt.precision})
            bound = PARITY_BOUND[opt.precision]
            if not error <= bound:  # also catches NaN
                raise ExportParityError(
                    f"ONNX Runtime differs from PyTorch on the {tower} tower by {error:.3g} (bound {bound:g}); "
                    "nothing was written. Try another --opset, fp32, or --graph plain"
                )
            staged[tower] = tmp
            results[tower] = {"path": path, "max_abs_error": error, "graph": graph}
        for tower, tmp in staged.items():
            _move_onnx(tmp, paths[tower])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _export_checked(module: nn.Module, inputs: tuple, tower: str, tmp: str, opt: OnnxOptions,
                    probes: list[torch.Tensor], metadata: dict[str, str]) -> tuple[str, float]:
    """Export one tower as the ORT-fused or the plain graph and measure its parity error against
    ``module``. Under graph "auto" a tower the fused graph cannot express, or whose fused file
    misses the parity bound, is exported plain instead. Returns (graph kind, error)."""
    graph = opt.resolved_graph()
    if graph == "ort":
        try:
            fused = _fused_copy(module, tower)
            _torch_export(fused, inputs, tower, tmp, opt.opset, contrib=True)
            del fused
            _finish_onnx(tmp, {**metadata, META_GRAPH: "ort"})
            error = parity_error(module, tmp, probes)
        except Exception as exc:  # noqa: BLE001 - under "auto" any failure of the fused path falls back
            if opt.graph == "ort":
                raise SurgeryError(f"cannot build the ORT-fused {tower} graph: {exc}; use graph 'plain'") from None
            level = logging.INFO if isinstance(exc, UnfusableBlockError) else logging.WARNING
            log.log(level, "%s tower exported with plain ONNX ops: %s", tower, exc)
            graph = "plain"
    if graph == "ort":
        if error <= PARITY_BOUND[opt.precision] or opt.graph == "ort":
            return graph, error
        log.warning("ORT-fused %s graph missed the parity bound by %.3g; exporting plain ONNX ops", tower, error)
        graph = "plain"
    _torch_export(module, inputs, tower, tmp, opt.opset)
    _finish_onnx(tmp, {**metadata, META_GRAPH: "plain"}, fp16=opt.precision == "fp16")
    return graph, parity_error(module, tmp, probes, optimize=opt.precision == "fp32")


def _fused_copy(module: nn.Module, tower: str) -> nn.Module:
    """A copy of the encoder whose tower blocks are :class:`FusedBlock` s. Its modules are new, its
    tensors shared with ``module`` (the fused blocks hold their own re-laid-out weights), so the copy
    costs the fused tower's weights, not a whole model."""
    fused = _shared_copy(module)
    fuse_blocks_(_model_of(fused), tower)
    return fused


def _shared_copy(module: nn.Module) -> nn.Module:
    """New module objects over the same tensors: swapping or replacing submodules of the copy
    leaves ``module`` as it was, and no weight is duplicated."""
    return copy.deepcopy(module, {id(t): t for t in (*module.parameters(), *module.buffers())})


def _encoder_module(loaded: LoadedModel, tower: str, opt: OnnxOptions) -> nn.Module:
    """The tower's export wrapper around the model itself when it is an fp32 model in eval mode
    (exporting only reads it), else around an fp32 eval copy (the caller's model is never changed)."""
    model = loaded.model
    if model.training or any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float().eval()
    return (ImageEncoder if tower == "vision" else TextEncoder)(model, opt.normalize).eval()


FUSED_ATTENTION_OPSET = 23


def _torch_export(module: nn.Module, inputs: tuple, tower: str, path: str, opset: int, contrib: bool = False) -> None:
    """opset < 23: TorchScript exporter (plain MatMul/Softmax attention, or with ``contrib`` the
    com.microsoft ops that :class:`FusedBlock` emits). opset >= 23: the dynamo exporter on
    head-maskable attention with the sdpa backend, which emits ONNX ``Attention`` nodes (ONNX
    Runtime 1.32 runs them fused on the CPU; check your provider before relying on it)."""
    name = "pixel_values" if tower == "vision" else "input_ids"
    with _no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")  # tracer chatter about shape checks that are constant here
        if contrib:
            torch.onnx.export(
                module, inputs, path, input_names=[name], output_names=["embeddings"],
                dynamic_axes={name: {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=opset, dynamo=False,
                custom_opsets={ORT_CONTRIB_DOMAIN: 1},
            )
        elif opset >= FUSED_ATTENTION_OPSET:
            module = _shared_copy(module)  # the swap replaces attention modules: never the caller's
            swap_attention(_model_of(module), backend="sdpa")
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(module, inputs, path, input_names=[name], output_names=["embeddings"],
                              dynamic_shapes={name: {0: batch}}, opset_version=opset, dynamo=True,
                              external_data=False)
        else:
            torch.onnx.export(
                module, inputs, path, input_names=[name], output_names=["embeddings"],
                dynamic_axes={name: {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=opset, dynamo=False,
            )


def _model_of(module: nn.Module) -> nn.Module:
    return module.model if isinstance(module, TextEncoder) else module.full_model


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines; the library never prints."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _no_mha_fastpath():
    """open_clip's nn.MultiheadAttention fast path has no ONNX export: use the composite path."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _finish_onnx(path: str, metadata: dict[str, str], fp16: bool = False) -> None:
    import onnx

    model = onnx.load(path, load_external_data=True)
    if metadata.get(META_GRAPH) == "ort":
        fuse_residual_norms(model.graph)
    if fp16:  # weights and compute in fp16, fp32 inputs and outputs
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    big = model.ByteSize() > _TWO_GB if hasattr(model, "ByteSize") else False
    for stale in Path(path).parent.glob(Path(path).name + ".data"):
        stale.unlink()
    onnx.save_model(model, path, save_as_external_data=big, all_tensors_to_one_file=True,
                    location=Path(path).name + ".data" if big else None)


def _move_onnx(tmp: str, dest: str) -> None:
    data = tmp + ".data"
    if os.path.exists(data):
        os.replace(data, dest + ".data")
    os.replace(tmp, dest)


def parity_error(module: nn.Module, path: str, probes: list[torch.Tensor], optimize: bool = True) -> float:
    """Max abs difference between PyTorch (fp32) and ONNX Runtime (CPU) over the probe inputs.

    ``optimize=False`` turns ONNX Runtime's graph optimizations off: ORT 1.32's CPU optimizer
    crashes (segfault) on the fp16 graphs, so fp16 files are checked unoptimised.
    """
    session = ort_session(path, optimize=optimize)
    name = session.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for batch in probes:
            want = module(batch).float().numpy()
            got = session.run(None, {name: batch.numpy()})[0]
            if not (np.isfinite(want).all() and np.isfinite(got).all()):
                return math.inf  # NaN would slip through max(): a non-finite output is a failure
            worst = max(worst, float(abs(want - got).max()))
    return worst
