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
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint_io import META_ARCH, META_MODEL_CONFIG, write_safetensors
from .errors import SurgeryError
from .fsutil import check_output_path
from .loading import LoadedModel
from .plan import SurgeryPlan

log = logging.getLogger(__name__)

META_PLAN = "clipsurgery.plan"
META_PREPROCESS = "clipsurgery.preprocess"
META_TOKENIZER = "clipsurgery.tokenizer"
META_TOWER = "clipsurgery.tower"
META_NORMALIZED = "clipsurgery.normalized"
META_SOURCE = "clipsurgery.source_sha256"
META_PRECISION = "clipsurgery.precision"
META_GRAPH = "clipsurgery.graph"
TOWER_CHOICES = ("vision", "text", "both")
GRAPH_CHOICES = ("auto", "ort", "plain")
ORT_CONTRIB_DOMAIN = "com.microsoft"
PARITY_BOUND = {"fp32": 1e-4, "fp16": 2e-2}
_TWO_GB = 2 * 1024**3


class ExportParityError(SurgeryError):
    """ONNX Runtime's output differs from PyTorch's by more than the bound."""


@dataclass
class OnnxOptions:
    tower: str = "both"  # "vision" | "text" | "both"
    precision: str = "fp32"  # "fp32" | "fp16"
    normalize: bool = True  # L2-normalise the output embeddings inside the graph
    opset: int = 17  # ONNX opset (>= 17)
    force: bool = False  # replace existing outputs
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


def model_metadata(loaded: LoadedModel, plan: SurgeryPlan | None) -> dict[str, object]:
    return {
        META_MODEL_CONFIG: loaded.config,
        META_ARCH: loaded.arch,
        META_PREPROCESS: loaded.preprocess,
        META_TOKENIZER: loaded.tokenizer,
        META_PLAN: plan.to_dict() if plan else None,
        META_SOURCE: loaded.sha256 or "",
    }


def export_safetensors(loaded: LoadedModel, out: str, plan: SurgeryPlan | None = None, *, force: bool = False) -> str:
    """The whole (patched) model as one safetensors file with its config and plan in the metadata."""
    check_output_path(out, inputs=(loaded.source,), force=force)
    metadata = {k: v for k, v in model_metadata(loaded, plan).items() if v is not None}
    state = {k: v.float() if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()}
    write_safetensors(state, out, metadata)
    return out


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


def onnx_paths(out: str, tower: str) -> dict[str, str]:
    """Where each tower goes: OUT itself for one tower, <stem>.visual/.text.onnx for both."""
    if tower != "both":
        return {tower: out}
    stem = out[:-len(".onnx")] if out.endswith(".onnx") else out
    return {"vision": f"{stem}.visual.onnx", "text": f"{stem}.text.onnx"}


def export_onnx(loaded: LoadedModel, out: str, plan: SurgeryPlan | None = None, options: OnnxOptions | None = None,
                probe_images: torch.Tensor | None = None, probe_tokens: torch.Tensor | None = None) -> dict[str, dict]:
    """Export, verify with ONNX Runtime, then move into place. Returns {tower: {"path", "max_abs_error"}}."""
    opt = options or OnnxOptions()
    paths = onnx_paths(out, opt.tower)
    for path in paths.values():
        check_output_path(path, inputs=(loaded.source,), force=opt.force)
    metadata = {k: json.dumps(v) if not isinstance(v, str) else v
                for k, v in model_metadata(loaded, plan).items() if v is not None}
    work = tempfile.mkdtemp(prefix="clipsurgery-onnx-", dir=os.path.dirname(os.path.abspath(out)))
    results = {}
    try:
        staged = {}
        for tower, path in paths.items():
            tmp = os.path.join(work, Path(path).name)
            inputs = _example_inputs(loaded, tower)
            module = _encoder_module(loaded, tower, opt)  # the reference: open_clip's own modules
            probes = [inputs[0], *_gate_inputs(loaded, tower)]
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
    """A copy of the encoder whose tower blocks are :class:`FusedBlock` s."""
    import copy

    fused = copy.deepcopy(module)
    fuse_blocks_(_model_of(fused), tower)
    return fused


def _encoder_module(loaded: LoadedModel, tower: str, opt: OnnxOptions) -> nn.Module:
    import copy

    model = copy.deepcopy(loaded.model).float().eval()
    return (ImageEncoder if tower == "vision" else TextEncoder)(model, opt.normalize).eval()


def _example_inputs(loaded: LoadedModel, tower: str) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if tower == "vision":
        size = loaded.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        return (torch.randn(2, 3, h, w, generator=gen),)
    ctx = loaded.tokenizer["context_length"]
    vocab = loaded.config["text_cfg"].get("vocab_size", 49408)
    ids = torch.randint(1, vocab - 1, (2, ctx), generator=gen)
    ids[:, -1] = vocab - 1  # an end-of-text token (the argmax) in every row
    return (ids,)


