"""Concept Consistency Score (seed 002): how consistently a head's TextSpan descriptions share one concept.

Given a head's descriptions (5 by default), a *judge* names the head's dominant concept (the label)
and says for each description whether it matches; ``CCS = number of matches`` (0..n).

Judges (anything with ``judge(descriptions) -> CCSVerdict``, see :class:`Judge`):

* :class:`EmbeddingJudge` (default; no LLM can run on these machines): text embeddings of the
  descriptions ``d_i`` and of every vocabulary label ``l`` (the normalised mean of the normalised
  embeddings of the label's phrases) are compared by cosine similarity ``s_il``. The label is
  ``argmax_l mean_i s_il`` (ties: the earlier vocabulary entry). Match rules (``match_rule``):
  ``"top1"`` (default): description i matches when the label is its own ``argmax_l s_il``;
  ``"threshold"``: when ``s_i,label >= threshold``; ``"top1_and_threshold"``: both.
* :class:`HttpJudge`: an LLM behind an OpenAI-compatible chat-completions endpoint (urllib, no new
  dependency). One request per head; the model must answer with the JSON object
  ``{"label": "<concept>", "matches": ["yes" | "no", ...]}`` (one entry per description). A reply in a
  single Markdown code fence is accepted; anything else is a :class:`JudgeError`.

Levels (:func:`ccs_level`, for 5 descriptions): seed 002 names high = 5, moderate = 3, low <= 1.
The unnamed scores are binned with their nearer side by default: 4 -> moderate (moderate = 3..4),
2 -> low (low = 0..2). :class:`CCSBins` changes the cut points.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from surgery.errors import JudgeError

log = logging.getLogger(__name__)

EmbedTexts = Callable[[list[str]], torch.Tensor]  # list of n strings -> (n, D) embeddings
MATCH_RULES = ("top1", "threshold", "top1_and_threshold")
LEVELS = ("high", "moderate", "low")

# Built-in concept categories: label -> phrases whose embeddings define it.
DEFAULT_LABELS: dict[str, tuple[str, ...]] = {
    "colors": ("colors", "a brightly coloured object", "red, green, blue and yellow"),
    "shapes": ("geometric shapes", "a circle, a square or a triangle", "an outline shape"),
    "textures": ("textures", "a rough or smooth surface texture", "a repeating surface pattern"),
    "patterns": ("patterns", "stripes, dots and checks", "a repeated motif"),
    "people": ("people", "a photo of a person", "a group of people"),
    "gender": ("gender", "a man or a woman", "male and female people"),
    "age": ("age", "a child, an adult or an elderly person", "how old a person is"),
    "ethnicity": ("ethnicity", "a person's race or ethnic group", "people of different skin tones"),
    "faces": ("faces", "a human face", "facial expressions"),
    "hair": ("hair", "a hairstyle", "long, short or curly hair"),
    "body parts": ("body parts", "a hand, an eye or a foot", "parts of the human body"),
    "clothing": ("clothing", "a shirt, a dress or a hat", "what someone is wearing"),
    "animals": ("animals", "a dog, a cat or a bird", "a wild animal"),
    "plants": ("plants", "a tree, a flower or a leaf", "vegetation"),
    "food": ("food", "a meal on a plate", "fruit and vegetables"),
    "drinks": ("drinks", "a cup of coffee or a glass of juice", "a beverage"),
    "vehicles": ("vehicles", "a car, a bus or a bicycle", "a means of transport"),
    "buildings": ("buildings", "a house or a tower", "architecture"),
    "indoor scenes": ("indoor scenes", "a room inside a house", "an interior"),
    "outdoor scenes": ("outdoor scenes", "a landscape", "nature outdoors"),
    "locations": ("locations", "a place in a city or country", "a famous location"),
    "water": ("water", "the sea, a lake or a river", "waves and ripples"),
    "weather": ("weather", "rain, snow or clouds", "the sky and the weather"),
    "time of day": ("time of day", "day or night", "a sunset or a sunrise"),
    "lighting": ("lighting", "bright or dim light", "shadows and highlights"),
    "photography": ("photography", "a camera angle or focus", "a close-up or a wide shot"),
    "art style": ("art style", "a painting or a drawing", "an artistic style"),
    "text": ("text and letters", "written words", "a sign with letters"),
    "numbers": ("numbers", "digits and figures", "a page of numbers"),
    "symbols": ("symbols", "a logo or an icon", "a sign or an emblem"),
    "materials": ("materials", "wood, metal, glass or plastic", "what an object is made of"),
    "objects": ("everyday objects", "a household item", "a tool or a utensil"),
    "furniture": ("furniture", "a chair, a table or a bed", "a piece of furniture"),
    "electronics": ("electronics", "a phone, a laptop or a screen", "an electronic device"),
    "sports": ("sports", "a ball game", "athletes playing a sport"),
    "music": ("music", "a musical instrument", "people playing music"),
    "actions": ("actions", "someone running, jumping or dancing", "an activity"),
    "emotions": ("emotions", "a happy or sad expression", "a feeling"),
    "events": ("events", "a party, a wedding or a ceremony", "a gathering"),
    "size and count": ("size and quantity", "many small things or one large thing", "how many objects"),
    "position": ("position and layout", "an object in the centre or at the edge", "spatial arrangement"),
}


# ------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class CCSBins:
    """Cut points of the CCS levels (absolute counts; defaults for 5 descriptions)."""
    high: int = 5  # score >= high -> "high"
    moderate: int = 3  # moderate <= score < high -> "moderate"; below -> "low"

    def __post_init__(self) -> None:
        for name in ("high", "moderate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise JudgeError(f"CCS bin {name} must be an integer >= 0, got {v!r}")
        if not self.moderate <= self.high:
            raise JudgeError(f"CCS bins need moderate <= high, got moderate={self.moderate}, high={self.high}")


def ccs_level(score: int, bins: CCSBins | None = None) -> str:
    """``"high"`` (score >= 5), ``"moderate"`` (3..4) or ``"low"`` (0..2) with the default bins."""
    b = bins or CCSBins()
    return "high" if score >= b.high else "moderate" if score >= b.moderate else "low"


@dataclass
class CCSVerdict:
    """A judge's verdict on one head's descriptions."""
    label: str  # the head's dominant concept
    descriptions: list[str]  # the descriptions judged, in order
    matches: list[bool]  # per description: does it match the label?
    judge: str  # which judge decided ("embedding", "http:<model>")
    similarities: list[float] | None = None  # EmbeddingJudge: cosine of each description to the label

    @property
    def score(self) -> int:
        """CCS: the number of matching descriptions (0..len(descriptions))."""
        return int(sum(self.matches))

    @property
    def level(self) -> str:
        """``high`` / ``moderate`` / ``low`` with the default :class:`CCSBins`."""
        return ccs_level(self.score)

    def to_dict(self) -> dict:
        out = {"label": self.label, "score": self.score, "level": self.level, "matches": list(self.matches),
               "descriptions": list(self.descriptions), "judge": self.judge}
        if self.similarities is not None:
            out["similarities"] = list(self.similarities)
        return out


@runtime_checkable
class Judge(Protocol):
    """Anything that names a concept for a list of descriptions and says which ones match it."""

    def judge(self, descriptions: Sequence[str]) -> CCSVerdict: ...


def concept_consistency(descriptions: Sequence[str], judge: Judge) -> CCSVerdict:
    """The CCS verdict of ``judge`` on one head's descriptions."""
    return judge.judge(_check_descriptions(descriptions))


