"""The fairness gate for quantized files: a quantized pair must stay close to the fp32 export in
what a debiased encoder promises, not only in its numbers.

On labelled probe images (a world model's own eval split, or ``--gate-images/--gate-labels``):

* mean cosine between the quantized and the fp32 embeddings, of the images and of the text
  queries (each >= ``min_cosine``, default 0.99);
* zero-shot concept accuracy within ``max_accuracy_change`` (default 1 point) of the fp32 file's
  (either way: a changed ranking is a changed model). A world split names its concept; a user's
  folder names it with ``concept`` (``--gate-concept COLUMN``, or a column called ``concept``),
  and a folder that names none is refused: the accuracy limit is never silently skipped;
* mean MaxSkew@K of the neutral queries within ``max_skew_change`` (default 0.02) of the fp32
  file's, for every protected attribute. K must be below the number of probe images: MaxSkew@K
  over every image does not depend on the ranking, so such a gate could not fail.

Every figure is measured at the batch sizes the file runs at: ``GATE_BATCH`` rows per call, and one
row alone (``figures["at_batch_1"]``), as a lone request is served. Dynamic int8 computes its
activation scales per call, so a row's embedding depends on the rows beside it (issue 29: up to
0.014 between an image alone and in a batch of 64); a file is refused when its figures fail at
either batch size.

The accuracy and bias figures come from :func:`surgery.eval.evaluate.evaluate`, the same code as
``clipsurgery eval`` and ``compare``. A figure the gate needs that was not measured fails it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surgery.errors import DataError, SurgeryError
from surgery.eval.embedding import EmbedOptions, embed_images, embed_texts
from surgery.eval.encoders import Encoder
from surgery.eval.evaluate import PROTECTED_COLUMNS, EvalSpec, evaluate, spec_from_folder
from surgery.io.images import resolve_images_dir
from surgery.io.labels import load_labels
from surgery.metrics.bias import BiasConventions
from surgery.model.loading import LoadedModel
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import balanced_size, generate, write_split
from surgery.world.params import WorldParams

GATE_BATCH = 64  # images per ONNX Runtime call while gating


@dataclass
class GateOptions:
    min_cosine: float = 0.99  # mean cosine of quantized to fp32 embeddings (images and texts), at least
    max_accuracy_change: float = 0.01  # zero-shot accuracy change (fraction: 0.01 = 1 point), at most
    max_skew_change: float = 0.02  # change of mean MaxSkew@K, per attribute, at most

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine <= 1.0:
            raise SurgeryError(f"gate minimum cosine {self.min_cosine} is outside [-1, 1]")
        if not 0.0 <= self.max_accuracy_change <= 1.0:
            raise SurgeryError(f"gate accuracy change {self.max_accuracy_change} is outside [0, 1] (a fraction)")
        if self.max_skew_change < 0:
            raise SurgeryError(f"gate MaxSkew change {self.max_skew_change} is negative")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GateData:
    """The gate's labelled probe images: a folder + labels, or a world whose eval split is generated."""
    images_dir: str | None = None  # image folder (with labels_path)
    labels_path: str | None = None  # labels CSV for images_dir (a world split's labels.csv names the concept)
    world: WorldParams | None = None  # used when no folder is given: its eval split is generated
    k: int = 50  # MaxSkew@K; below the number of probe images
    concept: str | None = None  # labels column for zero-shot accuracy (default: a world split's, or "concept")
    attributes: list[str] | None = None  # protected-attribute columns (default: those named gender/race/age/group)

    def __post_init__(self) -> None:
        if (self.images_dir is None) != (self.labels_path is None):
            raise SurgeryError("--gate-images and --gate-labels go together")
        if self.images_dir is None and self.world is None:
            raise SurgeryError("a quantized export is gated on labelled probe images and this model carries no "
                               "world to generate them from: pass --gate-images DIR --gate-labels CSV (for example "
                               "a split written by clipsurgery world generate)")
        if self.images_dir is not None:
            if not os.path.exists(self.images_dir):
                raise SurgeryError(f"--gate-images {self.images_dir} does not exist; give the folder of labelled "
                                   "probe images")
            if not os.path.isdir(self.images_dir):
                raise SurgeryError(f"--gate-images {self.images_dir} is a file, not a folder; give the folder of "
                                   "labelled probe images (the labels CSV goes to --gate-labels)")
            if os.path.isdir(self.labels_path):
                raise SurgeryError(f"--gate-labels {self.labels_path} is a folder; give the labels CSV")
        if self.k < 1:
            raise SurgeryError(f"--gate-k must be >= 1, got {self.k}")

    @classmethod
    def for_model(cls, loaded: LoadedModel | None, images_dir: str | None = None, labels_path: str | None = None,
                  k: int = 50, concept: str | None = None, attributes: list[str] | None = None) -> "GateData":
        world = world_params_of(loaded) if loaded is not None and images_dir is None else None
        return cls(images_dir=images_dir, labels_path=labels_path, world=world, k=k, concept=concept,
                   attributes=attributes)

    def spec(self, work: str) -> EvalSpec:
        """The probe set as an EvalSpec (a world's eval split is written under ``work``); refuses a
        probe set the gate cannot measure (no concept, no protected attribute, K not below its size)."""
        if self.images_dir is not None:
            return gate_spec(self.images_dir, self.labels_path, self)
        folder = write_split(generate(self.world, "eval", balanced_size(self.world)), os.path.join(work, "gate"),
                             overwrite=True)
        return gate_spec(str(folder / "images"), str(folder / "labels.csv"), self)

    def describe(self) -> dict:
        if self.images_dir is not None:
            return {"images": self.images_dir, "labels": self.labels_path, "k": self.k, "concept": self.concept}
        return {"world": self.world.hash()[:12], "split": "eval", "n": balanced_size(self.world), "k": self.k}


