"""Concept Activation Vectors (CAVs) for protected attributes: zero-shot from text, or supervised.

A CAV set for one attribute with groups ``g = 0..G-1`` holds per-group *prototypes* ``p_g`` (D,) and
*directions* ``v_g = p_g - (1/G) sum_g' p_g'`` (D,): each group's prototype minus the unweighted
mean over groups, so the directions sum to 0 and span a (G-1)-dimensional subspace. Directions are
not rescaled (use :meth:`CAVs.unit_directions`); the scores in :mod:`surgery.audit.head_scores` use only
the subspace (:meth:`CAVs.basis`), so they do not depend on the scale.

* Zero-shot (seed 000): ``p_g = normalise(mean_i normalise(embed(prompt_{g,i})))`` — the normalised
  mean of the group's normalised prompt embeddings, the usual zero-shot class prototype.
* Supervised: ``p_g`` = the mean feature of the samples labelled g (features L2-normalised first by
  default). The mean over groups is the mean of the class means (not the sample-weighted grand
  mean), so an imbalanced probe set does not tilt the directions. Class-mean differences were chosen
  over a logistic-regression direction: no tuning, deterministic, robust with few samples per group,
  and they are the activation *pattern* (where the concept lives), which is what projections of head
  contributions should be measured against.

Prompt sets: ``{attribute: {group: [prompt, ...]}}``. Built in (``surgery/data/attribute_prompts.json``):
``gender`` (FairFace's Male, Female), ``race`` (FairFace's 7 groups), ``age`` (FairFace's 9 bands),
several templates each; group names are spelled as in FairFace label files. User files: JSON, or
YAML when PyYAML is installed.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CAVError

log = logging.getLogger(__name__)

PROMPTS_FILE = "attribute_prompts.json"
METHODS = ("zero_shot", "supervised")
WORLD_TEMPLATES = (  # {} = the group word; the first is surgery.world.group_prompts' form
    "a photo of something {}",
    "something {}",
    "a picture of something {}",
    "an image of {a} {} object",
    "{a} {} shape",
)

EmbedTexts = Callable[[list[str]], torch.Tensor]  # list of n strings -> (n, D) embeddings
PromptSet = dict[str, list[str]]  # group -> prompts, for one attribute


@dataclass
class CAVs:
    """Concept directions for one attribute (see the module docstring for the math)."""
    attribute: str  # e.g. "gender"; "" when unnamed
    groups: tuple[str, ...]  # group names; label id g means groups[g]
    prototypes: torch.Tensor  # (G, D) per-group prototype p_g
    directions: torch.Tensor  # (G, D) v_g = p_g - mean over groups of p_g'
    method: str  # "zero_shot" or "supervised"

    def __post_init__(self) -> None:
        G = len(self.groups)
        if G < 2:
            raise CAVError(f"attribute {self.attribute!r} has {G} group(s); concept directions need at least 2")
        for name in ("prototypes", "directions"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != G:
                raise CAVError(f"CAVs.{name} must be a ({G}, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if self.method not in METHODS:
            raise CAVError(f"unknown CAV method {self.method!r}; allowed: {', '.join(METHODS)}")

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def unit_directions(self) -> torch.Tensor:
        """(G, D): the directions scaled to unit norm."""
        return self.directions / self.directions.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def basis(self) -> torch.Tensor:
        """(D, k) orthonormal basis of the span of the directions (k = G - 1 normally).

        For 2 groups it is the single unit vector from group 0's prototype to group 1's."""
        return cav_basis(self.directions)


def cav_basis(directions: torch.Tensor) -> torch.Tensor:
    """(D, k): orthonormal basis of the span of ``directions`` (G, D) (rows need not be unit).

    G = 2: ``unit(v_1 - v_0)`` (k = 1, pointing from group 0 to group 1). G > 2: the right singular
    vectors with singular value > 1e-6 x the largest (k = rank, G - 1 for mean-centred directions)."""
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[0] < 2:
        shape = getattr(directions, "shape", type(directions).__name__)
        raise CAVError(f"directions must be a (G, D) tensor with G >= 2, got {shape}")
    d = directions.detach().double()
    if d.shape[0] == 2:
        diff = d[1] - d[0]
        norm = diff.norm()
        if norm <= 1e-12:
            raise CAVError("the two groups' directions coincide; their prompts/features do not separate them")
        return (diff / norm)[:, None].to(directions.dtype)
    _, s, vh = torch.linalg.svd(d, full_matrices=False)
    keep = s > 1e-6 * s[0] if s[0] > 0 else s > 0
    if not bool(keep.any()):
        raise CAVError("all concept directions are zero; the groups' prompts/features do not differ")
    return vh[keep].T.contiguous().to(directions.dtype)


# ------------------------------------------------------------------------------------- building CAVs
def zero_shot_cavs(embed_texts: EmbedTexts, prompt_set: Mapping[str, Sequence[str]], attribute: str = "") -> CAVs:
    """CAVs from the text embeddings of each group's prompts (one attribute's prompt set)."""
    groups = check_prompt_set(attribute or "prompt set", prompt_set)
    prompts = [p for g in groups for p in prompt_set[g]]
    emb = embed_texts(prompts)
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(prompts):
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise CAVError(f"embed_texts returned {shape} for {len(prompts)} prompts; it must return an (n, D) tensor")
    emb = _unit(emb.detach().double())  # (P, D)
    sizes = [len(prompt_set[g]) for g in groups]
    protos = _unit(torch.stack([chunk.mean(0) for chunk in emb.split(sizes)]))  # (G, D)
    return CAVs(attribute, tuple(groups), protos.float(), (protos - protos.mean(0, keepdim=True)).float(), "zero_shot")


def supervised_cavs(
    features: torch.Tensor,  # (N, D) e.g. image embeddings of labelled probe images
    labels: torch.Tensor,  # (N,) group ids 0..G-1
    groups: Sequence[str] | None = None,  # names of the G groups; default "0".."G-1" with G = max id + 1
    *,
    normalize_features: bool = True,  # L2-normalise each feature row first (CLIP embeddings compare by cosine)
    attribute: str = "",
) -> CAVs:
    """CAVs from labelled features: class means minus the mean of the class means."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        shape = getattr(features, "shape", type(features).__name__)
        raise CAVError(f"features must be an (N, D) float tensor, got {shape}")
    if groups is not None and (isinstance(groups, str) or not all(isinstance(g, str) for g in groups)):
        raise CAVError("groups must be a list of group names")
    G = len(groups) if groups is not None else _n_groups_of(labels)
    ids = check_labels(labels, features.shape[0], G)
    x = features.detach().double()
    if normalize_features:
        x = _unit(x)
    counts = torch.bincount(ids, minlength=G)  # (G,)
    missing = [str(g if groups is None else groups[g]) for g in range(G) if counts[g] == 0]
    if missing:
        raise CAVError(f"no samples labelled {', '.join(missing)}; every group needs at least one sample")
    sums = torch.zeros(G, x.shape[1], dtype=x.dtype).index_add_(0, ids, x)  # (G, D)
    protos = sums / counts[:, None]
    names = tuple(groups) if groups is not None else tuple(str(g) for g in range(G))
    return CAVs(attribute, names, protos.float(), (protos - protos.mean(0, keepdim=True)).float(), "supervised")