def _check_descriptions(descriptions: Sequence[str]) -> list[str]:
    if isinstance(descriptions, str) or not all(isinstance(d, str) for d in descriptions):
        raise JudgeError("descriptions must be a list of strings (a head's TextSpan texts)")
    if not descriptions:
        raise JudgeError("no descriptions to judge; run TextSpan with iterations >= 1 first")
    return list(descriptions)


# ------------------------------------------------------------------------------------- embedding judge
@dataclass
class EmbeddingJudge:
    """Embedding-based judge (see the module docstring for the label and match rules)."""
    embed_texts: EmbedTexts  # list[str] -> (n, D) text embeddings of the CLIP being audited
    # label -> phrases, or a list of plain labels (each its own phrase); default: DEFAULT_LABELS
    label_vocabulary: Mapping[str, Sequence[str]] | Sequence[str] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    threshold: float | None = None  # cosine a match needs under the threshold rules (required by them)
    match_rule: str = "top1"  # "top1" | "threshold" | "top1_and_threshold"
    _label_emb: torch.Tensor | None = field(default=None, init=False, repr=False)  # (V, D) cache

    def __post_init__(self) -> None:
        if not callable(self.embed_texts):
            raise JudgeError("embed_texts must be a function list[str] -> (n, D) tensor")
        if self.match_rule not in MATCH_RULES:
            raise JudgeError(f"unknown match_rule {self.match_rule!r}; allowed: {', '.join(MATCH_RULES)}")
        if self.match_rule != "top1" and self.threshold is None:
            raise JudgeError(f"match_rule {self.match_rule!r} needs a threshold (a cosine similarity in [-1, 1])")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and not isinstance(self.threshold, bool) and -1 <= self.threshold <= 1):
            raise JudgeError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")
        vocab = self.label_vocabulary
        if isinstance(vocab, str):
            raise JudgeError("label_vocabulary must be a list of labels or a mapping label -> phrases, not a string")
        if not isinstance(vocab, Mapping):
            vocab = {str(v): (str(v),) for v in vocab}
        vocab = {str(k): tuple(v) if not isinstance(v, str) else (v,) for k, v in vocab.items()}
        if len(vocab) < 2 or any(not v or not all(isinstance(p, str) and p.strip() for p in v) for v in vocab.values()):
            raise JudgeError("label_vocabulary needs at least 2 labels, each with at least one non-empty phrase")
        self.label_vocabulary = vocab

    @property
    def labels(self) -> list[str]:
        return list(self.label_vocabulary)

    def label_embeddings(self) -> torch.Tensor:
        """(V, D): per label, the normalised mean of its phrases' normalised embeddings (cached)."""
        if self._label_emb is None:
            phrases = [p for v in self.label_vocabulary.values() for p in v]
            emb = _unit(self._embed(phrases))  # (P, D)
            sizes = [len(v) for v in self.label_vocabulary.values()]
            self._label_emb = _unit(torch.stack([chunk.mean(0) for chunk in emb.split(sizes)]))
        return self._label_emb

    def similarities(self, descriptions: Sequence[str]) -> torch.Tensor:
        """(n, V): cosine similarity of each description to each label."""
        return _unit(self._embed(list(descriptions))) @ self.label_embeddings().T

    def judge(self, descriptions: Sequence[str]) -> CCSVerdict:
        descriptions = _check_descriptions(descriptions)
        sim = self.similarities(descriptions)  # (n, V)
        label = int(sim.mean(0).argmax())
        to_label = sim[:, label]  # (n,)
        top1 = sim.argmax(1) == label
        above = to_label >= (self.threshold if self.threshold is not None else -2.0)
        matches = {"top1": top1, "threshold": above, "top1_and_threshold": top1 & above}[self.match_rule]
        return CCSVerdict(label=self.labels[label], descriptions=descriptions, matches=[bool(m) for m in matches],
                          judge="embedding", similarities=[float(s) for s in to_label])

    def _embed(self, texts: list[str]) -> torch.Tensor:
        emb = self.embed_texts(texts)
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(texts):
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise JudgeError(f"embed_texts returned {shape} for {len(texts)} texts; it must return an (n, D) tensor")
        return emb.detach().double().cpu()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ------------------------------------------------------------------------------------- HTTP judge
