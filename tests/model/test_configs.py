"""Model configs live as JSON files beside the code (surgery/model/configs/), as open_clip keeps its."""
from __future__ import annotations

import json

import pytest

from surgery.errors import ArchitectureError
from surgery.model.arch import CONFIG_DIR, bundled_config
from surgery.model.tiny import TINY_CONFIG, build_tiny_clip
from surgery.world.train import WORLD_ARCH, WORLD_MODEL_CONFIG


def test_bundled_configs_are_the_json_files():
    with open(f"{CONFIG_DIR}/clipsurgery-tiny.json", encoding="utf-8") as f:
        assert json.load(f) == TINY_CONFIG
    assert bundled_config(WORLD_ARCH) == WORLD_MODEL_CONFIG
    assert WORLD_MODEL_CONFIG["vision_cfg"]["layers"] == 4 and WORLD_MODEL_CONFIG["text_cfg"]["context_length"] == 12


def test_each_call_gives_a_fresh_copy():
    cfg = bundled_config("clipsurgery-tiny")
    cfg["vision_cfg"]["layers"] = 99
    assert bundled_config("clipsurgery-tiny")["vision_cfg"]["layers"] == 2


def test_the_tiny_model_is_built_from_its_json():
    model, cfg = build_tiny_clip(seed=0)
    assert cfg == TINY_CONFIG
    assert len(model.visual.transformer.resblocks) == TINY_CONFIG["vision_cfg"]["layers"]


def test_unknown_config_names_the_known_ones():
    with pytest.raises(ArchitectureError, match="no bundled model config 'nope'; known: clipsurgery-tiny"):
        bundled_config("nope")
