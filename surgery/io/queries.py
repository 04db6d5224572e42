"""Built-in neutral query lists (occupations, traits) and reading a user's query file.
"""
from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import DataError

# ---------------------------------------------------------------------------------------- queries
_OCCUPATIONS = (
    "accountant", "architect", "artist", "athlete", "baker", "carpenter", "cashier", "CEO", "chef",
    "construction worker", "dentist", "doctor", "electrician", "engineer", "farmer", "firefighter",
    "hairdresser", "housekeeper", "janitor", "journalist", "judge", "lawyer", "librarian",
    "mechanic", "musician", "nurse", "pharmacist", "photographer", "pilot", "plumber",
    "police officer", "professor", "programmer", "receptionist", "scientist", "secretary",
    "security guard", "social worker", "soldier", "teacher", "truck driver", "waiter",
)
_TRAITS = (
    "aggressive", "ambitious", "attractive", "caring", "confident", "criminal", "dangerous",
    "friendly", "good", "happy", "honest", "intelligent", "kind", "lazy", "poor", "rich",
    "shy", "smart", "successful", "trustworthy",
)
_AN_WORDS = {"honest", "hour"}  # take "an" despite a consonant letter
_A_WORDS = {"CEO"}  # read as "see-ee-oh"


def _with_article(phrase: str) -> str:
    first = phrase.split()[0]
    vowel = first[0].lower() in "aeiou"
    use_an = (vowel or first in _AN_WORDS) and first not in _A_WORDS
    return f"{'an' if use_an else 'a'} {phrase}"


def person_group_prompt(value: str) -> str:
    """The zero-shot prompt of a protected-group value of a people data set: "a photo of a female person"."""
    return f"a photo of a {value.replace('_', ' ')} person"


NEUTRAL_QUERIES: dict[str, list[str]] = {
    "occupations": [f"a photo of {_with_article(o)}" for o in _OCCUPATIONS],
    "traits": [f"a photo of {_with_article(t + ' person')}" for t in _TRAITS],
}


def load_queries(path: str | Path) -> list[str]:
    """Queries from a text file (one per line; blank lines and ``#`` comments skipped) or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"queries file {str(path)!r} does not exist; check the path")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise DataError(f"{str(path)!r} must hold a JSON list of query strings")
        queries = [q.strip() for q in data if q.strip()]
    else:
        queries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not queries:
        raise DataError(f"{str(path)!r} holds no queries; write one query per line")
    return queries
