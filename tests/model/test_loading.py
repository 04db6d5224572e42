"""surgery.load: every supported checkpoint format loads back equal; bad input fails clearly."""
from __future__ import annotations

import hashlib
import json

import open_clip
import pytest
import torch
from helpers import assert_same_embeddings
from safetensors.torch import save_file

import surgery
from surgery.errors import ArchitectureError, SurgeryError, UnsupportedTowerError
from surgery.io.metadata import META_ARCH, META_MODEL_CONFIG
from surgery.model.tiny import build_tiny_clip, tiny_config


def _save_torch(model, path, *, wrap=None, prefix="", legacy=False):
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    obj = {wrap: sd, "epoch": 3} if wrap else sd
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


# ---------------------------------------------------------------- formats, inferred architecture
@pytest.mark.parametrize(
    "suffix, wrap, prefix, legacy",
    [
        (".pt", None, "", False),  # plain state dict
        (".pth", "state_dict", "", False),  # training checkpoint wrapper
        (".bin", "state_dict", "module.", False),  # DDP prefixes inside the wrapper
        (".pt", None, "module.", True),  # legacy (non-zip) torch.save format
    ],
)
def test_torch_state_dicts_load_equal(tmp_path, tiny, images, tokens, registered_tiny, suffix, wrap, prefix, legacy):
    model, _ = tiny
    path = tmp_path / f"ckpt{suffix}"
    _save_torch(model, path, wrap=wrap, prefix=prefix, legacy=legacy)
    loaded = surgery.load(str(path))
    assert loaded.arch == registered_tiny  # inferred from shapes; plain name preferred over -quickgelu
    assert loaded.format == "torch"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_embeddings(model, loaded.model, images, tokens, atol=0)


def test_safetensors_plain_infers_arch(tmp_path, tiny, images, tokens, registered_tiny):
    model, _ = tiny
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = surgery.load(str(path))
    assert loaded.arch == registered_tiny and loaded.format == "safetensors"
    assert_same_embeddings(model, loaded.model, images, tokens, atol=0)


def test_safetensors_with_embedded_config_needs_no_registry(tmp_path, tiny, images, tokens):
    model, cfg = tiny
    path = tmp_path / "m.safetensors"
    meta = {META_MODEL_CONFIG: json.dumps(cfg), META_ARCH: "my-tiny", "clipsurgery.world": json.dumps({"seed": 3})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    loaded = surgery.load(str(path))
    assert loaded.arch == "my-tiny"
    assert loaded.metadata == {"world": {"seed": 3}}
    assert_same_embeddings(model, loaded.model, images, tokens, atol=0)


def test_sidecar_open_clip_config(tmp_path, tiny, images, tokens):
    model, cfg = tiny
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3}}))
    path = tmp_path / "open_clip_pytorch_model.bin"
    _save_torch(model, path)
    loaded = surgery.load(str(path))
    assert loaded.preprocess["mean"] == [0.5] * 3
    assert_same_embeddings(model, loaded.model, images, tokens, atol=0)


def test_openai_torchscript_archive_is_read_without_running_it(tmp_path, images, tokens, registered_tiny, monkeypatch):
    model, _ = build_tiny_clip(seed=2, quick_gelu=True)
    path = tmp_path / "openai.pt"
    torch.jit.script(model).save(str(path))

    def forbidden(*args, **kwargs):  # the reader must never compile or run the archive
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    loaded = surgery.load(str(path))
    assert loaded.format == "torchscript"
    assert loaded.arch == f"{registered_tiny}-quickgelu"  # OpenAI archives are QuickGELU models
    assert loaded.config.get("quick_gelu") is True
    assert_same_embeddings(model, loaded.model, images, tokens, atol=0)


def test_torchscript_reader_matches_torch_jit(tmp_path, tiny):
    from surgery.io.torchscript import read_torchscript_state_dict

    model, _ = tiny
    path = tmp_path / "ts.pt"
    torch.jit.script(model).save(str(path))
    ours = read_torchscript_state_dict(str(path))
    theirs = torch.jit.load(str(path)).state_dict()  # trusted: the test wrote this file
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_arch_override_and_precision(tmp_path, tiny, registered_tiny):
    model, _ = tiny
    path = tmp_path / "m.pt"
    _save_torch(model, path)
    loaded = surgery.load(str(path), arch=f"{registered_tiny}-quickgelu", precision="fp16")
    assert loaded.arch == f"{registered_tiny}-quickgelu"
    assert loaded.dtype == torch.float16
    assert loaded.config["quick_gelu"] is True


