"""SurgeryPlan: the one object that says what surgery a model gets.

A versioned JSON document, written by the audit and neuron search and edited by hand too, so it
is validated with errors that name the entry and the allowed values::

    {
      "schema": "clipsurgery.plan/1",
      "source": {"arch": "ViT-B-32", "sha256": "<of the checkpoint the plan was made for>"},
      "heads": [
        {"tower": "vision", "layer": 10, "head": 3, "scale": 0.0, "ablation": "zero"},
        {"tower": "vision", "layer": 11, "head": 7, "scale": 0.5, "ablation": "mean", "mean": [... head_dim floats]}
      ],
      "balance": [
        {"tower": "text", "u": [[... r floats] x D], "v": [[... r floats] x D], "provenance": {...}}
      ],
      "provenance": {"method": "...", "created": "...", ...}
    }

``scale`` in [0, 1] multiplies the head's output; ``ablation: zero`` with scale 0 is seed 002's
soft-pruning (the head's out_proj columns set to 0). ``ablation: mean`` replaces the removed part by
the head's mean output over a probe set: ``z_h -> s * z_h + (1 - s) * mean_h``.

A balance edit is a fixed low-rank map of one tower's output embedding, ``e -> (I + U V^T) e``
(``U``, ``V``: (D, r)), applied right after the tower's projection (before any neuron edit at the
embedding site), so that it folds exactly into ``visual.proj`` / ``text_projection``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from surgery.errors import PlanError, SurgeryError
from surgery.io.checkpoint import state_dict_hash
from surgery.io.fs import write_text_atomic
from surgery.model.towers import TOWERS, get_towers
from surgery.sae.activations import Site, site_width
from surgery.sae.model import read_sae_config

log = logging.getLogger(__name__)

SCHEMA = "clipsurgery.plan/3"
#: Plans this version reads: /1 had no balance edits, /2 no open balance.
READABLE_SCHEMAS = ("clipsurgery.plan/1", "clipsurgery.plan/2", SCHEMA)
#: The most bank images an open balance carries (each text is scored against all of them).
MAX_OPEN_BANK = 8192
ABLATIONS = ("zero", "mean")


#: Most digits a plan's integer may have (layer, head and latent indices are small): json would
#: otherwise convert a 5,000-digit number, or fail with Python's own limit message.
MAX_INT_DIGITS = 30


class _LongNumber(ValueError):
    pass


def _plan_int(text: str) -> int:
    """``parse_int`` for plan files: refuses absurdly long integers before converting them."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _LongNumber(digits)
    return int(text)