def _gate_inputs(loaded: LoadedModel, tower: str) -> list[torch.Tensor]:
    """Extra parity-gate inputs: batch 1 and an odd batch; for text, real prompts through the
    model's tokenizer (end-of-text mid-sequence, zero padding)."""
    gen = torch.Generator().manual_seed(1)
    if tower == "vision":
        size = loaded.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        return [torch.randn(1, 3, h, w, generator=gen), torch.randn(3, 3, h, w, generator=gen)]
    from .encoders import tokenize

    prompts = tokenize(["a photo of a dog", "a diagram", "two people talking in a park at night"], loaded.tokenizer)
    return [prompts[:1], prompts]


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
            from .attention import swap_attention

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
    session = _session(path, optimize=optimize)
    name = session.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for batch in probes:
            want = module(batch).float().numpy()
            got = session.run(None, {name: batch.numpy()})[0]
            worst = max(worst, float(abs(want - got).max()))
    return worst


def _session(path: str, providers: list[str] | None = None, optimize: bool = True):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SurgeryError("onnxruntime is not installed; pip install 'clipsurgery[cpu]' (or [gpu])") from None
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])


# ------------------------------------------------------------------- ORT-fused transformer blocks


class UnfusableBlockError(SurgeryError):
    """A transformer block has a part the ORT-fused graph does not express (LayerScale aside)."""


def _activation_kind(module: nn.Module) -> str:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    raise UnfusableBlockError(f"activation {type(module).__name__} has no fused ONNX Runtime op")


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


class _FusedBlockFunction(torch.autograd.Function):
    """Forward: the block's math in plain torch (what tracing sees). ONNX: com.microsoft contrib
    ops (MultiHeadAttention or Attention, SkipLayerNormalization, BiasGelu/FastGelu/QuickGelu)."""

    @staticmethod
    def forward(ctx, x, ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_fc, b_fc, w_proj, b_proj,
                heads, eps1, eps2, causal, cls_only, act):
        batch, n_tok, width = x.shape  # x: (B, N, C)
        h = F.layer_norm(x, (width,), ln1_w, ln1_b, eps1)
        q, k, v = (h @ w_qkv + b_qkv).split(width, dim=-1)  # each (B, N, C)
        q = q[:, :1] if cls_only else q
        n_q = q.shape[1]
        q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, Nq, d)
        a = a.transpose(1, 2).reshape(batch, n_q, width)
        x = (x[:, :1] if cls_only else x) + a @ w_o + b_o  # (B, Nq, C)
        m = F.layer_norm(x, (width,), ln2_w, ln2_b, eps2) @ w_fc + b_fc
        m = F.gelu(m) if act == "gelu" else F.gelu(m, approximate="tanh") if act == "gelu_tanh" else m * torch.sigmoid(1.702 * m)
        return x + m @ w_proj + b_proj

    @staticmethod
    def symbolic(g, x, ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_fc, b_fc, w_proj, b_proj,
                 heads, eps1, eps2, causal, cls_only, act):
        ms = ORT_CONTRIB_DOMAIN + "::"
        h = g.op("LayerNormalization", x, ln1_w, ln1_b, axis_i=-1, epsilon_f=eps1)
        if cls_only:  # the class token's query (B, 1, C) against every token's keys and values (B, N, C)
            width = w_o.type().sizes()[0]
            q = g.op("MatMul", _slice(g, h, 0, 1, axis=1), _slice(g, w_qkv, 0, width, axis=1))
            kv = g.op("MatMul", h, _slice(g, w_qkv, width, 3 * width, axis=1))  # (B, N, 2C)
            k, v = g.op("Split", kv, g.op("Constant", value_t=torch.tensor([width, width])), axis_i=-1, outputs=2)
            a = g.op(ms + "MultiHeadAttention", q, k, v, b_qkv, num_heads_i=heads)  # biases added inside
        else:  # Attention (QKV projection inside, prepacked per head) beat a MatMul + MultiHeadAttention
            # on ViT-B-32 at batch 1 and 32 (benchmarks/RESULTS.md)
            a = g.op(ms + "Attention", h, w_qkv, b_qkv, num_heads_i=heads, unidirectional_i=int(causal))
        skip = _slice(g, x, 0, 1, axis=1) if cls_only else x
        h2, _, _, x1 = g.op(ms + "SkipLayerNormalization", g.op("MatMul", a, w_o), skip, ln2_w, ln2_b, b_o,
                            epsilon_f=eps2, outputs=4)
        m = g.op("MatMul", h2, w_fc)
        if act == "gelu":
            m = g.op(ms + "BiasGelu", m, b_fc)
        elif act == "gelu_tanh":
            m = g.op(ms + "FastGelu", m, b_fc)
        else:
            m = g.op(ms + "QuickGelu", g.op("Add", m, b_fc), alpha_f=1.702)
        out = g.op("Add", g.op("Add", g.op("MatMul", m, w_proj), b_proj), x1)
        for value in (out, x1):
            value.setType(x.type().with_sizes(None) if hasattr(x.type(), "with_sizes") else x.type())
        return out


