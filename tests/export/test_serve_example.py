"""examples/serve_onnx.py: metadata-only serving equals clipsurgery's own ONNX encoder."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
from PIL import Image

import surgery
from surgery.eval.encoders import OnnxEncoder
from surgery.export.onnx import export_onnx

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "serve_onnx.py"


def _example():
    spec = importlib.util.spec_from_file_location("serve_onnx", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serving_from_metadata_alone(tmp_path):
    serve = _example()
    export_onnx(surgery.load("builtin:tiny"), str(tmp_path / "m.onnx"))
    rgb = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)  # not square: resize + crop
    Image.fromarray(rgb).save(tmp_path / "a.png")
    files = serve.pair(str(tmp_path / "m.onnx"))
    got = serve.embed(files, [str(tmp_path / "a.png")], ["a photo of a dog", "a red square"])
    enc = OnnxEncoder(str(tmp_path / "m.onnx"))
    from surgery.model.preprocess import image_transform, tokenize

    pixels = image_transform(enc.preprocess)(Image.open(tmp_path / "a.png")).unsqueeze(0)
    want_img = enc.encode_images(pixels).numpy()
    want_txt = enc.encode_texts(tokenize(["a photo of a dog", "a red square"], enc.tokenizer)).numpy()
    np.testing.assert_allclose(got["image"], want_img, atol=2e-3)  # PIL vs torchvision resize rounding
    np.testing.assert_allclose(got["text"], want_txt, atol=1e-6)