def check_labels(labels: Any, n: int, n_groups: int) -> torch.Tensor:
    """(N,) int64 group ids in [0, n_groups), validated (length n, at least 2 distinct groups)."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CAVError("labels must be a 1-D sequence of integer group ids") from exc
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise CAVError(f"labels must be a 1-D tensor of integer group ids, "
                       f"got shape {tuple(labels.shape)} {labels.dtype}")
    if labels.shape[0] != n:
        raise CAVError(f"labels has {labels.shape[0]} entries but there are {n} samples; give one label per sample")
    ids = labels.to(torch.int64).cpu()
    if ids.unique().numel() < 2:
        raise CAVError("the labels hold one group only; the probe set needs images of at least 2 groups")
    if n_groups < 2:
        raise CAVError(f"{n_groups} group(s) given; group comparisons need at least 2")
    if int(ids.min()) < 0 or int(ids.max()) >= n_groups:
        raise CAVError(f"label ids span [{int(ids.min())}, {int(ids.max())}], outside [0, {n_groups - 1}]; "
                       "use ids 0..G-1 in the order of the groups")
    return ids


def _n_groups_of(labels: Any) -> int:
    """max id + 1 of integer labels (0 when they are not readable; check_labels then explains)."""
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return 0
    return int(t.max()) + 1 if t.numel() and not t.is_floating_point() and t.dtype != torch.bool else 0


def encode_labels(values: Sequence[str], groups: Sequence[str]) -> torch.Tensor:
    """(N,) group ids of label strings (e.g. a labels-CSV column) in the order of ``groups``."""
    index = {g: i for i, g in enumerate(groups)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise CAVError(f"label values {', '.join(map(repr, unknown[:5]))} are not groups of this attribute; "
                       f"allowed: {', '.join(groups)}")
    return torch.tensor([index[v] for v in values], dtype=torch.int64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ------------------------------------------------------------------------------------- prompt sets
def check_prompt_set(attribute: str, groups: Any) -> list[str]:
    """The group names of one attribute's prompt set, validated."""
    if not isinstance(groups, Mapping):
        raise CAVError(f"attribute {attribute!r} must map group names to lists of prompts, got {type(groups).__name__}")
    if len(groups) < 2:
        raise CAVError(f"attribute {attribute!r} has {len(groups)} group(s); give prompts for at least 2 groups")
    for g, prompts in groups.items():
        if not isinstance(g, str) or not g.strip():
            raise CAVError(f"attribute {attribute!r} has a group name {g!r}; group names must be non-empty text")
        if (isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise CAVError(f"group {g!r} of attribute {attribute!r} needs a non-empty list of non-empty prompts")
    return list(groups)


def _check_prompt_sets(data: Any, source: str) -> dict[str, PromptSet]:
    if not isinstance(data, Mapping) or not data:
        raise CAVError(f"{source} must hold a mapping {{attribute: {{group: [prompts]}}}} with at least one attribute")
    out: dict[str, PromptSet] = {}
    for attribute, groups in data.items():
        names = check_prompt_set(str(attribute), groups)
        out[str(attribute)] = {g: [p.strip() for p in groups[g]] for g in names}
    return out


def builtin_prompt_sets() -> dict[str, PromptSet]:
    """The built-in prompt sets: gender, race (FairFace's 7), age (FairFace's bands)."""
    raw = resources.files("surgery").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    return _check_prompt_sets(json.loads(raw), f"built-in {PROMPTS_FILE}")


def load_prompt_sets(source: str | Path | None = None) -> dict[str, PromptSet]:
    """Prompt sets from ``source``: None or ``"builtin"`` for the built-in ones, else a .json or
    .yaml/.yml file holding ``{attribute: {group: [prompts...]}}``."""
    if source is None or (isinstance(source, str) and source == "builtin"):
        return builtin_prompt_sets()
    path = Path(source)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CAVError(f"prompt file {str(path)!r} {what}; pass 'builtin' or a .json / .yaml file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        data = _parse_yaml(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CAVError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                           "give {attribute: {group: [prompts]}} as JSON or YAML (.yaml)") from exc
    return _check_prompt_sets(data, repr(str(path)))


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise CAVError(f"reading {str(path)!r} needs PyYAML (pip install pyyaml); or give the prompts as JSON") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CAVError(f"{str(path)!r} is not valid YAML ({' '.join(str(exc).split())[:120]})") from exc


def prompt_set(attribute: str, source: str | Path | None = None) -> PromptSet:
    """One attribute's prompt set (``{group: [prompts]}``) from :func:`load_prompt_sets`."""
    sets = load_prompt_sets(source)
    if attribute not in sets:
        raise CAVError(f"no prompts for attribute {attribute!r}; available: {', '.join(sets)} "
                       "(give a prompt file for others)")
    return sets[attribute]


def world_prompt_set(params: Any) -> PromptSet:
    """Prompt set of a planted-bias world's protected attribute: ``{group name: prompts}``, the
    prompts naming the group word (``params.group_word(g)``, e.g. "a photo of something red")."""
    names = getattr(params, "groups", None)
    if not names or not hasattr(params, "group_word"):
        raise CAVError("world_prompt_set needs surgery.world.params.WorldParams (with groups and group_word)")
    out: PromptSet = {}
    for g, name in enumerate(names):
        word = params.group_word(g)
        article = "an" if word[:1].lower() in "aeiou" else "a"
        out[name] = [t.replace("{a}", article).format(word) for t in WORLD_TEMPLATES]
    return out