def _slice(g, value, start: int, end: int, axis: int):
    def const(v):
        return g.op("Constant", value_t=torch.tensor([v]))

    return g.op("Slice", value, const(start), const(end), const(axis))


class FusedBlock(nn.Module):
    """Export-time stand-in for one open_clip residual block (``x += attn(ln_1(x)); x += mlp(ln_2(x))``)
    holding its weights pre-transposed for ``x @ W``; LayerScale is folded into the output weights.
    ``cls_only``: the block returns the class token alone (B, 1, C) (its keys and values still come
    from every token): exact when the tower pools the class token after this, the last, block."""

    def __init__(self, block: nn.Module, causal: bool, cls_only: bool = False):
        super().__init__()
        attn = block.attn
        for name in ("ln_attn", "ln_1_kv"):
            if not _is_identity(getattr(block, name, None)):
                raise UnfusableBlockError(f"block has {name}")
        for name in ("ln_q", "ln_k", "ln_inner"):
            if not _is_identity(getattr(attn, name, None)):
                raise UnfusableBlockError(f"attention has {name}")
        if getattr(attn, "head_scale", None) is not None or getattr(attn, "logit_scale", None) is not None:
            raise UnfusableBlockError("attention has a head_scale or scaled-cosine logits")
        if getattr(attn, "head_mask", None) is not None or getattr(attn, "head_fill", None) is not None:
            raise UnfusableBlockError("attention carries a runtime head mask; bake it first")
        if getattr(attn, "bias_k", None) is not None or getattr(attn, "add_zero_attn", False):
            raise UnfusableBlockError("attention has bias_k/bias_v or add_zero_attn")
        if not getattr(attn, "batch_first", True):
            raise UnfusableBlockError("attention is not batch-first")
        if getattr(attn, "in_proj_weight", None) is None:
            raise UnfusableBlockError("attention has no packed in_proj_weight")
        mlp = block.mlp
        if not _is_identity(getattr(mlp, "ln", None)):
            raise UnfusableBlockError("MLP has an inner LayerNorm")
        for ln in (block.ln_1, block.ln_2):
            if not isinstance(ln, nn.LayerNorm) or not ln.elementwise_affine or len(ln.normalized_shape) != 1:
                raise UnfusableBlockError(f"norm {type(ln).__name__} is not an affine LayerNorm")
        self.act = _activation_kind(mlp.gelu)
        self.heads = int(attn.num_heads)
        self.causal, self.cls_only = bool(causal), bool(cls_only)
        self.eps1, self.eps2 = float(block.ln_1.eps), float(block.ln_2.eps)
        width = attn.in_proj_weight.shape[1]
        gamma1, gamma2 = _layer_scale(block.ls_1, width), _layer_scale(block.ls_2, width)

        def const(t):
            return t.detach().float().contiguous().clone()

        zeros = torch.zeros(3 * width)
        self.register_buffer("ln1_w", const(block.ln_1.weight))
        self.register_buffer("ln1_b", const(block.ln_1.bias))
        self.register_buffer("w_qkv", const(attn.in_proj_weight.t()))  # (C, 3C)
        self.register_buffer("b_qkv", const(attn.in_proj_bias if attn.in_proj_bias is not None else zeros))
        self.register_buffer("w_o", const(attn.out_proj.weight.t() * gamma1))  # (C, C)
        self.register_buffer("b_o", const(_bias(attn.out_proj, width) * gamma1))
        self.register_buffer("ln2_w", const(block.ln_2.weight))
        self.register_buffer("ln2_b", const(block.ln_2.bias))
        self.register_buffer("w_fc", const(mlp.c_fc.weight.t()))  # (C, 4C)
        self.register_buffer("b_fc", const(_bias(mlp.c_fc, mlp.c_fc.out_features)))
        self.register_buffer("w_proj", const(mlp.c_proj.weight.t() * gamma2))  # (4C, C)
        self.register_buffer("b_proj", const(_bias(mlp.c_proj, width) * gamma2))

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks the first block
        return self.w_qkv.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, C) -> (B, N, C), or (B, 1, C) when cls_only; the tower's mask is encoded by `causal`
        return _FusedBlockFunction.apply(
            x, self.ln1_w, self.ln1_b, self.w_qkv, self.b_qkv, self.w_o, self.b_o, self.ln2_w, self.ln2_b,
            self.w_fc, self.b_fc, self.w_proj, self.b_proj, self.heads, self.eps1, self.eps2, self.causal,
            self.cls_only, self.act)


