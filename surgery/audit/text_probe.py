"""The text audit's prompt set (:class:`TextProbe`): neutral queries (no group named: the built-in
occupations and traits for people, one query per concept for a planted-bias world) and group-naming
prompts, each labelled with its group: the attribute's prompt set (the prompts the zero-shot CAVs
are built from) plus every neutral query combined with every group ("a photo of a red circle" in a
world, "a photo of a doctor who is a woman" for people: ``"<query> who is <group noun phrase>"``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from surgery.audit.cav import check_prompt_set, world_prompt_set
from surgery.errors import TextAuditError
from surgery.io.queries import NEUTRAL_QUERIES
from surgery.world.prompts import describe, neutral_queries

_NOUN_PREFIXES = ("a close-up photo of the face of ", "a photo of ", "a portrait of ", "a picture of ",
                  "an image of ")
_WORLD_TEMPLATES = ("a photo of {}", "{}", "a picture of {}")  # {} = "a red circle"


# ------------------------------------------------------------------------------------- prompt sets
@dataclass
class TextProbe:
    queries: list[str]  # neutral queries (no group named); the bias measure is over them
    prompts: list[str]  # group-naming prompts, for (a) and (b)
    groups: torch.Tensor  # (P,) int64 group id of each prompt, in the order of group_names
    group_names: list[str]  # G names, the prompt set's groups in order
    prompt_set: dict[str, list[str]]  # group -> prompts of the zero-shot CAV prototypes
    attribute: str = "group"  # the protected attribute's name
    source: dict = field(default_factory=dict)  # how it was built

    def __post_init__(self) -> None:
        if not self.queries:
            raise TextAuditError("the text audit needs at least one neutral query")
        if list(self.prompt_set) != list(self.group_names):
            raise TextAuditError("group_names must be the prompt set's groups, in order")
        if len(self.group_names) < 2:
            raise TextAuditError(f"attribute {self.attribute!r} has {len(self.group_names)} group(s); "
                                 "the text audit needs prompts for at least 2 groups")
        if tuple(self.groups.shape) != (len(self.prompts),):
            raise TextAuditError(f"{len(self.prompts)} group-naming prompts but {tuple(self.groups.shape)} labels")
        if torch.unique(self.groups).numel() < 2:
            raise TextAuditError(f"the group-naming prompts of attribute {self.attribute!r} name one group only")

    def all_prompts(self) -> list[str]:
        """Every text of the probe (queries, group-naming prompts, CAV prompts), without repeats."""
        cav = [p for g in self.group_names for p in self.prompt_set[g]]
        return list(dict.fromkeys([*self.queries, *self.prompts, *cav]))


def _group_noun(prompt: str) -> str:
    """'a photo of a woman' -> 'a woman'; a prompt without a known prefix is kept whole."""
    for prefix in _NOUN_PREFIXES:
        if prompt.lower().startswith(prefix):
            return prompt[len(prefix):]
    return prompt


def text_probe(attribute: str, prompt_set: Mapping[str, Sequence[str]], queries: Sequence[str] | None = None) -> TextProbe:
    """Prompts for people: neutral queries (default: built-in occupations and traits) x groups,
    ``"<query> who is <group noun phrase>"``, plus the prompt set itself."""

    names = check_prompt_set(attribute, prompt_set)
    queries = list(queries) if queries is not None else \
        NEUTRAL_QUERIES["occupations"] + NEUTRAL_QUERIES["traits"]
    prompts, groups = [], []
    for g, name in enumerate(names):
        noun = _group_noun(prompt_set[name][0])
        for text in [*(f"{q} who is {noun}" for q in queries), *prompt_set[name]]:
            prompts.append(text)
            groups.append(g)
    return TextProbe(queries=queries, prompts=prompts, groups=torch.tensor(groups, dtype=torch.int64),
                     group_names=names, prompt_set={n: list(prompt_set[n]) for n in names}, attribute=attribute,
                     source={"kind": "people", "n_queries": len(queries), "combination": "<query> who is <group>"})


def world_text_probe(params) -> TextProbe:
    """Prompts of a planted-bias world: its concept queries, every concept named with every group
    ("a photo of a red circle", "a red circle", "a picture of a red circle"), and the group prompts."""

    pset = world_prompt_set(params)
    names = list(pset)
    prompts, groups = [], []
    for g, name in enumerate(names):
        texts = [t.format(describe(params, c, g)) for c in range(params.n_concepts) for t in _WORLD_TEMPLATES]
        for text in [*texts, *pset[name]]:
            prompts.append(text)
            groups.append(g)
    return TextProbe(queries=neutral_queries(params), prompts=prompts, groups=torch.tensor(groups, dtype=torch.int64),
                     group_names=names, prompt_set=pset, attribute="group",
                     source={"kind": "world", "hash": params.hash(), "templates": list(_WORLD_TEMPLATES)})
