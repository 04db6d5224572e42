"""Export a (patched) CLIP as safetensors: both towers, the open_clip config, the plan, preprocessing
and tokenizer in the metadata, so :func:`surgery.load` reopens it without an --arch.
"""
from __future__ import annotations

from surgery.edit.plan import SurgeryPlan
from surgery.export.inputs import check_finite_outputs
from surgery.io.checkpoint import write_safetensors
from surgery.io.fs import check_output_path
from surgery.io.metadata import (
    META_ARCH,
    META_MODEL_CONFIG,
    META_PLAN,
    META_PREPROCESS,
    META_SOURCE,
    META_TOKENIZER,
    META_WORLD,
)
from surgery.model.loading import LoadedModel
from surgery.world.checkpoint import world_params_of


def model_metadata(loaded: LoadedModel, plan: SurgeryPlan | None) -> dict[str, object]:
    """What every exported file says about itself; a world model's world travels along, so the
    export can be gated (int8) or debiased again on draws of its own world."""
    world = world_params_of(loaded)
    return {
        META_MODEL_CONFIG: loaded.config,
        META_ARCH: loaded.arch,
        META_PREPROCESS: loaded.preprocess,
        META_TOKENIZER: loaded.tokenizer,
        META_PLAN: plan.to_dict() if plan else None,
        META_SOURCE: loaded.sha256 or "",
        META_WORLD: world.to_dict() if world is not None else None,
    }


def export_safetensors(loaded: LoadedModel, out: str, plan: SurgeryPlan | None = None, *, force: bool = False,
                       inputs: tuple = ()) -> str:
    """The whole (patched) model as one safetensors file with its config and plan in the metadata.
    ``inputs``: other files and folders the run read (a plan, its SAE, probe data): never overwritten."""
    check_output_path(out, inputs=(loaded.source, *inputs), force=force)
    check_finite_outputs(loaded)
    metadata = {k: v for k, v in model_metadata(loaded, plan).items() if v is not None}
    state = {k: v.float() if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()}
    write_safetensors(state, out, metadata)
    return out
