"""Device, attention backend and autocast resolution (surgery.model.device) and the CLI's --device."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import surgery.model.device as device_mod
from surgery.audit.run import AuditRun
from surgery.cli.main import main
from surgery.errors import SurgeryError
from surgery.model.device import Placement, resolve_placement


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_without_cuda_is_cpu_sdpa_fp32(no_cuda):
    placement = resolve_placement("auto")
    assert placement == Placement("cpu", "sdpa", None)
    assert placement.describe("audit") == "audit: device cpu, attention backend sdpa, fp32"


def test_auto_with_cuda_is_triton_bf16(fake_cuda, monkeypatch):
    monkeypatch.setattr(device_mod, "triton_importable", lambda: True)
    placement = resolve_placement("auto")
    assert placement == Placement("cuda", "triton", torch.bfloat16)
    assert placement.describe("audit") == "audit: device cuda, attention backend triton, bf16 autocast"
    assert resolve_placement("cuda", autocast=False).describe("sae train") == \
        "sae train: device cuda, attention backend triton, fp32"
    assert resolve_placement("cuda:1").device == "cuda:1"
    assert resolve_placement("cpu") == Placement("cpu", "sdpa", None)  # the CPU never autocasts
    assert resolve_placement("cuda", backend="math").backend == "math"  # a named backend is kept


def test_cuda_without_triton_falls_back_to_sdpa(fake_cuda, monkeypatch):
    monkeypatch.setattr(device_mod, "triton_importable", lambda: False)
    assert resolve_placement("auto") == Placement("cuda", "sdpa", torch.bfloat16)
    with pytest.raises(SurgeryError, match="not importable"):
        resolve_placement("cuda", backend="triton")


@pytest.mark.parametrize("device, words", [
    ("cuda", ["--device cuda", "no CUDA device", "--device cpu"]),
    ("cuda:0", ["--device cuda:0", "no CUDA device"]),
    ("tpu", ["unknown device 'tpu'", "auto, cpu, cuda"]),
])
def test_bad_devices_give_one_line_errors(no_cuda, device, words):
    with pytest.raises(SurgeryError) as info:
        resolve_placement(device)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_cuda_index_out_of_range(fake_cuda):
    with pytest.raises(SurgeryError, match="2 CUDA device"):
        resolve_placement("cuda:2")


def test_autocast_context_is_a_no_op_without_a_dtype():
    with Placement("cpu", "sdpa", None).autocast_context():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("command", [
    ["audit", "builtin:world", "--out", "OUT"],
    ["sae", "train", "builtin:tiny", "--texts", "TEXTS", "--out", "OUT"],
    ["sae", "neurons", "SAE", "builtin:tiny", "--groups", "a,b", "--attribute", "g", "--out", "OUT/n.json"],
])
def test_cli_device_cuda_without_cuda_is_a_one_line_error(no_cuda, tmp_path, command):
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo\n")
    args = [a.replace("OUT", str(tmp_path / "out")).replace("TEXTS", str(texts)).replace("SAE", str(tmp_path))
            for a in command]
    result = CliRunner().invoke(main, args + ["--device", "cuda"])
    assert result.exit_code == 1, result.output
    assert "Error: --device cuda: no CUDA device is visible" in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output


def test_cli_audit_prints_which_backend_ran(no_cuda, tmp_path, monkeypatch):
    seen = {}

    def fake_run_audit(model, out_dir, options, **kwargs):
        seen.update(kwargs)
        return AuditRun(None, None, {}, kwargs["placement"])

    monkeypatch.setattr("surgery.cli.main.run_audit", fake_run_audit)
    result = CliRunner().invoke(main, ["audit", "builtin:world", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "audit: device cpu, attention backend sdpa, fp32" in result.output.splitlines()
    assert seen["placement"] == Placement("cpu", "sdpa", None)