@dataclass
class HeadEdit:
    tower: str  # "vision" | "text"
    layer: int  # block index, 0-based
    head: int  # head index within the block, 0-based
    scale: float = 0.0  # kept fraction of the head's output, in [0, 1]
    ablation: str = "zero"  # "zero" | "mean"
    mean: list[float] | None = None  # (head_dim,) mean head output over the probe set, for "mean"

    def validate(self, where: str) -> None:
        if self.tower not in TOWERS:
            raise PlanError(f"{where}: unknown tower {self.tower!r}; use one of {', '.join(TOWERS)}")
        for name in ("layer", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanError(f"{where}: {name} must be an integer >= 0, got {value!r}")
        if not _finite(self.scale) or not 0.0 <= self.scale <= 1.0:
            raise PlanError(f"{where}: scale must be in [0, 1], got {self.scale!r}")
        if self.ablation not in ABLATIONS:
            raise PlanError(f"{where}: ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if self.ablation == "mean" and self.mean is None:
            raise PlanError(f"{where}: ablation 'mean' needs the head's mean output ('mean': [head_dim floats])")
        if self.mean is not None and (not isinstance(self.mean, list) or not all(_finite(v) for v in self.mean)):
            raise PlanError(f"{where}: mean must be a list of finite numbers (no NaN, inf or strings)")
        if self.ablation == "zero" and self.mean is not None:
            raise PlanError(f"{where}: 'mean' is only used with ablation 'mean'; remove it or set ablation to 'mean'")


NEURON_FORMS = ("paper", "error_preserving")
NEURON_SITES = ("residual", "embedding")


@dataclass
class NeuronEdit:
    tower: str  # "vision" | "text"
    sae: str  # folder of the SAE (weights.safetensors + cfg.json) the latent ids refer to
    ids: list[int]  # latents to deactivate ("social neurons")
    alpha: float = 0.6  # mixing weight a in [0, 1] (seed 001: 0.6 by default)
    form: str = "paper"  # "paper": h' = (1-a) h + a dec(enc(h) without S); "error_preserving"
    site: str = "residual"  # where the SAE was trained: "residual" (all tokens before the final norm) or "embedding"
    kind: str | None = None  # the SAE's activation (batchtopk | topk | relu), recorded when baked
    k: int | None = None  # the SAE's k (TopK kinds), recorded when baked

    def validate(self, where: str) -> None:
        if self.tower not in TOWERS:
            raise PlanError(f"{where}: unknown tower {self.tower!r}; use one of {', '.join(TOWERS)}")
        if not isinstance(self.ids, list) or not self.ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.ids):
            raise PlanError(f"{where}: ids must be a non-empty list of latent indices >= 0")
        if not isinstance(self.sae, str) or not self.sae:
            raise PlanError(f"{where}: sae must be the path of an SAE folder, got {self.sae!r}")
        if not _finite(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise PlanError(f"{where}: alpha must be in [0, 1], got {self.alpha!r}")
        if self.form not in NEURON_FORMS:
            raise PlanError(f"{where}: form must be one of {', '.join(NEURON_FORMS)}, got {self.form!r}")
        if self.site not in NEURON_SITES:
            raise PlanError(f"{where}: site must be one of {', '.join(NEURON_SITES)}, got {self.site!r}")

    def check_files(self, where: str) -> dict:
        """The SAE folder exists and was trained where this edit acts; returns the SAE's config."""
        for name in ("weights.safetensors", "cfg.json"):
            if not os.path.isfile(os.path.join(self.sae, name)):
                raise PlanError(f"{where}: SAE file {os.path.join(self.sae, name)} is missing; "
                                "point 'sae' at the folder written by clipsurgery sae train")
        try:
            config = read_sae_config(self.sae)["config"]
        except SurgeryError as exc:
            raise PlanError(f"{where}: {exc}") from None
        self.check_sae(config, where)
        return config

    def check_sae(self, config: dict, where: str) -> None:
        """Refuse an SAE trained at another tower or site than this edit names: its latents would be
        read from (and subtracted from) activations they were never trained on."""
        trained = (config.get("tower"), config.get("site"))
        if trained != (self.tower, self.site):
            raise PlanError(f"{where}: the SAE in {self.sae} was trained on {trained[0]}/{trained[1]} activations, "
                            f"but the edit acts on {self.tower}/{self.site}; set the edit's tower and site to the "
                            "SAE's, or train an SAE there")


@dataclass
class BalanceEdit:
    tower: str  # "vision" | "text": whose output embedding the map acts on
    u: list[list[float]]  # (D, r): the map is e -> e + U (V^T e)
    v: list[list[float]]  # (D, r)
    provenance: dict[str, Any] = field(default_factory=dict)  # queries, groups, probe, fit statistics

    @property
    def dim(self) -> int:
        return len(self.u)

    @property
    def rank(self) -> int:
        return len(self.u[0]) if self.u else 0

    def validate(self, where: str) -> None:
        if self.tower not in TOWERS:
            raise PlanError(f"{where}: unknown tower {self.tower!r}; use one of {', '.join(TOWERS)}")
        if not isinstance(self.provenance, dict):
            raise PlanError(f"{where}: provenance must be a JSON object, got {type(self.provenance).__name__}")
        for name in ("u", "v"):
            _matrix(getattr(self, name), f"{where}: {name}", "D x r")
        if (len(self.u), len(self.u[0])) != (len(self.v), len(self.v[0])):
            raise PlanError(f"{where}: u is {len(self.u)} x {len(self.u[0])} but v is {len(self.v)} x {len(self.v[0])};"
                            " they must have the same shape (D x r)")
        if self.rank > self.dim:
            raise PlanError(f"{where}: rank {self.rank} is above the embedding width {self.dim}")
        bound = self.rank_bound()
        if bound is not None and self.rank > bound:
            raise PlanError(f"{where}: rank {self.rank} is above queries x (groups - 1) = {bound} of its provenance")

    def rank_bound(self) -> int | None:
        """queries x (groups - 1) when the provenance names them (the most constraints a fit has)."""
        queries, groups = self.provenance.get("queries"), self.provenance.get("groups")
        if isinstance(queries, list) and isinstance(groups, list) and len(groups) >= 2:
            return len(queries) * (len(groups) - 1)
        return None


@dataclass
class OpenBalanceEdit:
    """The open-vocabulary balance (surgery.model.open_balance): a per-text closed-form correction of
    the text embedding toward equal evidence in every group's nearest bank images, gated off for
    texts that name a group. Applied after the text projection (and after a fixed balance map)."""

    tower: str  # "text" (the only tower it acts on)
    bank: list[list[float]]  # (n, D) L2-normalised image embeddings, sorted by group
    group_counts: list[int]  # (G,) bank rows per group, in group order
    contrast: list[list[float]]  # (G, D) normalised group prompts minus their mean
    neighbours: int  # M: each group's nearest bank images a text is balanced on
    lean_ref: float  # the group prompts' own mean lean (the lean unit)
    gate_lo: float  # texts leaning at most this are corrected fully
    gate_hi: float  # texts leaning at least this are left alone (they name a group)
    iterations: int = 1  # neighbourhoods re-chosen under the corrected text
    provenance: dict[str, Any] = field(default_factory=dict)  # bank source, gate calibration, held-out figures

    @property
    def dim(self) -> int:
        return len(self.bank[0]) if self.bank and isinstance(self.bank[0], list) else 0

    def validate(self, where: str) -> None:
        if self.tower != "text":
            raise PlanError(f"{where}: the open balance acts on the text tower only, got tower {self.tower!r}")
        _matrix(self.bank, f"{where}: bank", "n x D")
        _matrix(self.contrast, f"{where}: contrast", "G x D")
        if len(self.bank) > MAX_OPEN_BANK:
            raise PlanError(f"{where}: the bank has {len(self.bank)} images; at most {MAX_OPEN_BANK} are allowed")
        if len(self.contrast[0]) != self.dim:
            raise PlanError(f"{where}: contrast rows have {len(self.contrast[0])} numbers, bank rows {self.dim}")
        counts = self.group_counts
        if not isinstance(counts, list) or len(counts) < 2 or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
            raise PlanError(f"{where}: group_counts must list two or more positive integers (bank rows per group)")
        if sum(counts) != len(self.bank) or len(counts) != len(self.contrast):
            raise PlanError(f"{where}: group_counts {counts} must add up to the bank's {len(self.bank)} rows and "
                            f"have one entry per contrast row ({len(self.contrast)})")
        for name, low in (("neighbours", 1), ("iterations", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PlanError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
        if self.neighbours > min(counts):
            raise PlanError(f"{where}: neighbours {self.neighbours} is more than the smallest group's "
                            f"{min(counts)} bank images")
        for name in ("lean_ref", "gate_lo", "gate_hi"):
            if not _finite(getattr(self, name)):
                raise PlanError(f"{where}: {name} must be a finite number, got {getattr(self, name)!r}")
        if not self.lean_ref > 0:
            raise PlanError(f"{where}: lean_ref must be > 0, got {self.lean_ref}")
        if not self.gate_hi > self.gate_lo:
            raise PlanError(f"{where}: gate_hi ({self.gate_hi}) must be above gate_lo ({self.gate_lo})")
        if not isinstance(self.provenance, dict):
            raise PlanError(f"{where}: provenance must be a JSON object")

    def module_values(self) -> dict:
        """The plain values the model's module is rebuilt from (no bank, no provenance)."""
        return {"group_counts": list(self.group_counts), "neighbours": self.neighbours, "lean_ref": self.lean_ref,
                "gate_lo": self.gate_lo, "gate_hi": self.gate_hi, "iterations": self.iterations}


def _matrix(rows: Any, where: str, shape: str = "n x D") -> None:
    """A plan's matrix: a non-empty list of equally long rows of finite numbers (``shape`` names it)."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise PlanError(f"{where} must be a non-empty list of rows ({shape} numbers)")
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise PlanError(f"{where} must have rows of one length >= 1 (a {shape} matrix)")
    if not all(_finite(x) for r in rows for x in r):
        raise PlanError(f"{where} must hold finite numbers only (no NaN, inf or strings)")


def _parse_edits(items: Any, name: str, cls: type, required: tuple[str, ...]) -> list:
    """Dicts -> edit dataclasses, with errors naming the entry, unknown keys and missing keys."""
    if not isinstance(items, list):
        raise PlanError(f"'{name}' must be a list of edits")
    allowed = set(cls.__dataclass_fields__)
    edits = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PlanError(f"{name}[{i}] must be an object with {', '.join(required)}")
        extra = sorted(set(item) - allowed)
        if extra:
            raise PlanError(f"{name}[{i}]: unknown keys {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")
        missing = [k for k in required if k not in item]
        if missing:
            raise PlanError(f"{name}[{i}]: missing {', '.join(missing)}")
        edits.append(cls(**item))
    return edits


@dataclass
class SurgeryPlan:
    source: dict[str, Any] = field(default_factory=dict)  # {"arch", "sha256"} of the model it was made for
    heads: list[HeadEdit] = field(default_factory=list)
    neurons: list[NeuronEdit] = field(default_factory=list)  # SAE latent deactivations
    balance: list[BalanceEdit] = field(default_factory=list)  # low-rank maps of an output embedding, one per tower
    open_balance: list[OpenBalanceEdit] = field(default_factory=list)  # at most one: the text tower's open balance
    provenance: dict[str, Any] = field(default_factory=dict)  # how the edits were chosen
    schema: str = SCHEMA

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> "SurgeryPlan":
        if self.schema not in READABLE_SCHEMAS:
            raise PlanError(f"unsupported plan schema {self.schema!r}; this version reads {', '.join(READABLE_SCHEMAS)}")
        seen = set()
        for i, edit in enumerate(self.heads):
            edit.validate(f"heads[{i}]")
            key = (edit.tower, edit.layer, edit.head)
            if key in seen:
                raise PlanError(f"heads[{i}]: {edit.tower} layer {edit.layer} head {edit.head} appears twice; keep one")
            seen.add(key)
        places = set()
        for i, edit in enumerate(self.neurons):
            edit.validate(f"neurons[{i}]")
            if (edit.tower, edit.site) in places:
                raise PlanError(f"neurons[{i}]: a second edit at {edit.tower}/{edit.site}; merge the ids into one edit")
            places.add((edit.tower, edit.site))
        towers = set()
        for i, edit in enumerate(self.balance):
            edit.validate(f"balance[{i}]")
            if edit.tower in towers:
                raise PlanError(f"balance[{i}]: a second balance edit of the {edit.tower} tower; fit one map per tower")
            towers.add(edit.tower)
        for i, edit in enumerate(self.open_balance):
            edit.validate(f"open_balance[{i}]")
        if len(self.open_balance) > 1:
            raise PlanError("open_balance: a plan holds at most one open balance (of the text tower)")
        if self.open_balance and any(n.tower == "text" and n.site == "embedding" for n in self.neurons):
            raise PlanError("open_balance: a plan cannot also carry a neuron edit at the text embedding site")
        return self

    @property
    def empty(self) -> bool:
        """No edit of any kind."""
        return not (self.heads or self.neurons or self.balance or self.open_balance)

    def check_fits(self, model, sha256: str | None, *, force: bool = False) -> None:
        """Raise unless every edit addresses an existing head and the plan was made for this model."""
        planned = self.source.get("sha256")
        if planned and sha256 and planned != sha256:
            if not force:
                raise PlanError(
                    f"plan was made for a checkpoint with sha256 {planned[:12]}..., not this one ({sha256[:12]}...); "
                    "pass --force to apply it anyway"
                )
            log.warning("plan was made for a checkpoint with sha256 %s..., not this one (%s...); applying it "
                        "anyway (--force)", planned[:12], sha256[:12])
        towers = get_towers(model)
        for i, edit in enumerate(self.heads):
            view = towers[edit.tower]
            if edit.layer >= view.n_layers:
                raise PlanError(f"heads[{i}]: {edit.tower} layer {edit.layer} is out of range (0..{view.n_layers - 1})")
            if edit.head >= view.n_heads:
                raise PlanError(f"heads[{i}]: head {edit.head} is out of range (0..{view.n_heads - 1})")
            if edit.mean is not None and len(edit.mean) != view.head_dim:
                raise PlanError(f"heads[{i}]: mean has {len(edit.mean)} values; the head width is {view.head_dim}")
        model_hash = None
        for i, edit in enumerate(self.neurons):
            where = f"neurons[{i}]"
            config = edit.check_files(where)
            width = site_width(model, Site(edit.tower, edit.site))
            if config.get("d_in") != width:
                raise PlanError(f"{where}: the SAE in {edit.sae} reads {config.get('d_in')}-wide activations; "
                                f"{edit.tower}/{edit.site} of this model is {width} wide")
            if config.get("model_hash"):
                model_hash = model_hash or state_dict_hash(model)
                if config["model_hash"] != model_hash:
                    if not force:
                        raise PlanError(f"{where}: the SAE in {edit.sae} was trained on another model's activations "
                                        f"(weights hash {str(config['model_hash'])[:12]}, this model "
                                        f"{model_hash[:12]}); pass --force to apply it anyway")
                    log.warning("%s: the SAE was trained on another model's activations; applying it anyway (--force)",
                                where)
        for i, edit in enumerate(self.balance):
            view = towers[edit.tower]
            if view.projection is None:
                raise PlanError(f"balance[{i}]: the {edit.tower} tower has no output projection to fold the map into")
            width = _embedding_width(view)
            if edit.dim != width:
                raise PlanError(f"balance[{i}]: the map is {edit.dim}-dimensional but the {edit.tower} embedding has "
                                f"{width} dimensions; the plan was fit for another model")
        for i, edit in enumerate(self.open_balance):
            width = _embedding_width(towers["text"])
            if width is not None and edit.dim != width:
                raise PlanError(f"open_balance[{i}]: the bank is {edit.dim}-dimensional but the text embedding has "
                                f"{width} dimensions; the plan was fit for another model")

    # ---------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        out = {"schema": self.schema, "source": self.source, "heads": [asdict(h) for h in self.heads],
               "neurons": [asdict(n) for n in self.neurons]}
        if self.balance:
            out["balance"] = [asdict(b) for b in self.balance]
        if self.open_balance:
            out["open_balance"] = [asdict(b) for b in self.open_balance]
        out["provenance"] = self.provenance
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "SurgeryPlan":
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object with 'schema', 'source' and 'heads'")
        unknown = sorted(set(data) - {"schema", "source", "heads", "neurons", "balance", "open_balance", "provenance"})
        if unknown:
            raise PlanError(f"unknown plan keys {', '.join(unknown)}; allowed: schema, source, heads, neurons, "
                            "balance, open_balance, provenance")
        for key in ("source", "provenance"):
            if not isinstance(data.get(key, {}), dict):
                raise PlanError(f"'{key}' must be a JSON object, got {type(data[key]).__name__}")
        for key in ("sha256", "arch"):
            value = data.get("source", {}).get(key)
            if value is not None and not isinstance(value, str):
                raise PlanError(f"'source.{key}' must be a string (the checkpoint's {key}), got "
                                f"{type(value).__name__} {str(value)[:20]}")
        if not isinstance(data.get("schema", ""), str):
            raise PlanError(f"'schema' must be a string such as {SCHEMA!r}")
        edits = _parse_edits(data.get("heads", []), "heads", HeadEdit, ("tower", "layer", "head"))
        neurons = _parse_edits(data.get("neurons", []) or [], "neurons", NeuronEdit, ("tower", "sae", "ids"))
        balance = _parse_edits(data.get("balance", []) or [], "balance", BalanceEdit, ("tower", "u", "v"))
        open_balance = _parse_edits(data.get("open_balance", []) or [], "open_balance", OpenBalanceEdit,
                                    ("tower", "bank", "group_counts", "contrast", "neighbours", "lean_ref", "gate_lo",
                                     "gate_hi"))
        plan = cls(source=dict(data.get("source", {})), heads=edits, neurons=neurons, balance=balance,
                   open_balance=open_balance, provenance=dict(data.get("provenance", {})), schema=data.get("schema", ""))
        return plan.validate()

    @classmethod
    def load(cls, path: str) -> "SurgeryPlan":
        if os.path.isdir(path):
            raise PlanError(f"{path} is a folder, not a plan file; give the plan's .json file")
        if not os.path.isfile(path):
            raise PlanError(f"plan file {path} does not exist; check the path")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh, parse_int=_plan_int)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        except _LongNumber as exc:
            raise PlanError(f"{path} holds a {exc.args[0]}-digit integer; no plan number is that long") from None
        except UnicodeDecodeError:
            raise PlanError(f"{path} is not UTF-8 text; a plan is a JSON file") from None
        except RecursionError:
            raise PlanError(f"{path} is nested too deeply to be a plan (JSON deeper than "
                            f"{sys.getrecursionlimit()} levels); a plan is a flat JSON object") from None
        try:
            plan = cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None
        folder = os.path.dirname(os.path.abspath(path))
        for edit in plan.neurons:  # a relative SAE path is relative to the plan file, not to where it runs
            if not os.path.isabs(edit.sae):
                edit.sae = os.path.relpath(os.path.join(folder, edit.sae))
        return plan

    def save(self, path: str) -> None:
        """Write the plan as JSON; relative SAE paths are stored relative to the plan's folder."""
        self.validate()
        data = self.to_dict()
        folder = os.path.dirname(os.path.abspath(path))
        for edit in data["neurons"]:
            if not os.path.isabs(edit["sae"]):
                edit["sae"] = os.path.relpath(os.path.abspath(edit["sae"]), folder)
        write_text_atomic(path, json.dumps(data, indent=2) + "\n")

    def merged(self, other: "SurgeryPlan", *, stacked: bool = False) -> "SurgeryPlan":
        """This plan's edits plus ``other``'s; a head in both is an error.

        ``stacked``: ``other`` was made for the model that this plan produced (a second bake on
        top of a patched checkpoint), so their sources differ by design; the result keeps this
        plan's source (the original checkpoint).
        """
        if not stacked and self.source.get("sha256") and other.source.get("sha256") \
                and self.source["sha256"] != other.source["sha256"]:
            raise PlanError("cannot merge plans made for different checkpoints (sha256 differs)")
        late = {b.tower for b in other.balance} & {n.tower for n in self.neurons if n.site == "embedding"}
        if stacked and late:
            raise PlanError(f"cannot stack a {sorted(late)[0]} balance edit on a plan with a neuron edit at that "
                            "tower's embedding site: baked together, the balance would act before the neurons")
        merged = SurgeryPlan(source=self.source or other.source, heads=[*self.heads, *other.heads],
                             neurons=[*self.neurons, *other.neurons], balance=[*self.balance, *other.balance],
                             open_balance=[*self.open_balance, *other.open_balance], provenance={"merged": [self.provenance, other.provenance], "stacked": stacked})
        return merged.validate()

    def head_scales(self, tower: str, n_layers: int, n_heads: int, dtype=None):
        """(L, H) tensor of scales (1 where no edit) for the runtime-masked model, in ``dtype``
        (default float32; a float64 model needs float64 scales: 0.3 in float32 is 0.3 + 1.2e-8)."""
        import torch

        scales = torch.ones(n_layers, n_heads, dtype=dtype or torch.float32)
        for edit in self.heads:
            if edit.tower == tower:
                scales[edit.layer, edit.head] = edit.scale
        return scales


def _embedding_width(view) -> int | None:
    """The width of a tower's output embedding (its projection's output), None without a projection."""
    proj = view.projection
    if proj is None:
        return None
    return proj.out_features if hasattr(proj, "out_features") else int(proj.shape[1])


def _finite(value: Any) -> bool:
    """A real number (not a bool, not a string) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
