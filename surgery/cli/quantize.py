"""``clipsurgery export ... --quantize int8``: the options and the run (a thin click layer over
surgery.export.quantize); ``export`` in surgery/cli/main.py hands over to :func:`export_int8`.
"""
from __future__ import annotations

import json

import click

from surgery.edit.plan import SurgeryPlan
from surgery.export.gate import GateData, GateOptions, format_gate
from surgery.export.onnx import OnnxOptions
from surgery.export.quantize import QuantizeOptions, calibration_feeds, export_quantized, quantize_pair
from surgery.io.metadata import META_PREPROCESS, META_TOKENIZER, META_WORLD
from surgery.io.onnx import read_metadata, resolve_pair
from surgery.model.loading import load
from surgery.world.params import WorldParams


def quantize_options(f):
    f = click.option("--quantize", type=click.Choice(["int8"]), default=None,
                     help="ONNX: int8 weights (MatMul/Gemm/Attention, per channel) with ONNX Runtime; the file must "
                          "pass the fairness gate against the fp32 export or nothing is written. MODEL may also be an "
                          "exported fp32 OUT.onnx.")(f)
    f = click.option("--calibration", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
                     help="int8 activations: scaled per batch at run time, or calibrated on probe images (QDQ).")(f)
    f = click.option("--gate-images", default=None, type=click.Path(),
                     help="int8: labelled probe images for the gate (default: a world model's own eval split).")(f)
    f = click.option("--gate-labels", default=None, type=click.Path(), help="int8: labels CSV for --gate-images.")(f)
    f = click.option("--gate-min-cosine", type=float, default=0.99, show_default=True,
                     help="int8 gate: mean cosine to the fp32 embeddings (images and texts), at least.")(f)
    f = click.option("--gate-max-accuracy-change", type=click.FloatRange(0, 100), default=1.0, show_default=True,
                     help="int8 gate: points of zero-shot accuracy the int8 file may differ by.")(f)
    f = click.option("--gate-max-skew-change", type=click.FloatRange(0), default=0.02, show_default=True,
                     help="int8 gate: change of mean MaxSkew@K allowed, per protected attribute.")(f)
    f = click.option("--gate-k", type=click.IntRange(1), default=50, show_default=True,
                     help="int8 gate: MaxSkew@K (below the number of gate images).")(f)
    f = click.option("--gate-concept", default=None,
                     help="int8 gate: the --gate-labels column zero-shot accuracy is measured on (default: a world "
                          "split's concept, or a column named 'concept').")(f)
    f = click.option("--gate-attributes", default=None,
                     help="int8 gate: protected-attribute columns of --gate-labels, comma-separated (default: those "
                          "named gender, race, age or group).")(f)
    f = click.option("--calibration-images", default=None, type=click.Path(),
                     help="int8 --calibration static with --gate-images: a folder of images apart from the gate's to "
                          "calibrate on (a world model calibrates on its own train split).")(f)
    return f


def export_int8(model: str, out: str, *, tower: str, precision: str, normalize: bool, opset: int, graph: str,
                force: bool, arch: str | None, calibration: str, gate_images: str | None, gate_labels: str | None,
                gate_min_cosine: float, gate_max_accuracy_change: float, gate_max_skew_change: float,
                gate_k: int, gate_concept: str | None = None, gate_attributes: str | None = None,
                calibration_images: str | None = None, **_) -> None:
    if not out.endswith(".onnx"):
        raise click.UsageError(f"--quantize writes ONNX: output {out} must end in .onnx")
    if precision != "fp32":
        raise click.UsageError("--quantize int8 starts from the fp32 graph; --precision fp16 is the GPU option, "
                               "not both")
    if tower != "both":
        raise click.UsageError("--quantize needs --tower both: the gate measures accuracy and bias with text queries")
    if calibration_images is not None and calibration != "static":
        raise click.UsageError("--calibration-images is for --calibration static")
    attributes = [a.strip() for a in gate_attributes.split(",") if a.strip()] if gate_attributes else None
    options = QuantizeOptions(calibration=calibration, force=force)
    gate = GateOptions(min_cosine=gate_min_cosine, max_accuracy_change=gate_max_accuracy_change / 100,
                       max_skew_change=gate_max_skew_change)
    if model.endswith(".onnx"):  # an exported fp32 pair
        pair = resolve_pair(model)
        meta = {t: read_metadata(p) for t, p in pair.items()}
        world = next((json.loads(m[META_WORLD]) for m in meta.values() if m.get(META_WORLD)), None)
        gate_data = GateData(images_dir=gate_images, labels_path=gate_labels, k=gate_k, concept=gate_concept,
                             attributes=attributes,  # a world model's pair is gated on its own world
                             world=WorldParams.from_dict(world) if world is not None and gate_images is None else None)
        feeds = calibration_feeds(gate_data, json.loads(meta["vision"][META_PREPROCESS]),
                                  json.loads(meta["text"][META_TOKENIZER]), images_dir=calibration_images) \
            if calibration == "static" and "vision" in meta and "text" in meta else None
        result = quantize_pair(model, out, gate_data, options=options, gate=gate, calibration=feeds)
    else:
        loaded = load(model, arch=arch)
        gate_data = GateData.for_model(loaded, gate_images, gate_labels, k=gate_k, concept=gate_concept,
                                       attributes=attributes)  # refused before exporting
        plan = SurgeryPlan.from_dict(loaded.metadata["plan"]) if loaded.metadata.get("plan") else None
        feeds = calibration_feeds(gate_data, loaded.preprocess, loaded.tokenizer, images_dir=calibration_images) \
            if calibration == "static" else None
        result = export_quantized(loaded, out, plan, gate_data,
                                  onnx_options=OnnxOptions(tower=tower, normalize=normalize, opset=opset, graph=graph),
                                  options=options, gate=gate, calibration=feeds)
    for name, path in result.paths.items():
        click.echo(f"wrote {path}  ({name}, int8 {calibration})")
    click.echo(f"fairness gate passed: {format_gate(result.figures)}")
