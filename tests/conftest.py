"""Shared test setup: CPU-only by default, Triton through its interpreter, tiny models in-process."""
from __future__ import annotations

import json
import os

# One OpenMP thread per test process (and, inherited, per subprocess and forked child) unless the
# caller chose: the models here are tiny, and on a shared 2-core CI machine a second spinning
# OpenMP thread per process made runs up to 5x slower (tests/reliability/test_kills.py: 33 s with
# one thread, 328 s with torch's default of two, beside other load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton's @jit reads this at decoration time, so it must be set before triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402

from surgery.model.tiny import build_tiny_clip, tiny_config  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny():
    """(model, config): a fresh seeded tiny CLIP, eval mode, fp32."""
    return build_tiny_clip(seed=0)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)


@pytest.fixture
def tokens():
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    return tok(["a photo of a dog", "a red square", "an illustration of a person cooking"])  # (B, 16)


@pytest.fixture
def registered_tiny(tmp_path):
    """Register the tiny config (and its QuickGELU twin) in open_clip's registry for this test."""
    from open_clip import factory

    cfg_dir = tmp_path / "model_configs"
    cfg_dir.mkdir()
    (cfg_dir / "Tiny-Test.json").write_text(json.dumps(tiny_config()))
    (cfg_dir / "Tiny-Test-quickgelu.json").write_text(json.dumps(tiny_config(quick_gelu=True)))
    before = dict(factory._MODEL_CONFIGS)
    open_clip.add_model_config(cfg_dir)
    yield "Tiny-Test"
    factory._MODEL_CONFIG_PATHS.remove(cfg_dir)
    factory._MODEL_CONFIGS.clear()
    factory._MODEL_CONFIGS.update(before)