def gate_spec(images_dir: str, labels_path: str, data: GateData) -> EvalSpec:
    """The EvalSpec of a labelled folder, with the gate's own flags in every message."""
    labels = load_labels(labels_path, resolve_images_dir(images_dir))
    attributes = data.attributes or [c for c in PROTECTED_COLUMNS if c in labels.attributes]
    if not attributes:
        raise DataError(f"{labels_path}: no protected-attribute column ({', '.join(PROTECTED_COLUMNS)}); pass "
                        f"--gate-attributes with some of: {', '.join(labels.attributes) or '(no columns)'}")
    # K is checked below with the gate's flag in the message (spec_from_folder's says --k)
    spec = spec_from_folder(images_dir, labels_path, attributes=list(attributes), conventions=BiasConventions(k=1))
    concept = data.concept or (None if spec.concept_column else "concept" if "concept" in labels.attributes else None)
    if concept is not None:
        if concept not in labels.attributes:
            raise DataError(f"--gate-concept {concept!r} is not a column of {labels_path}; columns: "
                            f"{', '.join(labels.attributes)}")
        values = sorted(set(labels.attributes[concept]))
        if len(values) < 2:
            raise DataError(f"--gate-concept {concept!r} has one value in {labels_path}; zero-shot accuracy needs at "
                            "least two classes")
        spec = dataclasses.replace(spec, concept_column=concept, concept_values=values,
                                   class_prompts=[f"a photo of a {v.replace('_', ' ')}." for v in values])
    elif spec.concept_column is None:
        others = [c for c in labels.attributes if c not in attributes]
        raise DataError(f"{labels_path} names no concept for the gate's zero-shot accuracy check "
                        "(--gate-max-accuracy-change): pass --gate-concept COLUMN, one of: "
                        f"{', '.join(others or list(labels.attributes))}")
    check_gate_k(data.k, len(spec.labels))
    return dataclasses.replace(spec, conventions=BiasConventions(k=data.k))


def check_gate_k(k: int, n_images: int) -> None:
    """MaxSkew@K needs K below the number of images: with K = n the top K is every image whatever the
    ranking, so the bias figure could not move and the gate could not fail."""
    if k >= n_images:
        raise DataError(f"--gate-k {k} is not below the {n_images} gate images: MaxSkew@{k} would take every image "
                        "whatever the ranking, so the gate could not fail; pass a smaller --gate-k or more images")


def gate_figures(reference: Encoder, candidate: Encoder, spec: EvalSpec, cache_dir: str | None = None) -> dict:
    """The gate's figures: the candidate (quantized) encoder against the reference (fp32) one."""
    spec = dataclasses.replace(spec, captions=None)  # retrieval is not gated: skip its embeddings
    opt = EmbedOptions(batch_size=GATE_BATCH, cache_dir=cache_dir)  # evaluate() below reads what this embeds
    texts = list(dict.fromkeys([*spec.queries, *(spec.class_prompts or [])]))
    cos = {}
    ref_img = embed_images(reference, spec.images_dir, spec.labels.files, opt)
    got_img = embed_images(candidate, spec.images_dir, spec.labels.files, opt)
    if not torch.equal(ref_img.indices, got_img.indices):
        raise SurgeryError("the gate's images were read differently by the two files; check the image folder")
    check_gate_k(spec.conventions.k, len(ref_img.indices))  # the readable ones
    cos["image"] = _mean_cosine(ref_img.embeddings, got_img.embeddings)  # (n, D) each
    cos["text"] = _mean_cosine(embed_texts(reference, texts, opt), embed_texts(candidate, texts, opt))  # (T, D)
    before, after = evaluate(reference, spec, opt), evaluate(candidate, spec, opt)
    figures: dict = {"n_images": before["n_images"], "n_texts": len(texts), "k": spec.conventions.k,
                     "batch": GATE_BATCH, **_quality(before, after, cos, spec)}
    # one row per call, as a lone request runs (no cache: it is keyed on the file, not the batch size)
    lone = EmbedOptions(batch_size=1)
    lone_img = embed_images(candidate, spec.images_dir, spec.labels.files, lone)
    lone_cos = {"image": _mean_cosine(ref_img.embeddings, lone_img.embeddings),
                "text": _mean_cosine(embed_texts(reference, texts, opt), embed_texts(candidate, texts, lone))}
    figures["at_batch_1"] = _quality(before, evaluate(candidate, spec, lone, images=lone_img), lone_cos, spec)
    return figures


