"""Every path a debias run writes, checked before any work, and what ``--force`` may remove.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from surgery.edit.plan import SurgeryPlan
from surgery.errors import SurgeryError
from surgery.io.fs import check_output_folder, check_output_path
from surgery.io.onnx import onnx_paths
from surgery.sae.model import CONFIG_FILE, WEIGHTS_FILE

SAE_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what an SAE folder the run writes holds: all --force ever removes there


@dataclass(frozen=True)
class Outputs:
    """Every path a run writes, checked before any work starts."""

    model: dict[str, str]  # {"vision"/"text": .onnx} or {"model": .safetensors}
    plan: str  # <stem>.plan.json
    report: str  # <stem>.report/
    sae: str  # <stem>.sae/

    @classmethod
    def of(cls, out: str, tower: str) -> Outputs:
        onnx = out.endswith(".onnx")
        stem = out[: -len(".onnx")] if onnx else out[: -len(".safetensors")]
        model = onnx_paths(out, tower) if onnx else {"model": out}
        return cls(model, f"{stem}.plan.json", f"{stem}.report", f"{stem}.sae")

    def check(self, model_in: str, force: bool, inputs: tuple = (), sae_needed: bool = True) -> None:
        """Refuse, before any work: an output that is an input (``inputs``: the probe's folder, labels,
        queries, group prompts), one that exists without ``force``, and (``sae_needed``: the run may
        train an SAE) an SAE folder holding files clipsurgery did not write (--force never removes them)."""
        for path in (*self.model.values(), self.plan):
            check_output_path(path, inputs=(model_in, *inputs), force=force)
        for folder in (self.report, self.sae):  # folders the run fills: refused now, not after minutes of work
            check_output_folder(folder, force=force)
        foreign = foreign_sae_files(self.sae)
        if foreign and sae_needed:
            raise SurgeryError(f"{self.sae} holds files clipsurgery did not write ({', '.join(foreign[:3])}"
                               f"{' ...' if len(foreign) > 3 else ''}); the run's SAE goes there and --force removes "
                               "only the tool's own files: move them away or choose another output")


def foreign_sae_files(folder: str) -> list[str]:
    """The entries of an SAE output folder that are not the files an SAE is saved as (sorted)."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name not in SAE_FILES)


def edited_towers(plan: SurgeryPlan) -> set[str]:
    """The towers ``plan`` changes."""
    return {edit.tower for edit in (*plan.heads, *plan.neurons, *plan.balance, *plan.open_balance)}


def check_exported_towers(out: str, tower: str, towers: set[str], every: bool = False) -> None:
    """Refuse an ONNX export of ``tower`` that would carry none (``every``: not all) of the edits in
    ``towers``: the shipped file would not be the debiased model the report measures."""
    if not out.endswith(".onnx") or tower == "both" or not towers:
        return
    left_out = sorted(t for t in towers if t != tower)
    if left_out and (every or tower not in towers):
        raise SurgeryError(f"the edits {'chosen' if every else 'asked for'} change the {' and '.join(left_out)} "
                           f"tower, which --tower {tower} does not export (the file would not carry them); pass "
                           + ("--tower both" if tower in towers else f"--tower {left_out[0]} or --tower both")
                           + ("; nothing was written" if every else ""))


def remove_previous(outputs: Outputs) -> None:
    """Remove an earlier run's plan and SAE (``Outputs.check`` allowed it: --force), so a new plan
    never sits beside an old SAE, nor an old plan beside a new SAE. Only the files clipsurgery
    writes are removed: the SAE folder itself goes only when nothing else is left in it."""
    if os.path.isfile(outputs.plan):
        os.remove(outputs.plan)
    if os.path.isdir(outputs.sae) and not os.path.islink(outputs.sae):
        for name in SAE_FILES:
            path = os.path.join(outputs.sae, name)
            if os.path.isfile(path) or os.path.islink(path):
                os.remove(path)
        if not os.listdir(outputs.sae):
            os.rmdir(outputs.sae)