def test_quickgelu_twin_ambiguity_is_logged(tmp_path, tiny, registered_tiny, caplog):
    model, _ = tiny
    path = tmp_path / "m.pt"
    _save_torch(model, path)
    with caplog.at_level("WARNING"):
        surgery.load(str(path))
    assert "Tiny-Test-quickgelu" in caplog.text and "--arch" in caplog.text


def test_hf_hub_source_uses_hub_config_and_weights(tmp_path, tiny, images, tokens, monkeypatch):
    model, cfg = tiny
    repo = tmp_path / "hub"
    repo.mkdir()
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"interpolation": "bilinear"}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(repo / "open_clip_model.safetensors"))
    asked = []

    def fake_download(model_id, filename, **kwargs):  # stands in for the network only
        asked.append((model_id, filename))
        return str(repo / filename)

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", fake_download)
    loaded = surgery.load("hf-hub:someorg/tiny-clip")
    assert asked == [("someorg/tiny-clip", "open_clip_config.json"), ("someorg/tiny-clip", "open_clip_model.safetensors")]
    assert loaded.preprocess["interpolation"] == "bilinear"
    assert loaded.source == "hf-hub:someorg/tiny-clip"
    assert_same_embeddings(model, loaded.model, images, tokens, atol=0)


def test_registry_name_with_pretrained_tag(tmp_path, tiny, images, tokens, registered_tiny, monkeypatch):
    model, _ = tiny
    weights = tmp_path / "weights.bin"
    _save_torch(model, weights)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["mytag"])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"url": "x", "quick_gelu": False, "mean": (0.1, 0.2, 0.3)})
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg, **kw: str(weights))
    loaded = surgery.load(f"{registered_tiny}:mytag")
    assert loaded.arch == registered_tiny
    assert loaded.preprocess["mean"] == [0.1, 0.2, 0.3]
    assert_same_embeddings(model, loaded.model, images, tokens, atol=0)
    with pytest.raises(SurgeryError, match="no pretrained tag 'other'.*mytag"):
        surgery.load(f"{registered_tiny}:other")
    with pytest.raises(SurgeryError, match="architecture only"):
        surgery.load(registered_tiny)


def test_builtin_tiny():
    loaded = surgery.load("builtin:tiny")
    assert loaded.format == "builtin" and loaded.sha256 is None
    assert loaded.config == tiny_config()


# ----------------------------------------------------------------------------------- bad input
def test_state_dict_of_another_model(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4)).state_dict(), path)
    with pytest.raises(ArchitectureError, match="not an open_clip CLIP state dict"):
        surgery.load(str(path))


def test_near_miss_lists_closest_configs(tmp_path, registered_tiny):
    model, _ = build_tiny_clip(text_cfg={"layers": 3})
    path = tmp_path / "m.pt"
    _save_torch(model, path)
    with pytest.raises(ArchitectureError, match=r"closest: Tiny-Test.*text_layers: weights 3, config 2"):
        surgery.load(str(path))


def test_wrong_arch_names_the_mismatch(tmp_path, tiny, registered_tiny):
    model, _ = build_tiny_clip(vision_cfg={"width": 48, "head_width": 16})
    path = tmp_path / "m.pt"
    _save_torch(model, path)
    with pytest.raises(ArchitectureError, match="do not fit Tiny-Test.*of other shape"):
        surgery.load(str(path), arch=registered_tiny)
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        surgery.load(str(path), arch="No-Such-Arch")


def test_resnet_tower_is_named(tmp_path):
    cfg = tiny_config(vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 64, "head_width": 8})
    from surgery.model.arch import build_model

    model = build_model(cfg)
    path = tmp_path / "rn.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(UnsupportedTowerError, match="ModifiedResNet"):
        surgery.load(str(path))
    cfg_path = tmp_path / "rn.json"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedTowerError, match="ModifiedResNet"):
        surgery.load(str(path), arch=str(cfg_path))
    with pytest.raises(UnsupportedTowerError, match="ModifiedResNet"):
        surgery.get_towers(model)


def test_timm_and_hf_configs_are_refused_by_name():
    from surgery.model.arch import check_supported, get_config

    with pytest.raises(UnsupportedTowerError, match="timm model"):
        check_supported(get_config("convnext_base"), "convnext_base")
    with pytest.raises(UnsupportedTowerError, match="Hugging Face"):
        check_supported(get_config("xlm-roberta-base-ViT-B-32"), "xlm-roberta-base-ViT-B-32")


def test_unknown_source_and_precision():
    with pytest.raises(SurgeryError, match="neither a file nor a known model"):
        surgery.load("Not-A-Model")
    with pytest.raises(SurgeryError, match="unknown precision"):
        surgery.load("builtin:tiny", precision="int3")
