"""Built-in neutral query lists (occupations, traits) and reading a user's query file.
"""
from __future__ import annotations

import csv
import io
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


#: The most neutral queries a balance fit or a debias run takes. The balance edit's solve builds a
#: matrix over every (query, group) constraint: its time and memory grow with the square of the
#: query count (10,000 queries took 2.5-3 minutes and 3.3 GB; 1,000 take about 1/100 of that).
MAX_QUERIES = 1000
#: Deepest JSON nesting a queries or group-prompts file may have (both are flat: a list or an object).
MAX_JSON_DEPTH = 64


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` that refuses a JSON object naming one key twice (json keeps the last)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _json_depth(text: str) -> int:
    """The deepest nesting of brackets in ``text`` outside strings (before parsing: json recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _read_text_or_json(path: Path, what: str) -> tuple[str, object]:
    """A user's file as text, and parsed when it ends in .json (else None); one-line errors for a
    missing file, a folder, text that is not UTF-8 (a UTF-8 byte-order mark is dropped), invalid
    or too deeply nested JSON, and a JSON object naming a key twice."""
    if path.is_dir():
        raise DataError(f"{what} {str(path)!r} is a folder, not a file; pass the file")
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist; check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if path.suffix.lower() != ".json":
        return text, None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise DataError(f"{str(path)!r} nests JSON deeper than {MAX_JSON_DEPTH} levels; a {what} is a flat "
                        "list or object")
    try:
        return text, json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except _DuplicateKey as exc:
        raise DataError(f"{str(path)!r} names key {str(exc)[:80]!r} twice; keep one") from None
    except RecursionError:
        raise DataError(f"{str(path)!r} nests JSON too deeply; a {what} is a flat list or object") from None


def unique_queries(queries: list[str]) -> list[str]:
    """``queries`` without repeats, in their first order (a repeated query would land in both folds
    of the held-out measurement, and weigh twice in the fit)."""
    return list(dict.fromkeys(queries))


def check_query_count(queries: list[str], source: str = "the query list") -> None:
    """Refuse more than :data:`MAX_QUERIES` queries, before any work."""
    if len(queries) > MAX_QUERIES:
        raise DataError(f"{source} holds {len(queries)} distinct queries; the balance fit takes at most "
                        f"{MAX_QUERIES} (its solve grows with the square of the count): pass fewer")


def load_group_prompts(path: str | Path) -> dict[str, str]:
    """How each protected-group value is named in a zero-shot prompt, from a CSV with a header
    ``group,prompt`` (one row per value) or a JSON object ``{value: prompt}``. Without one, groups
    are named as people (:func:`person_group_prompt`), which names no group that is not a person's."""
    path = Path(path)
    text, data = _read_text_or_json(path, "group prompts file")
    if path.suffix.lower() == ".json":
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise DataError(f"{str(path)!r} must hold a JSON object {{group value: prompt}}")
        pairs = list(data.items())
    else:
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or [c.strip().lower() for c in rows[0]] != ["group", "prompt"]:
            raise DataError(f"{str(path)!r} must start with the header 'group,prompt' (one row per group value)")
        bad = next((i for i, r in enumerate(rows[1:], 2) if r and len(r) != 2), None)
        if bad is not None:
            raise DataError(f"{str(path)!r} line {bad}: expected 'group,prompt' (quote a prompt that holds a comma)")
        pairs = [(r[0], r[1]) for r in rows[1:] if r]
    prompts: dict[str, str] = {}
    for value, prompt in pairs:
        value, prompt = value.strip(), prompt.strip()
        if not value or not prompt:
            raise DataError(f"{str(path)!r}: every group needs a value and a non-empty prompt")
        if value in prompts:
            raise DataError(f"{str(path)!r}: group {value!r} is named twice")
        prompts[value] = prompt
    if not prompts:
        raise DataError(f"{str(path)!r} names no group; write one 'value,prompt' row per group")
    return prompts


def prompts_for_groups(values: list[str], prompts: dict[str, str] | None, source: str = "--group-prompts") -> list[str]:
    """One zero-shot prompt per group value: from ``prompts`` when given (every value must be
    there), else the people template."""
    if prompts is None:
        return [person_group_prompt(v) for v in values]
    missing = [v for v in values if v not in prompts]
    if missing:
        raise DataError(f"{source} has no prompt for group {missing[0]!r} ({len(missing)} of {len(values)} "
                        f"groups missing); add a row '{missing[0]},<prompt>'")
    return [prompts[v] for v in values]


def load_queries(path: str | Path) -> list[str]:
    """Queries from a text file (one per line; blank lines and ``#`` comments skipped) or a JSON list of
    strings; a repeated query is kept once, at its first place."""
    path = Path(path)
    text, data = _read_text_or_json(path, "queries file")
    if path.suffix.lower() == ".json":
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise DataError(f"{str(path)!r} must hold a JSON list of query strings")
        queries = [q.strip() for q in data if q.strip()]
    else:
        queries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not queries:
        raise DataError(f"{str(path)!r} holds no queries; write one query per line")
    return unique_queries(queries)
