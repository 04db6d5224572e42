"""Saving a world model: safetensors with its config, world parameters and quality figures.

The world parameters travel inside the checkpoint (metadata key ``clipsurgery.world``) and in a
``world_params.json`` beside it, so ``--like MODEL`` can regenerate the model's world.
"""
from __future__ import annotations

import os
from dataclasses import asdict

from torch import nn

from surgery.io.checkpoint import write_safetensors
from surgery.io.fs import atomic_output
from surgery.io.metadata import META_ARCH, META_MODEL_CONFIG, META_PREPROCESS, META_QUALITY, META_TRAINING, META_WORLD
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import default_preprocess
from surgery.world.params import PARAMS_JSON as WORLD_PARAMS_FILE
from surgery.world.params import WorldParams, load_params, save_params
from surgery.world.train import WORLD_ARCH, WORLD_MODEL_CONFIG, WorldQuality


def save_world_model(model: nn.Module, params: WorldParams, path: str, *, history: dict,
                     quality: WorldQuality) -> None:
    """Write ``path`` (.safetensors) and ``world_params.json`` beside it, atomically each."""
    metadata = {
        META_MODEL_CONFIG: WORLD_MODEL_CONFIG,
        META_ARCH: WORLD_ARCH,
        META_WORLD: params.to_dict(),
        META_PREPROCESS: default_preprocess(WORLD_MODEL_CONFIG),
        META_TRAINING: history,
        META_QUALITY: asdict(quality),
    }
    write_safetensors(model.state_dict(), path, metadata)
    sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), WORLD_PARAMS_FILE)
    with atomic_output(sidecar) as tmp:
        save_params(params, tmp)


def world_params_of(loaded: LoadedModel) -> WorldParams | None:
    """The world a model was trained on: from its metadata, else a world_params.json beside it."""
    if "world" in loaded.metadata:
        return WorldParams.from_dict(loaded.metadata["world"])
    if os.path.isfile(loaded.source):
        folder = os.path.dirname(os.path.abspath(loaded.source))
        if os.path.isfile(os.path.join(folder, WORLD_PARAMS_FILE)):
            return load_params(folder)
    return None
