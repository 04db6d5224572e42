"""The world suite: `clipsurgery debias` with unchanged defaults on worlds nobody tuned it on.

    python benchmarks/world_suite.py                 # train the missing worlds, then run every check
    python benchmarks/world_suite.py --only col3     # one world
    python benchmarks/world_suite.py --train-only    # just build the cache

Each world is a tiny CLIP trained by the same code as the bundled model (surgery.world.train) on a
planted-bias world that differs from the bundled one (red/blue, six shapes, bias 0.9, seed 0) and
from the others: texture and colour attributes, 2-4 groups, 4-8 concepts, bias strengths 0.7-0.95,
other seeds, and two weaker models (fewer training images and epochs). The trained models are
cached outside git ($CLIPSURGERY_SUITE_DIR, default ~/.cache/clipsurgery/world-suite).

Checks per world (one table at the end; the world models are not part of the test suite):
  quality    zero-shot concept accuracy (>= 0.65) and mean MaxSkew@50 (>= 0.6 ln G): worth debiasing
  debias     `clipsurgery debias WORLD out.onnx --allow-miss` with default settings: on the world's
             eval split the mean MaxSkew@50 cut (>= 50%), the worst query's cut (aim >= 30%), the
             concept accuracy drop and both Recall@5 drops (<= 2 points each)
  fresh      the same exported pair on a fresh draw of the world (`clipsurgery compare`)
Runs one job at a time (2 cores); the whole suite takes about 30 minutes here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from surgery.world.checkpoint import save_world_model
from surgery.world.generator import balanced_size
from surgery.world.params import WorldParams
from surgery.world.train import WorldTrainOptions, evaluate_world_model, train_world_model

FRESH_SEED_OFFSET = 5000  # a fresh draw: another seed of the same world than any the tool generated


@dataclass(frozen=True)
class SuiteWorld:
    name: str
    params: dict  # WorldParams fields
    train: dict = field(default_factory=dict)  # WorldTrainOptions fields
    weak: bool = False  # trained short on purpose: a model well below the bundled one's accuracy


SUITE = (
    SuiteWorld("tex2", {"seed": 11, "attribute_kind": "texture", "groups": ("stripes", "dots"), "bias_strength": 0.9}),
    SuiteWorld("col3", {"seed": 21, "groups": ("red", "green", "blue"),
                        "concepts": ("circle", "triangle", "star", "diamond", "hexagon"), "bias_strength": 0.85}),
    SuiteWorld("col4", {"seed": 31, "groups": ("red", "blue", "yellow", "purple"),
                        "concepts": ("square", "cross", "ring", "crescent"), "bias_strength": 0.95}),
    SuiteWorld("tex3-weak", {"seed": 41, "attribute_kind": "texture", "groups": ("stripes", "dots", "checks"),
                             "concepts": ("circle", "square", "triangle", "cross", "ring", "star", "diamond",
                                          "hexagon"), "bias_strength": 0.8},
               {"n_train": 20000, "epochs": 4, "warmup_steps": 60}, weak=True),
    SuiteWorld("col2-weak", {"seed": 51, "groups": ("orange", "cyan"),
                             "concepts": ("circle", "square", "triangle", "cross", "ring", "star", "diamond",
                                          "crescent"), "bias_strength": 0.7},
               {"n_train": 20000, "epochs": 4, "warmup_steps": 60}, weak=True),
)


def cache_dir() -> str:
    return os.environ.get("CLIPSURGERY_SUITE_DIR", os.path.expanduser("~/.cache/clipsurgery/world-suite"))


def model_path(world: SuiteWorld) -> str:
    return os.path.join(cache_dir(), f"{world.name}.safetensors")


def train(world: SuiteWorld) -> None:
    params = WorldParams.from_dict({**WorldParams().to_dict(), **world.params})
    options = WorldTrainOptions(seed=params.seed, n_eval=balanced_size(params), **world.train)
    start = time.perf_counter()
    model, history = train_world_model(params, options)
    quality = evaluate_world_model(model, params, n_eval=options.n_eval)
    os.makedirs(cache_dir(), exist_ok=True)
    save_world_model(model, params, model_path(world), history=history, quality=quality)
    print(f"[{world.name}] trained in {time.perf_counter() - start:.0f} s: concept accuracy "
          f"{quality.concept_accuracy:.3f}, MaxSkew@50 {quality.max_skew_at_50:.3f}", flush=True)


def quality_of(world: SuiteWorld) -> dict:
    from safetensors import safe_open

    with safe_open(model_path(world), "pt") as f:
        meta = f.metadata()
    quality = json.loads(meta["clipsurgery.quality"])
    groups = len(json.loads(meta["clipsurgery.world"])["groups"])
    return {"concept_accuracy": quality["concept_accuracy"], "max_skew": quality["max_skew_at_50"],
            "worth": quality["concept_accuracy"] >= 0.65 and quality["max_skew_at_50"] >= 0.6 * math.log(groups),
            "groups": groups}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True)


def figures(report_json: str) -> dict:
    """Cuts and drops (points) of a compare/debias report."""
    with open(report_json, encoding="utf-8") as f:
        report = json.load(f)
    before, after = report["before"], report["after"]
    per = next(iter(report["per_query"].values()))
    out = {"mean_cut": per["mean_cut"], "worst_cut": per["worst_cut"],
           "acc_drop": 100 * (before.get("zero_shot_accuracy", 0) - after.get("zero_shot_accuracy", 0))}
    for key in ("t2i@5", "i2t@5"):
        if key in before.get("retrieval", {}):
            out[f"{key}_drop"] = 100 * (before["retrieval"][key] - after["retrieval"][key])
    return out


def check(world: SuiteWorld, work: str) -> dict:
    row = {"world": world.name, **quality_of(world)}
    out = os.path.join(work, f"{world.name}.onnx")
    start = time.perf_counter()
    run = _cli("debias", model_path(world), out, "--allow-miss")
    row["debias_seconds"] = time.perf_counter() - start
    if run.returncode != 0:
        row["error"] = (run.stderr.strip().splitlines() or ["?"])[-1]
        return row
    row["eval"] = figures(os.path.join(work, f"{world.name}.report", "report.json"))
    fresh = os.path.join(work, f"{world.name}-fresh")
    params = WorldParams.from_dict({**WorldParams().to_dict(), **world.params})
    gen = _cli("world", "generate", "--out", fresh, "--like", model_path(world), "--seed",
               str(params.seed + FRESH_SEED_OFFSET))
    if gen.returncode != 0:
        row["error"] = gen.stderr.strip().splitlines()[-1]
        return row
    cmp = _cli("compare", model_path(world), out, "--images", os.path.join(fresh, "images"), "--labels",
               os.path.join(fresh, "labels.csv"), "--captions", os.path.join(fresh, "captions.csv"), "--out",
               os.path.join(work, f"{world.name}-fresh.report"))
    if cmp.returncode != 0:
        row["error"] = cmp.stderr.strip().splitlines()[-1]
        return row
    row["fresh"] = figures(os.path.join(work, f"{world.name}-fresh.report", "report.json"))
    return row


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _pts(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| world | G | concept acc | MaxSkew@50 | split | mean cut (>=50%) | worst query cut (>=30%) | "
             "acc drop (<=2) | t2i@5 drop (<=2) | i2t@5 drop (<=2) | all met |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        head = f"| {r['world']} | {r['groups']} | {r['concept_accuracy']:.3f} | {r['max_skew']:.3f} |"
        if "error" in r:
            lines.append(f"{head} error | {r['error']} | | | | | | |")
            continue
        for split in ("eval", "fresh"):
            f = r.get(split)
            if f is None:
                continue
            met = (f["mean_cut"] is not None and f["mean_cut"] >= 0.5 and f["acc_drop"] <= 2
                   and f.get("t2i@5_drop", 0) <= 2 and f.get("i2t@5_drop", 0) <= 2)
            lines.append(f"{head} {split} | {_pct(f['mean_cut'])} | {_pct(f['worst_cut'])} | {_pts(f['acc_drop'])} | "
                         f"{_pts(f.get('t2i@5_drop'))} | {_pts(f.get('i2t@5_drop'))} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated world names (default: all)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    worlds = [w for w in SUITE if args.only is None or w.name in args.only.split(",")]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for world in worlds:
        if not os.path.isfile(model_path(world)):
            train(world)
    if args.train_only:
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipsurgery-suite-") as work:
        for world in worlds:
            row = check(world, work)
            rows.append(row)
            print(f"[{world.name}] {json.dumps(row)}", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