SYSTEM_PROMPT = (
    "You analyse attention heads of an image model. You get short text descriptions of what one head "
    "responds to. Name the single dominant concept they share (a short category such as colors, shapes, "
    "gender, age, animals, locations), then say for each description whether it matches that concept. "
    'Answer with JSON only: {"label": "<concept>", "matches": ["yes" or "no", one per description, in order]}.'
)


@dataclass
class HttpJudge:
    """LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint (one request per head)."""
    url: str  # http(s) endpoint; "/chat/completions" is appended unless the path already ends with it
    model: str  # model name sent in the request
    api_key_env: str | None = "OPENAI_API_KEY"  # env var holding the key (Bearer); unset or None: no header
    timeout: float = 60.0  # seconds per request (> 0)
    temperature: float = 0.0  # sampling temperature sent with the request (>= 0)
    label_vocabulary: Sequence[str] | None = None  # optional: labels the model should choose from

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise JudgeError(f"judge url must be an http(s) URL such as http://localhost:8000/v1, got {self.url!r}")
        if not parts.path.rstrip("/").endswith("/chat/completions"):
            self.url = self.url.rstrip("/") + "/chat/completions"
        if not isinstance(self.model, str) or not self.model.strip():
            raise JudgeError("judge model must be a non-empty model name, e.g. 'gpt-4o-mini'")
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool) or self.timeout <= 0:
            raise JudgeError(f"judge timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or self.temperature < 0:
            raise JudgeError(f"judge temperature must be a number >= 0, got {self.temperature!r}")

    def request_body(self, descriptions: Sequence[str]) -> dict:
        """The chat-completions request for one head's descriptions."""
        lines = "\n".join(f"{i + 1}. {d}" for i, d in enumerate(descriptions))
        user = f"Descriptions ({len(descriptions)}):\n{lines}"
        if self.label_vocabulary:
            user += "\nChoose the label from: " + ", ".join(self.label_vocabulary) + "."
        return {"model": self.model, "temperature": self.temperature,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]}

    def judge(self, descriptions: Sequence[str]) -> CCSVerdict:
        descriptions = _check_descriptions(descriptions)
        reply = self._post(self.request_body(descriptions))
        label, matches = parse_judge_reply(_message_content(reply, self.url), len(descriptions))
        return CCSVerdict(label=label, descriptions=descriptions, matches=matches, judge=f"http:{self.model}")

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise JudgeError(f"judge endpoint {self.url} answered HTTP {exc.code} ({exc.reason}); "
                             "check the URL, the model name and the API key") from exc
        except urllib.error.URLError as exc:
            raise JudgeError(f"cannot reach judge endpoint {self.url} ({exc.reason}); "
                             "check that it is running") from exc
        except (TimeoutError, socket.timeout) as exc:
            raise JudgeError(f"judge endpoint {self.url} did not answer within {self.timeout:g} s; "
                             "raise the timeout or check the server") from exc
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise JudgeError(f"judge endpoint {self.url} did not return JSON ({_snippet(raw)}); "
                             "is it an OpenAI-compatible chat-completions endpoint?") from exc
        log.debug("judge %s replied %s", self.url, _snippet(raw))
        return reply


