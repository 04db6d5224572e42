"""benchmarks/world_suite.py's model cache: a world retrained with other options is never reused."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

from surgery.io.checkpoint import write_safetensors
from surgery.io.metadata import META_TRAINING, META_WORLD

SUITE_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "world_suite.py"


def _suite(monkeypatch, tmp_path=None):
    """benchmarks/world_suite.py as a module (registered: its dataclasses need it), caching in tmp_path."""
    if tmp_path is not None:
        monkeypatch.setenv("CLIPSURGERY_SUITE_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location("world_suite", SUITE_PY)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "world_suite", module)
    spec.loader.exec_module(module)
    return module


def _cache(suite, world, options: dict) -> None:
    write_safetensors({"w": torch.zeros(1)}, suite.model_path(world),
                      {META_WORLD: suite.world_params(world).to_dict(), META_TRAINING: {"options": options}})


def test_a_cached_world_is_current_only_with_its_parameters_and_training_options(monkeypatch, tmp_path):
    suite = _suite(monkeypatch, tmp_path)
    world = next(w for w in suite.SUITE if w.weak)  # trained with its own options (fewer epochs)
    assert not suite.is_current(world)  # nothing cached
    options = dataclasses.asdict(suite.train_options(world))
    _cache(suite, world, options)
    assert suite.is_current(world)
    _cache(suite, world, {**options, "epochs": options["epochs"] + 1})  # retrained with other options
    assert not suite.is_current(world)
    _cache(suite, world, {})  # a model saved without its options (older files): not trusted either
    assert not suite.is_current(world)
    other = dataclasses.replace(world, params={**world.params, "bias_strength": 0.9})
    _cache(suite, world, options)
    assert not suite.is_current(other)  # the same name with other world parameters


def test_every_suite_world_has_a_role_and_the_new_worlds_are_apart(monkeypatch):
    module = _suite(monkeypatch)
    roles = {w.name: w.role for w in module.SUITE}
    assert set(roles.values()) == {"dev", "seen", "new", "open"}
    assert sum(r == "new" for r in roles.values()) >= 2