def _quality(before: dict, after: dict, cos: dict, spec: EvalSpec) -> dict:
    """Cosine, accuracy and MaxSkew of one candidate run against the reference's figures."""
    out: dict = {"mean_cosine": cos}
    if "zero_shot_accuracy" in before:
        out["zero_shot_accuracy"] = _pair(before["zero_shot_accuracy"], after["zero_shot_accuracy"])
    out["max_skew"] = {name: _pair(before["bias"][name]["max_skew"], after["bias"][name]["max_skew"])
                       for name in spec.attributes}
    return out


def check_gate(figures: dict, options: GateOptions) -> list[str]:
    """What failed, one phrase each (empty when the gate passes). NaN fails every check. A check
    that fails only at batch size 1 says so ("at batch 1: ..."); one failing at both is said once."""
    batched = _failures(figures, options, figures["k"])
    lone = _failures(figures["at_batch_1"], options, figures["k"]) if "at_batch_1" in figures else {}
    return [*batched.values(), *(f"at batch 1: {msg}" for key, msg in lone.items() if key not in batched)]


def _failures(figures: dict, options: GateOptions, k: int) -> dict[tuple, str]:
    """{check: phrase} of what one set of figures fails."""
    failures: dict[tuple, str] = {}
    for what, value in figures["mean_cosine"].items():
        if not value >= options.min_cosine:
            failures[("cosine", what)] = f"{what} mean cosine {value:.4f} < {options.min_cosine}"
    acc = figures.get("zero_shot_accuracy")
    if acc is None:
        failures[("accuracy",)] = "zero-shot accuracy was not measured (the probe labels name no concept)"
    elif not abs(acc["change"]) <= options.max_accuracy_change + 1e-12:
        failures[("accuracy",)] = (f"zero-shot accuracy moved {100 * acc['change']:+.2f} points "
                                   f"(limit {100 * options.max_accuracy_change:g})")
    if not figures["max_skew"]:
        failures[("skew",)] = "MaxSkew was not measured (no protected attribute)"
    for name, skew in figures["max_skew"].items():
        if not abs(skew["change"]) <= options.max_skew_change + 1e-12:
            failures[("skew", name)] = (f"mean MaxSkew@{k} ({name}) moved {skew['change']:+.4f} "
                                        f"(limit {options.max_skew_change:g})")
    return failures


def format_gate(figures: dict) -> str:
    """One line: cosine, accuracy and MaxSkew, fp32 -> quantized."""
    parts = [f"mean cosine image {figures['mean_cosine']['image']:.4f}, text {figures['mean_cosine']['text']:.4f}"]
    acc = figures.get("zero_shot_accuracy")
    if acc is not None:
        parts.append(f"zero-shot accuracy {100 * acc['fp32']:.2f}% -> {100 * acc['quantized']:.2f}% "
                     f"({100 * acc['change']:+.2f} points)")
    else:
        parts.append("zero-shot accuracy not measured (the probe labels name no concept)")
    for name, skew in figures["max_skew"].items():
        parts.append(f"mean MaxSkew@{figures['k']} ({name}) {skew['fp32']:.4f} -> {skew['quantized']:.4f} "
                     f"({skew['change']:+.4f})")
    lone = figures.get("at_batch_1")
    if lone is not None:
        acc1 = lone.get("zero_shot_accuracy")
        parts.append("at batch 1: mean cosine image {:.4f}, text {:.4f}{}{}".format(
            lone["mean_cosine"]["image"], lone["mean_cosine"]["text"],
            f", accuracy {100 * acc1['change']:+.2f} points" if acc1 else "",
            "".join(f", MaxSkew ({n}) {s['change']:+.4f}" for n, s in lone["max_skew"].items())))
    return f"{'; '.join(parts)} on {figures['n_images']} images"


def _pair(fp32: float, quantized: float) -> dict:
    return {"fp32": float(fp32), "quantized": float(quantized), "change": float(quantized) - float(fp32)}


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1).mean())