def _message_content(reply: object, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError) as exc:
        raise JudgeError(f"judge endpoint {url} returned no choices[0].message.content; "
                         "is it an OpenAI-compatible chat-completions endpoint?") from exc
    if not isinstance(content, str):
        raise JudgeError(f"judge endpoint {url} returned a non-text message content; expected a JSON string")
    return content


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*)\n\s*```$", re.DOTALL)


def parse_judge_reply(content: str, n: int) -> tuple[str, list[bool]]:
    """(label, matches) from a judge's message: ``{"label": str, "matches": [yes|no] * n}``, strictly.

    ``matches`` entries may be "yes"/"no" (any case) or JSON booleans. One surrounding Markdown code
    fence is allowed; any other text, a wrong count or another value is a :class:`JudgeError`."""
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JudgeError(f"judge reply is not the requested JSON object ({_snippet(content)}); "
                         "use a model that follows JSON instructions") from exc
    if not isinstance(data, dict) or set(data) != {"label", "matches"}:
        raise JudgeError(f"judge reply must have exactly the keys 'label' and 'matches' ({_snippet(content)})")
    label, raw = data["label"], data["matches"]
    if not isinstance(label, str) or not label.strip():
        raise JudgeError(f"judge reply has an empty or non-text label ({_snippet(content)})")
    if not isinstance(raw, list) or len(raw) != n:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise JudgeError(f"judge reply has {got} matches for {n} descriptions; it must give one per description")
    matches = []
    for m in raw:
        if isinstance(m, bool):
            matches.append(m)
        elif isinstance(m, str) and m.strip().lower() in ("yes", "no"):
            matches.append(m.strip().lower() == "yes")
        else:
            raise JudgeError(f"judge reply has match {m!r}; each must be \"yes\" or \"no\"")
    return label.strip(), matches


def _snippet(raw: bytes | str, limit: int = 80) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def judge_heads(
    descriptions: Mapping[tuple[int, int], Sequence[str]],  # (layer, head) -> that head's TextSpan texts
    judge: Judge,
) -> dict[tuple[int, int], CCSVerdict]:
    """CCS verdicts for many heads, keyed like the input."""
    return {key: concept_consistency(texts, judge) for key, texts in descriptions.items()}
