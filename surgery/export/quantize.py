"""int8 ONNX files: ONNX Runtime quantization of an exported fp32 pair, checked by the fairness gate.

* What is quantized: the weights of every ``MatMul`` / ``Gemm`` (and the ORT-fused graph's
  com.microsoft ``Attention``, which becomes ``QAttention``), int8, per output channel; the graph
  is the one :func:`surgery.export.onnx.export_onnx` writes (ORT-fused where it applies), so the
  fused attention and SkipLayerNormalization ops are kept. Activations: ``dynamic`` (scale found
  per batch at run time) or ``static`` (QDQ, ranges calibrated on probe inputs that are never
  the gate's: a world's train split, or ``--calibration-images`` apart from ``--gate-images``,
  checked by content). benchmarks/bench_quantize.py measures both; ``dynamic`` is the default.
* The fp32 file's 1e-4 parity gate does not apply; instead :mod:`surgery.export.gate` compares the
  int8 pair with the fp32 export on labelled probe images (embedding cosine, zero-shot accuracy,
  MaxSkew@K) and refuses to write a pair that moved too far. The figures go into each file's
  ``clipsurgery.gate`` metadata, the settings into ``clipsurgery.quantization``. The probe set is
  read (and refused if the gate could not measure it) before anything is exported.
* Nothing is written half-way: the fp32 export, the int8 files and the gate's images live in a
  staging folder beside the output; only a pair that passed is moved into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from surgery.edit.plan import SurgeryPlan
from surgery.errors import DataError, QuantizationGateError, SurgeryError
from surgery.eval.encoders import OnnxEncoder
from surgery.eval.evaluate import EvalSpec
from surgery.export.gate import GateData, GateOptions, check_gate, format_gate, gate_figures, gate_spec
from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.io.fs import check_output_path, staging_dir
from surgery.io.images import ImageFolderDataset, list_images, resolve_images_dir
from surgery.io.metadata import META_GATE, META_PRECISION, META_QUANTIZATION, META_TOWER
from surgery.io.onnx import onnx_paths, read_metadata, resolve_pair
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import image_transform, images_to_tensor, tokenize
from surgery.world.generator import balanced_size, generate

log = logging.getLogger(__name__)
QUANTIZE_CHOICES = ("int8",)
CALIBRATION_CHOICES = ("dynamic", "static")
STAGING_PREFIX = "clipsurgery-int8-"
CALIBRATION_INPUTS = 256  # probe images (and up to as many texts) static calibration runs
# contrib ops whose outputs ONNX's shape inference cannot type; all of them return their first input's float type
_CONTRIB_FLOAT_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu",
                      "QuickGelu", "QAttention")

#: calibration inputs per tower: a list of feeds {input name: array}, e.g. {"pixel_values": (B, 3, H, W) float32}
CalibrationFeeds = Callable[[str], list[dict[str, np.ndarray]]]


@dataclass
class QuantizeOptions:
    scheme: str = "int8"  # the only scheme: int8 weights (and int8/uint8 activations where calibrated)
    # "dynamic": activation scales per batch at run time (no calibration data, the default: as fast as
    # static on ORT's CPU provider and closer to fp32, see benchmarks/bench_quantize.py);
    # "static": QDQ with activation ranges calibrated on probe inputs
    calibration: str = "dynamic"
    per_channel: bool = True  # one weight scale per output channel (False: one per tensor, coarser)
    # 7-bit weights: ONNX Runtime's u8 x s8 int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs of
    # products in 16 bits, which saturate with full-range weights. Where the file is served is unknown when it
    # is written, so weights keep a bit of headroom by default (world model, 2-core AVX2 EPYC: image cosine to
    # fp32 0.9900 with 8-bit weights, which fails the gate, vs 0.9998 with 7-bit; see benchmarks/RESULTS.md)
    reduce_range: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Attention")  # ops whose weights are quantized
    force: bool = False  # replace existing outputs

    def __post_init__(self) -> None:
        if self.scheme not in QUANTIZE_CHOICES:
            raise SurgeryError(f"unknown quantization {self.scheme!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
        if self.calibration not in CALIBRATION_CHOICES:
            raise SurgeryError(f"unknown calibration {self.calibration!r}; choose one of "
                               f"{', '.join(CALIBRATION_CHOICES)}")
        self.op_types = tuple(self.op_types)
        if not self.op_types:
            raise SurgeryError("no op types to quantize; give at least one (e.g. MatMul)")

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "calibration": self.calibration, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range, "op_types": list(self.op_types)}


@dataclass
class QuantizedExport:
    paths: dict[str, str]  # tower -> written int8 file
    figures: dict  # the gate's figures (see surgery.export.gate.gate_figures)
    fp32_graph: dict[str, str] = field(default_factory=dict)  # tower -> "ort" | "plain" (the graph quantized)


def export_quantized(loaded: LoadedModel, out: str, plan: SurgeryPlan | None, gate_data: GateData, *,
                     onnx_options: OnnxOptions | None = None, options: QuantizeOptions | None = None,
                     gate: GateOptions | None = None, calibration: CalibrationFeeds | None = None,
                     work_dir: str | None = None) -> QuantizedExport:
    """Export ``loaded`` as fp32 ONNX (parity-gated), quantize it, gate it on ``gate_data``'s
    labelled images, and write the int8 pair at ``out`` only if it passes."""
    opt = options or QuantizeOptions()
    onnx_opt = dataclasses.replace(onnx_options or OnnxOptions(), force=True)
    if onnx_opt.precision != "fp32":
        raise SurgeryError("int8 quantization starts from the fp32 graph; drop --precision fp16")
    if onnx_opt.tower != "both":
        raise SurgeryError("the fairness gate needs both towers (zero-shot accuracy and bias use text queries); "
                           "quantize with --tower both")
    paths = onnx_paths(out, onnx_opt.tower)
    for path in paths.values():
        check_output_path(path, inputs=(loaded.source, *onnx_opt.inputs, gate_data.images_dir, gate_data.labels_path),
                          force=opt.force)
    work = staging_dir(STAGING_PREFIX, work_dir or os.path.dirname(os.path.abspath(out)))
    try:
        spec = gate_data.spec(work)  # a probe set the gate cannot measure is refused before the export
        fp32_out = os.path.join(work, "fp32.onnx")
        exported = export_onnx(loaded, fp32_out, plan, onnx_opt)
        result = _quantize_and_gate(fp32_out, out, onnx_opt.tower, gate_data, spec, opt, gate or GateOptions(),
                                    calibration, work)
        result.fp32_graph = {t: r["graph"] for t, r in exported.items()}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantize_pair(fp32: str, out: str, gate_data: GateData, *, options: QuantizeOptions | None = None,
                  gate: GateOptions | None = None, calibration: CalibrationFeeds | None = None) -> QuantizedExport:
    """Quantize an exported fp32 pair (``fp32``: OUT.onnx as given to export) and write the int8
    pair at ``out`` if it passes the gate on ``gate_data``'s labelled images."""
    opt = options or QuantizeOptions()
    pair = resolve_pair(fp32)
    for path in pair.values():
        precision = read_metadata(path).get(META_PRECISION, "fp32")
        if precision != "fp32":
            raise SurgeryError(f"{path} is a {precision} file; quantize the fp32 export")
    if set(pair) != {"vision", "text"}:
        raise SurgeryError(f"{fp32}: the gate needs both towers (zero-shot accuracy and bias use text queries); "
                           "export with --tower both")
    out_paths = onnx_paths(out, "both")
    for path in out_paths.values():
        check_output_path(path, inputs=(*pair.values(), gate_data.images_dir, gate_data.labels_path), force=opt.force)
    work = staging_dir(STAGING_PREFIX, os.path.dirname(os.path.abspath(out)))
    try:
        spec = gate_data.spec(work)
        staged = onnx_paths(os.path.join(work, "fp32.onnx"), "both")
        for tower, path in pair.items():
            shutil.copyfile(path, staged[tower])
        return _quantize_and_gate(os.path.join(work, "fp32.onnx"), out, "both", gate_data, spec, opt,
                                  gate or GateOptions(), calibration, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantize_and_gate(fp32_out: str, out: str, tower: str, gate_data: GateData, spec: EvalSpec, opt: QuantizeOptions,
                       gate: GateOptions, calibration: CalibrationFeeds | None, work: str) -> QuantizedExport:
    if tower != "both":
        raise SurgeryError("the fairness gate needs both towers (zero-shot accuracy and bias use text queries); "
                           "quantize with --tower both")
    fp32_paths = onnx_paths(fp32_out, "both")
    int8_out = os.path.join(work, "int8.onnx")
    int8_paths = onnx_paths(int8_out, "both")
    for name, src in fp32_paths.items():
        feeds = calibration(name) if (calibration and opt.calibration == "static") else None
        if opt.calibration == "static" and not feeds:
            raise SurgeryError("static calibration needs probe inputs; pass gate images, or use dynamic calibration")
        quantize_file(src, int8_paths[name], opt, feeds)
    figures = gate_figures(OnnxEncoder(fp32_out), OnnxEncoder(int8_out), spec, os.path.join(work, "cache"))
    figures["probe"] = gate_data.describe()
    failures = check_gate(figures, gate)
    figures["thresholds"] = gate.to_dict()
    figures["passed"] = not failures
    if failures:
        error = QuantizationGateError(f"the int8 pair failed the fairness gate ({'; '.join(failures)}); nothing was "
                                      f"written. Figures: {format_gate(figures)}. Try --calibration "
                                      f"{'static' if opt.calibration == 'dynamic' else 'dynamic'}, or ship the fp32 "
                                      "file")
        error.figures = figures  # for callers that report them (the message has them in words)
        raise error
    final = onnx_paths(out, "both")
    for name, path in int8_paths.items():
        _set_metadata(path, {META_PRECISION: "int8", META_QUANTIZATION: json.dumps(opt.to_dict()),
                             META_GATE: json.dumps(figures)})
    for name, path in int8_paths.items():
        os.replace(path, final[name])
    return QuantizedExport(paths=final, figures=figures)


def calibration_feeds(gate_data: GateData, preprocess: dict, tokenizer: dict, n: int = CALIBRATION_INPUTS,
                      batch: int = 32, images_dir: str | None = None) -> CalibrationFeeds:
    """Static calibration inputs per tower, never the gate's images (a range fitted on the very images
    the gate then measures would flatter the int8 file): a world's train-split draw, or, when the gate
    reads a folder, ``images_dir`` (unlabelled images apart from the gate's; shared files are refused,
    found by content). Texts: the world's train captions, or the gate's queries and class prompts
    (the text tower has no images to leak)."""
    files: list[str] = []
    if gate_data.world is None or images_dir is not None:
        if images_dir is None:
            raise SurgeryError("static calibration needs images apart from the gate's: pass --calibration-images DIR "
                               "(images not among --gate-images), or use --calibration dynamic")
        files = _disjoint_calibration_files(images_dir, gate_data, n)

    def feeds(tower: str) -> list[dict[str, np.ndarray]]:
        if files:
            dataset = ImageFolderDataset(images_dir, files, image_transform(preprocess))
            pixels = torch.cat([b for b, _ in dataset.batches(batch, 0)])
        else:
            split = generate(gate_data.world, "train", n)
            gate_split = generate(gate_data.world, "eval", balanced_size(gate_data.world))
            shared = {_digest(a) for a in split.images} & {_digest(a) for a in gate_split.images}
            if shared:
                raise SurgeryError(f"{len(shared)} calibration images of the world's train draw equal gate images; "
                                   "report this: the world's splits should never share an image")
            pixels = images_to_tensor(split.images, preprocess)  # (n, 3, S, S)
        if tower == "vision":
            return [{"pixel_values": chunk.numpy()} for chunk in pixels.split(batch)]
        if gate_data.world is not None:
            texts = list(generate(gate_data.world, "train", n).captions)
        else:
            spec = gate_spec(gate_data.images_dir, gate_data.labels_path, gate_data)
            texts = list(dict.fromkeys([*spec.queries, *(spec.class_prompts or [])]))
        tokens = tokenize(texts, tokenizer)  # (T, ctx) int64
        return [{"input_ids": chunk.numpy()} for chunk in tokens.split(batch)]

    return feeds


def _digest(item) -> str:
    """sha256 of an image file's bytes (a path) or of a uint8 array's bytes."""
    if isinstance(item, str):
        with open(item, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest()


def _disjoint_calibration_files(images_dir: str, gate_data: GateData, n: int) -> list[str]:
    """The first ``n`` images of ``images_dir``, refused when any of them is also a gate image."""
    if not os.path.isdir(images_dir):
        what = "does not exist" if not os.path.exists(images_dir) else "is a file, not a folder"
        raise SurgeryError(f"--calibration-images {images_dir} {what}; give a folder of images apart from the gate's")
    files = list_images(images_dir)[:n]
    gate_dir = resolve_images_dir(gate_data.images_dir) if gate_data.images_dir else None
    if gate_dir is not None:
        gate_files = list_images(gate_dir)
        gate_digests = {_digest(os.path.join(gate_dir, f)): f for f in gate_files}
        shared = [f for f in files if _digest(os.path.join(images_dir, f)) in gate_digests]
        if shared:
            raise DataError(f"{len(shared)} of the {len(files)} calibration images are also gate images (e.g. "
                            f"{shared[0]!r}); static calibration must not see the images the gate measures: give "
                            "--calibration-images a folder apart from --gate-images")
    return files


def quantize_file(src: str, dst: str, options: QuantizeOptions,
                  calibration_feeds: list[dict[str, np.ndarray]] | None = None) -> None:
    """Quantize one fp32 ONNX file into ``dst`` (metadata_props kept). ``calibration_feeds``: static only."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    model = onnx.load(src)
    metadata = {p.key: p.value for p in model.metadata_props}
    if metadata.get(META_PRECISION, "fp32") != "fp32":
        raise SurgeryError(f"{src} is not an fp32 file; quantize the fp32 export")
    prepared = dst + ".prep.onnx"
    _type_contrib_outputs(model)
    onnx.save(model, prepared)
    del model
    # contrib-op outputs that shape inference still cannot type are float activations
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quiet = _QuietQuantizer()
    logging.getLogger().addFilter(quiet)
    try:
        if options.calibration == "dynamic":
            quantize_dynamic(prepared, dst, op_types_to_quantize=list(options.op_types), per_channel=options.per_channel,
                             reduce_range=options.reduce_range, weight_type=QuantType.QInt8, extra_options=extra)
        else:
            feeds = list(calibration_feeds or [])

            class _Reader(CalibrationDataReader):
                def __init__(self):
                    self.items = iter(feeds)

                def get_next(self):
                    return next(self.items, None)

            quantize_static(prepared, dst, _Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=[t for t in options.op_types if t != "Attention"],
                            per_channel=options.per_channel, reduce_range=options.reduce_range,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, extra_options=extra)
    finally:
        logging.getLogger().removeFilter(quiet)
        for stale in (prepared, prepared + ".data", dst + "-inferred.onnx"):
            if os.path.exists(stale):
                os.unlink(stale)
    _set_metadata(dst, {**metadata, META_PRECISION: "int8", META_TOWER: metadata.get(META_TOWER, "")})


class _QuietQuantizer(logging.Filter):
    """ORT's quantizer warns on the root logger about pre-processing (we type the graph ourselves) and
    about tensors it leaves in fp32 (shape/index tensors); the library keeps its log to what matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Please consider", "failed to infer the type of tensor"))


def _type_contrib_outputs(model) -> None:
    """Give the fused graph's com.microsoft outputs a float type (the exporter leaves them untyped,
    and ORT's quantizer needs every activation's type), then let ONNX propagate it downstream."""
    import onnx

    typed = {v.name for v in model.graph.value_info if v.type.HasField("tensor_type")}
    keep = [v for v in model.graph.value_info if v.type.HasField("tensor_type")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in _CONTRIB_FLOAT_OPS:
            for name in node.output:
                if name and name not in typed:
                    model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - inference is a help for static calibration, not a requirement
        log.info("shape inference on the fused graph failed (%s); quantizing without it", exc)
        return
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.type.HasField("tensor_type"))


def _set_metadata(path: str, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(path)
    current = {p.key: p.value for p in model.metadata_props}
    current.update({k: v for k, v in metadata.items() if v})
    del model.metadata_props[:]
    for key, value in current.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)
