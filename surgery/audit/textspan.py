"""TextSpan (Gandelsman et al., ICLR 2024): describe one head by the texts that span its output.

Inputs, for one head: ``C`` (K, D), its direct contributions to the joint embedding over K probe
images (rows of :attr:`surgery.audit.decompose.Decomposition.heads`), and ``R`` (M, D), text embeddings of
a pool of M descriptions. The procedure (the reference implementation's, clip_text_span):

1. ``V`` (r, D): the top ``r = n_components`` right singular vectors of C. By default of the raw,
   uncentred C, as the reference does (``center_before_svd=True`` centres first). ``r`` is clipped to
   ``min(K, D)``.
2. Texts: each row of R is L2-normalised (``normalize_texts``; CLIP text embeddings are compared by
   cosine), then projected onto the span of V: ``t_j <- V^T V t_j``. The projected texts are NOT
   renormalised: a text's norm now says how much of it the head can write.
3. ``C <- C - mean_rows(C)`` (centred over images); the reconstruction starts at the mean.
4. Repeat ``iterations`` times: score every text by the standard deviation over images of ``C t_j``
   (``selection="reference"``; ``"unit"`` scores ``C t_j / |t_j|`` instead, i.e. the variance along the
   text's unit direction, which ignores how much of the text lies in the head's span); pick the best
   ``j*``; with ``u = t_{j*} / |t_{j*}|`` add the rank-1 part ``(C u) u^T`` to the reconstruction and
   remove it from C; remove ``u`` from every text (``t_j <- t_j - (t_j . u) u``), so later picks are
   orthogonal to earlier ones and a picked text is never picked again (it becomes 0).

Reported per step: ``variance_explained[i] = |C_i u_i|^2 / |C_0|_F^2`` (C_0 the centred
contributions, C_i the deflated ones at step i); since the u_i are orthonormal,
``sum(variance_explained) + residual_variance == 1`` exactly. The loop stops early (with a log
message) when no remaining text has a direction left (norm <= ``eps``) or its score is 0.

The built-in description pools live in ``surgery/data``: ``general`` (short image descriptions:
objects, scenes, colours, textures, shapes, animals, materials, actions, styles), ``demographic``
(gender, FairFace's 7 race groups, age bands, generic person descriptions), and ``bias_augmented``
= general + demographic (seed 000's bias-augmented TextSpan: demographic prototypes compete with
visual concepts, so a head whose variance is demographic picks them).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from surgery.errors import TextSpanError

log = logging.getLogger(__name__)

POOL_KINDS = ("general", "demographic", "bias_augmented")
SELECTIONS = ("reference", "unit")
GENERAL_FILE = "descriptions_general.txt"
DEMOGRAPHIC_FILE = "descriptions_demographic.txt"
_POOL_FILES = {"general": (GENERAL_FILE,), "demographic": (DEMOGRAPHIC_FILE,),
               "bias_augmented": (GENERAL_FILE, DEMOGRAPHIC_FILE)}


# ------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class TextSpanOptions:
    """How TextSpan runs (defaults: the reference implementation, seed 002's 5 descriptions)."""
    n_components: int = 80  # rank of the head's output span the texts are projected onto (>= 1; clipped to min(K, D))
    iterations: int = 5  # descriptions to pick (>= 1); seed 002 uses 5, the reference 10
    normalize_texts: bool = True  # L2-normalise text embeddings before projecting (reference: yes)
    center_before_svd: bool = False  # centre C over images before the SVD (reference: no)
    selection: str = "reference"  # "reference": std of C t; "unit": std of C t/|t| (variance along the text)
    eps: float = 1e-8  # a remaining text direction with norm <= eps (relative to the largest initial) is spent

    def __post_init__(self) -> None:
        for name in ("n_components", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TextSpanError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("normalize_texts", "center_before_svd"):
            if not isinstance(getattr(self, name), bool):
                raise TextSpanError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.selection not in SELECTIONS:
            raise TextSpanError(f"unknown selection {self.selection!r}; allowed: {', '.join(SELECTIONS)}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 <= self.eps < 1:
            raise TextSpanError(f"eps must be a number in [0, 1), got {self.eps!r}")

    def to_dict(self) -> dict:
        """JSON-able record of the conventions (for audit.json)."""
        return asdict(self)


@dataclass
class TextSpanResult:
    """The descriptions TextSpan picked for one head, in order."""
    texts: list[str]  # chosen descriptions, first = most variance
    indices: list[int]  # their rows in the text pool
    variance_explained: list[float]  # per step: fraction of the head's centred variance removed
    residual_variance: float  # fraction of the centred variance left after all steps
    scores: list[float]  # per step: the selection score of the chosen text (std over images)
    directions: torch.Tensor  # (n, D) unit directions removed, in order (orthonormal)
    reconstruction: torch.Tensor  # (K, D) mean + the rank-1 parts: the head as seen through the texts

    def to_dict(self) -> dict:
        """JSON-able summary (no tensors)."""
        return {"texts": list(self.texts), "indices": list(self.indices),
                "variance_explained": list(self.variance_explained),
                "residual_variance": self.residual_variance, "scores": list(self.scores)}


# ------------------------------------------------------------------------------------- algorithm
def textspan(
    contrib: torch.Tensor,  # (K, D) one head's direct contributions over K images
    text_emb: torch.Tensor,  # (M, D) text embeddings of the pool
    texts: Sequence[str],  # M descriptions, row-aligned with text_emb
    n_components: int = 80,
    iterations: int = 5,
    *,
    options: TextSpanOptions | None = None,  # overrides n_components / iterations when given
) -> TextSpanResult:
    """Pick ``iterations`` descriptions that span the head's variance (see the module docstring).

    Computed in float64 on the inputs' device; returned tensors are float32 on that device.
    """
    opt = options or TextSpanOptions(n_components=n_components, iterations=iterations)
    C, R = _check_inputs(contrib, text_emb, texts)
    if opt.normalize_texts:
        R = R / R.norm(dim=1, keepdim=True).clamp_min(torch.finfo(R.dtype).tiny)
    basis = _top_right_singular(C - C.mean(0, keepdim=True) if opt.center_before_svd else C, opt.n_components)
    T = (R @ basis.T) @ basis  # (M, D) texts projected onto the head's span
    mean = C.mean(0, keepdim=True)  # (1, D)
    C = C - mean  # (K, D)
    total_var = float((C * C).sum())
    recon = mean.expand_as(C).clone()  # (K, D)
    spent = opt.eps * float(T.norm(dim=1).max()) if T.numel() else 0.0
    chosen: list[int] = []
    explained: list[float] = []
    scores: list[float] = []
    dirs: list[torch.Tensor] = []
    for step in range(opt.iterations):
        norms = T.norm(dim=1)  # (M,)
        live = norms > spent
        if not bool(live.any()):
            log.info("TextSpan stopped after %d of %d steps: no text direction left", step, opt.iterations)
            break
        proj = C @ T.T  # (K, M)
        if opt.selection == "unit":
            proj = proj / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        score = _std(proj).masked_fill(~live, -1.0)  # (M,)
        j = int(score.argmax())
        if float(score[j]) <= 0.0:
            log.info("TextSpan stopped after %d of %d steps: no text has variance left", step, opt.iterations)
            break
        u = T[j] / norms[j]  # (D,)
        coef = C @ u  # (K,)
        part = coef[:, None] * u[None, :]  # (K, D)
        recon += part
        C = C - part
        T = T - (T @ u)[:, None] * u[None, :]
        chosen.append(j)
        scores.append(float(score[j]))
        explained.append(float((coef * coef).sum()) / total_var if total_var > 0 else 0.0)
        dirs.append(u)
    residual = float((C * C).sum()) / total_var if total_var > 0 else 0.0
    D = contrib.shape[1]
    return TextSpanResult(
        texts=[texts[j] for j in chosen], indices=chosen, variance_explained=explained,
        residual_variance=residual, scores=scores,
        directions=(torch.stack(dirs) if dirs else C.new_zeros(0, D)).float(),
        reconstruction=recon.float(),
    )


def textspan_heads(
    contrib: torch.Tensor,  # (K, L, H, D) contributions of L layers x H heads over K images
    text_emb: torch.Tensor,  # (M, D)
    texts: Sequence[str],  # M descriptions
    options: TextSpanOptions | None = None,
    first_layer: int = 0,  # layer index of contrib[:, 0] (e.g. L_total - 4 when only the last 4 are kept)
) -> dict[tuple[int, int], TextSpanResult]:
    """TextSpan for every head in ``contrib``; keys are ``(first_layer + l, h)``."""
    if not isinstance(contrib, torch.Tensor) or contrib.dim() != 4:
        shape = tuple(contrib.shape) if isinstance(contrib, torch.Tensor) else type(contrib).__name__
        raise TextSpanError(f"contrib must be a (K, L, H, D) tensor, got {shape}; pass per-head contributions")
    opt = options or TextSpanOptions()
    return {(first_layer + l, h): textspan(contrib[:, l, h], text_emb, texts, options=opt)
            for l in range(contrib.shape[1]) for h in range(contrib.shape[2])}


def _check_inputs(
    contrib: torch.Tensor, text_emb: torch.Tensor, texts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float64 copies: C (K, D), R (M, D)."""
    for name, t in (("contrib", contrib), ("text_emb", text_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise TextSpanError(f"{name} must be a 2-D tensor, got {shape}; "
                                "pass one head's (K, D) and the pool's (M, D)")
        if not t.is_floating_point():
            raise TextSpanError(f"{name} must be a float tensor, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise TextSpanError(f"{name} holds NaN or inf values; check the decomposition / text encoder")
    if contrib.shape[0] < 2:
        raise TextSpanError(f"contrib has {contrib.shape[0]} image(s); TextSpan needs at least 2 to measure variance")
    if contrib.shape[1] != text_emb.shape[1]:
        raise TextSpanError(f"contrib width {contrib.shape[1]} != text embedding width {text_emb.shape[1]}; "
                            "both must be in the joint embedding space")
    if isinstance(texts, str) or len(texts) != text_emb.shape[0]:
        n = "a string" if isinstance(texts, str) else len(texts)
        raise TextSpanError(f"texts has {n} entries but text_emb has {text_emb.shape[0]} rows; give one text per row")
    if text_emb.shape[0] == 0:
        raise TextSpanError("the text pool is empty; pass at least one description")
    return contrib.detach().to(torch.float64), text_emb.detach().to(contrib.device, torch.float64)


def _top_right_singular(C: torch.Tensor, n_components: int) -> torch.Tensor:
    """(r, D): top-r right singular vectors of C (K, D), r = min(n_components, K, D)."""
    _, _, vh = torch.linalg.svd(C, full_matrices=False)  # vh (min(K, D), D)
    return vh[: min(n_components, vh.shape[0])]


def _std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation over rows (dim 0), as the reference (torch .std)."""
    return x.std(dim=0, unbiased=True)


# ------------------------------------------------------------------------------------- pools
def _read_builtin(name: str) -> list[str]:
    text = resources.files("surgery").joinpath("data", name).read_text(encoding="utf-8")
    return _clean_lines(text.splitlines())


def _clean_lines(lines: Sequence[str]) -> list[str]:
    """Stripped, non-empty, '#'-comment-free lines, duplicates dropped (first kept)."""
    out = (ln.strip() for ln in lines)
    return list(dict.fromkeys(ln for ln in out if ln and not ln.startswith("#")))


def _read_user_pool(path: Path) -> list[str]:
    """A user pool: a JSON list of strings, or plain text with one description per line."""
    if not path.is_file():
        raise TextSpanError(f"description pool {str(path)!r} is not a file; pass a pool kind "
                            f"({', '.join(POOL_KINDS)}) or a path to a .txt / .json file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TextSpanError(f"cannot read description pool {str(path)!r} ({exc}); "
                            "pass a UTF-8 text or JSON file") from exc
    if path.suffix.lower() == ".json" or raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TextSpanError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                                "give a JSON list of strings or one description per line") from exc
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            raise TextSpanError(f"{str(path)!r} must hold a JSON list of strings")
        return _clean_lines(data)
    return _clean_lines(raw.splitlines())


def load_pool(
    kind: str | Path = "bias_augmented",
    extra: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Descriptions for TextSpan: a built-in pool (``general``, ``demographic``, ``bias_augmented`` =
    general + demographic) or a user file (one per line, or a JSON list), plus ``extra`` descriptions
    (a list, or a mapping of any labels to lists, e.g. a world's concept and group words) appended.
    Blank lines and lines starting with ``#`` are skipped; duplicates keep their first position."""
    if isinstance(kind, str) and kind in _POOL_FILES:
        pool = [t for name in _POOL_FILES[kind] for t in _read_builtin(name)]
    elif isinstance(kind, (str, Path)):
        pool = _read_user_pool(Path(kind))
    else:
        raise TextSpanError(f"pool must be one of {', '.join(POOL_KINDS)} or a file path, got {kind!r}")
    pool = _clean_lines(pool + _extra_list(extra))
    if not pool:
        raise TextSpanError(f"description pool {str(kind)!r} is empty; give at least one description")
    return pool


def _extra_list(extra: Sequence[str] | Mapping[str, Sequence[str]] | None) -> list[str]:
    if extra is None:
        return []
    items = [t for v in extra.values() for t in v] if isinstance(extra, Mapping) else extra
    if isinstance(items, str) or not all(isinstance(t, str) for t in items):
        raise TextSpanError("extra descriptions must be a list of strings (or a mapping to lists of strings)")
    return list(items)


def demographic_descriptions() -> list[str]:
    """The built-in demographic descriptions (to count how many of a head's picks are demographic)."""
    return _read_builtin(DEMOGRAPHIC_FILE)


def count_in(result: TextSpanResult, subset: Sequence[str]) -> int:
    """How many of the head's chosen descriptions are in ``subset`` (e.g. the demographic ones)."""
    wanted = set(subset)
    return sum(t in wanted for t in result.texts)
