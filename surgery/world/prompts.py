"""The world's language: captions, neutral (group-free) concept queries and group-naming prompts.
"""
from __future__ import annotations

from surgery.world.params import WorldParams

CAPTION_TEMPLATES = (
    "a photo of {}",
    "{}",
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
)
QUERY_TEMPLATE = "a photo of {}"  # neutral query = this template with the concept only


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def describe(params: WorldParams, concept: int, group: int | None = None) -> str:
    """Noun phrase with article: ``"a circle"``, ``"a red circle"``, ``"an orange star"``."""
    noun = params.concepts[concept]
    phrase = noun if group is None else f"{params.group_word(group)} {noun}"
    return f"{_article(phrase)} {phrase}"


def neutral_queries(params: WorldParams) -> list[str]:
    """One group-free query per concept, ``"a photo of a circle"``, in concept order."""
    return [QUERY_TEMPLATE.format(describe(params, c)) for c in range(params.n_concepts)]


def group_prompts(params: WorldParams) -> list[str]:
    """One concept-free prompt per group, ``"a photo of something red"``, for zero-shot group accuracy."""
    words = [params.group_word(g) for g in range(params.n_groups)]
    return [QUERY_TEMPLATE.format(f"something {w}") for w in words]


def query_wordings(params: WorldParams) -> dict[str, list[str]]:
    """The neutral queries in every other caption wording, ``{"a drawing of {}": ["a drawing of a
    circle", ...]}``, in concept order: wordings a balance edit fitted on :func:`neutral_queries` never saw."""
    return {t: [t.format(describe(params, c)) for c in range(params.n_concepts)]
            for t in CAPTION_TEMPLATES if t != QUERY_TEMPLATE}


def cell_queries(params: WorldParams) -> list[tuple[str, dict[str, str]]]:
    """Group-naming queries, ``("a photo of a red circle", {"concept": "circle", "group": "red"})``:
    their precision@K measures whether the group words keep their meaning."""
    return [(QUERY_TEMPLATE.format(describe(params, c, g)), {"concept": params.concepts[c], "group": params.groups[g]})
            for c in range(params.n_concepts) for g in range(params.n_groups)]