def _layer_scale(module: nn.Module, width: int) -> torch.Tensor:
    if _is_identity(module):
        return torch.ones(width)
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise UnfusableBlockError(f"residual scale {type(module).__name__} is not a LayerScale")
    return gamma.detach().float()


def _bias(linear: nn.Linear, width: int) -> torch.Tensor:
    return linear.bias.detach().float() if linear.bias is not None else torch.zeros(width)


def _causal_mask_ok(mask: torch.Tensor | None, n: int) -> bool:
    if mask is None or mask.shape != (n, n):
        return False
    want = torch.full((n, n), float("-inf")).triu(1)
    return bool(torch.equal(mask.float().isinf(), want.isinf()) and (mask.float()[~want.isinf()] == 0).all())


def fuse_blocks_(model: nn.Module, tower: str) -> None:
    """Replace the tower's residual blocks with :class:`FusedBlock` s (in place; use on a copy).
    Raises :class:`UnfusableBlockError` (leaving the model unchanged) when any part does not fit."""
    if tower == "vision":
        visual = model.visual
        owner, causal = visual, False
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise UnfusableBlockError(f"vision tower {type(visual).__name__} is not an open_clip ViT")
        cls_only = (getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", None) == "tok"
                    and not getattr(visual, "output_tokens", False))
    else:
        owner = model.text if hasattr(model, "text") else model
        if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            raise UnfusableBlockError("text tower uses a class token or a padding mask")
        mask = getattr(owner, "attn_mask", None)
        causal = mask is not None
        if causal and not _causal_mask_ok(mask, owner.context_length if hasattr(owner, "context_length") else mask.shape[0]):
            raise UnfusableBlockError("text attention mask is not the plain causal mask")
        cls_only = False
    transformer = owner.transformer
    if not getattr(transformer, "batch_first", True):
        raise UnfusableBlockError("transformer is not batch-first")
    blocks = transformer.resblocks
    fused = [FusedBlock(b, causal, cls_only=cls_only and i == len(blocks) - 1) for i, b in enumerate(blocks)]
    for i, block in enumerate(fused):
        blocks[i] = block


def fuse_residual_norms(graph) -> int:
    """Rewrite ``LayerNormalization(Add(Add(MatMul, bias), residual))`` (one block's output feeding
    the next block's, or the final, norm) into one com.microsoft ``SkipLayerNormalization`` whose
    fourth output is the residual sum. In place on an onnx GraphProto; returns the number fused."""
    from onnx import helper

    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    dropped, added = set(), []
    for norm in graph.node:
        if norm.op_type != "LayerNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.input) != 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        if attrs.get("axis", -1) != -1 or len(norm.output) != 1 or norm.input[1] not in initializers \
                or norm.input[2] not in initializers:
            continue
        total = producer.get(norm.input[0])
        if total is None or total.op_type != "Add" or id(total) in dropped:
            continue
        biased = next((producer.get(i) for i in total.input if _is_bias_add(producer.get(i), initializers)), None)
        if biased is None or len(consumers.get(biased.output[0], [])) != 1 or biased.output[0] in outputs:
            continue
        residual = [i for i in total.input if i != biased.output[0]]
        bias = next(i for i in biased.input if i in initializers)
        hidden = next(i for i in biased.input if i != bias)
        if len(residual) != 1:
            continue
        sum_used = len(consumers.get(total.output[0], [])) > 1 or total.output[0] in outputs
        added.append(helper.make_node(
            "SkipLayerNormalization", [hidden, residual[0], norm.input[1], norm.input[2], bias],
            [norm.output[0], "", "", total.output[0] if sum_used else ""],
            name=f"{norm.name or total.name}_skip", domain=ORT_CONTRIB_DOMAIN, epsilon=float(attrs.get("epsilon", 1e-5))))
        dropped.update((id(norm), id(total), id(biased)))
    if added:
        kept = [n for n in graph.node if id(n) not in dropped] + added
        del graph.node[:]
        graph.node.extend(_topological(kept, graph))
    return len(added)


def _is_bias_add(node, initializers) -> bool:
    """An Add of a computed tensor and a 1-D initializer (a Linear's bias)."""
    if node is None or node.op_type != "Add" or len(node.input) != 2:
        return False
    consts = [i for i in node.input if i in initializers]
    return len(consts) == 1 and len(initializers[consts[0]].dims) == 1


def _topological(nodes: list, graph) -> list:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise SurgeryError("internal error: the fused ONNX graph has a cycle")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    return ordered
