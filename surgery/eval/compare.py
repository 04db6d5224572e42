"""Before/after comparison of two encoders on one evaluation set, and its report files."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from surgery.eval.embedding import EmbedOptions, Progress, embed_images, embed_images_multi
from surgery.eval.encoders import Encoder
from surgery.eval.evaluate import EvalSpec, evaluate
from surgery.io.fs import atomic_output, write_text_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"


@dataclass
class Row:
    metric: str
    before: float | None
    after: float | None
    better: str  # "lower" | "higher"

    @property
    def change(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


def compare(before: Encoder, after: Encoder, spec: EvalSpec, options: EmbedOptions | None = None,
            progress: Progress | None = None, same_images: bool = False,
            retrieval_progress: Progress | None = None) -> dict:
    """Evaluate both encoders; returns ``{"spec", "before", "after", "rows"}`` (JSON-able).

    With a cache, both models embed the images in one pass over the decoded images first.
    ``same_images``: the two encoders' image towers are the same (an edit of the text side only),
    so the images are embedded once, by ``before``, and both evaluations read those embeddings.
    ``retrieval_progress``: told while a retrieval set's images are embedded (default: ``progress``).
    """
    retrieval = spec.retrieval
    told = retrieval_progress or progress
    if same_images:
        images = embed_images(before, spec.images_dir, spec.labels.files, options, progress)
        gallery = embed_images(before, retrieval.images_dir, retrieval.files, options, told) \
            if retrieval is not None else None
        rep_before = evaluate(before, spec, options, progress, images=images, retrieval_images=gallery)
        rep_after = evaluate(after, spec, options, progress, images=images, retrieval_images=gallery)
        rep_after["images_from"] = "before (the image tower is unchanged)"
    else:
        if options is not None and options.cache_dir:
            embed_images_multi([before, after], spec.images_dir, spec.labels.files, options, progress)
            if retrieval is not None:
                embed_images_multi([before, after], retrieval.images_dir, retrieval.files, options, told)
        rep_before = evaluate(before, spec, options, progress, retrieval_progress=told)
        rep_after = evaluate(after, spec, options, progress, retrieval_progress=told)
    rows = summary_rows(rep_before, rep_after, spec.conventions.k)
    return {
        "spec": spec.describe(),
        "before": rep_before,
        "after": rep_after,
        "rows": [{**vars(r), "change": r.change} for r in rows],
        "per_query": query_cuts(rep_before, rep_after),
    }


def query_cuts(before: dict, after: dict) -> dict[str, dict]:
    """Per attribute: each neutral query's MaxSkew@K before and after and its cut (1 - after / before),
    the mean's cut and the worst query's cut (the mean hides queries an edit does not touch).

    ``{attr: {"queries": [{"query", "before", "after", "cut"}], "mean_cut", "worst_cut", "worst_query",
    "wordings": {wording: the same for the queries in that wording}}}``; a query with no skew before
    has cut None and is left out of the worst.
    """
    out = {}
    for name, summ in before["bias"].items():
        other = after["bias"][name]
        out[name] = _cuts(before["queries"], summ["per_query"]["max_skew"], other["per_query"]["max_skew"],
                          summ["max_skew"], other["max_skew"])
        wordings = summ.get("wordings", {})
        if wordings:
            out[name]["wordings"] = {w: _cuts(v["queries"], v["per_query"], other["wordings"][w]["per_query"],
                                              v["max_skew"], other["wordings"][w]["max_skew"])
                                     for w, v in wordings.items()}
    return out


def _cuts(queries: list[str], before: list[float], after: list[float], mean_before: float, mean_after: float) -> dict:
    rows = [{"query": q, "before": x, "after": y, "cut": 1.0 - y / x if x > 0 else None}
            for q, x, y in zip(queries, before, after)]
    cuts = [r for r in rows if r["cut"] is not None]
    worst = min(cuts, key=lambda r: r["cut"]) if cuts else None
    return {"queries": rows, "mean_cut": 1.0 - mean_after / mean_before if mean_before > 0 else None,
            "worst_cut": worst["cut"] if worst else None, "worst_query": worst["query"] if worst else None}


def summary_rows(before: dict, after: dict | None, k: int) -> list[Row]:
    """The headline metrics, one row each (``after`` may be None for a single-model eval)."""
    after = after or {}
    rows: list[Row] = []
    for name, summ in before["bias"].items():
        other = after.get("bias", {}).get(name, {})
        rows.append(Row(f"{name}: mean MaxSkew@{k}", summ["max_skew"], other.get("max_skew"), "lower"))
        rows.append(Row(f"{name}: mean MinSkew@{k}", summ["min_skew"], other.get("min_skew"), "higher"))
        rows.append(Row(f"{name}: mean NDKL@{k}", summ["ndkl"], other.get("ndkl"), "lower"))
        if "cramers_v" in summ:
            rows.append(Row(f"{name}: Cramér's V (concept vs group)", summ["cramers_v"], other.get("cramers_v"), "lower"))
        if "group_accuracy" in summ:
            rows.append(Row(f"{name}: zero-shot group accuracy (group prompts)", summ["group_accuracy"],
                            other.get("group_accuracy"), "higher"))
        for wording, worded in summ.get("wordings", {}).items():
            rows.append(Row(f"{name}: mean MaxSkew@{k}, queries worded '{wording_label(wording)}'", worded["max_skew"],
                            other.get("wordings", {}).get(wording, {}).get("max_skew"), "lower"))
    if "zero_shot_accuracy" in before:
        rows.append(Row("zero-shot concept accuracy", before["zero_shot_accuracy"], after.get("zero_shot_accuracy"), "higher"))
    if "cell_precision" in before:
        cells = before["cell_precision"]
        rows.append(Row(f"group-naming queries: precision@{cells['k']}", cells["mean"],
                        after.get("cell_precision", {}).get("mean"), "higher"))
    for key, value in before.get("retrieval", {}).items():
        if "@" in key:
            label = ("text->image" if key.startswith("t2i") else "image->text") + f" Recall@{key.split('@')[1]} (hit@k)"
            rows.append(Row(label, value, after.get("retrieval", {}).get(key), "higher"))
    return rows


def format_query_cuts(per_query: dict, k: int) -> list[str]:
    """One line per attribute: the mean MaxSkew@K cut beside the worst query's; one more line for
    the queries' other wordings when the report has them."""
    lines = []
    for name, per in per_query.items():
        lines.append(f"{name}: MaxSkew@{k} cut {_pct(per['mean_cut'])} on the mean, {_pct(per['worst_cut'])} on the "
                     f"worst query" + (f" ({per['worst_query']})" if per["worst_query"] else ""))
        wordings = per.get("wordings", {})
        if wordings:
            cuts = ", ".join(f"'{wording_label(w)}' {_pct(c['mean_cut'])} (worst {_pct(c['worst_cut'])})"
                             for w, c in wordings.items())
            lines.append(f"{name}: the same queries in other wordings, mean cut: {cuts}")
    return lines


def wording_label(template: str) -> str:
    """A query wording as people read it: "a drawing of {}" -> "a drawing of …"."""
    return template.replace("{}", "…")


def format_table(rows: list[Row], single: bool = False) -> str:
    """Markdown table of the rows."""
    if single:
        lines = ["| metric | value |", "| --- | ---: |"]
        lines += [f"| {r.metric} | {_fmt(r.before)} |" for r in rows]
        return "\n".join(lines)
    lines = ["| metric | before | after | change |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        change = "" if r.change is None else f"{r.change:+.4f}"
        lines.append(f"| {r.metric} | {_fmt(r.before)} | {_fmt(r.after)} | {change} |")
    return "\n".join(lines)


def write_report(out_dir: str, result: dict, *, title: str = "clipsurgery compare") -> list[str]:
    """report.json, report.md and report.png in ``out_dir``; each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [Row(r["metric"], r["before"], r["after"], r["better"]) for r in result["rows"]]
    single = result.get("after") is None
    paths = [write_text_atomic(os.path.join(out_dir, REPORT_JSON), json.dumps(result, indent=2))]
    path = os.path.join(out_dir, REPORT_PNG)
    with atomic_output(path) as tmp:
        _plot(result, str(tmp))
    paths.append(path)
    paths.append(write_text_atomic(os.path.join(out_dir, REPORT_MD), _markdown(result, rows, single, title)))
    return paths


def _retrieval_line(described: dict, measured: dict) -> str:
    """Where recall was measured when it is not on the labelled images (``--retrieval``)."""
    n = measured.get("n_images", described["images"])
    return (f"- recall: on a retrieval set, {n} images with {described['captions']} captions from "
            f"`{described['csv']}` (not the labelled images)")


def _markdown(result: dict, rows: list[Row], single: bool, title: str) -> str:
    spec = result["spec"]
    conv = spec["conventions"]
    models = f"- model: `{result['before']['model']}`" if single else (
        f"- before: `{result['before']['model']}` (weights hash {result['before']['identity'][:12]})\n"
        f"- after: `{result['after']['model']}` (weights hash {result['after']['identity'][:12]})"
    )
    skipped = result["before"]["skipped"]
    parts = [
        f"# {title}", "", models,
        f"- images: {result['before']['n_images']} from `{spec['images_dir']}`"
        + (f" ({len(skipped)} unreadable, skipped: {', '.join(s['file'] for s in skipped[:10])})" if skipped else ""),
        f"- neutral queries: {spec['n_queries']}; attributes: {', '.join(spec['attributes'])}",
        *([_retrieval_line(spec["retrieval_set"], result["before"].get("retrieval_set", {}))]
          if spec.get("retrieval_set") else []),
        f"- conventions: K={conv['k']}, target {conv['target']}, empty groups p_top = {conv['zero_count']}/K, "
        f"{conv['reduce']} over queries; recall is hit@k", "",
        format_table(rows, single), "", f"![before/after]({REPORT_PNG})", "",
    ]
    if result.get("targets"):
        parts += ["## Targets and budgets on these images", "",
                  "Each budget is a drop measured on a sample: shown with its 95% paired bootstrap interval over "
                  "the images (accuracy) or caption queries (recall). A budget is missed only when the whole "
                  "interval is above it, and unresolved when the interval is wider than the budget (these images "
                  "cannot tell a drop of that size from none).", "",
                  "| figure | value | 95% interval | limit | verdict |", "| --- | ---: | --- | ---: | --- |"]
        for c in result["targets"]:
            iv = c.get("interval")
            scale = 1 if "ratio" in c["name"] else 100
            shown = f"[{scale * iv['low']:.2f}, {scale * iv['high']:.2f}]" if iv else "-"
            parts.append(f"| {c['name']} | {c['value']:.2f} | {shown} | {c['limit']:g} | {c['verdict']} |")
        parts.append("")
    for name, per in (result.get("per_query") or {}).items():
        parts += [f"## {name}: MaxSkew@{conv['k']} per neutral query", "",
                  f"Mean cut {_pct(per['mean_cut'])}; worst query cut {_pct(per['worst_cut'])} "
                  f"({per['worst_query']}).", "",
                  "| query | before | after | cut |", "| --- | ---: | ---: | ---: |"]
        parts += [f"| {r['query']} | {r['before']:.4f} | {r['after']:.4f} | {_pct(r['cut'])} |" for r in per["queries"]]
        parts.append("")
        if per.get("wordings"):
            parts += [f"## {name}: the same queries in other wordings", "",
                      "| wording | mean before | mean after | mean cut | worst cut |", "| --- | ---: | ---: | ---: | ---: |"]
            for wording, cut in per["wordings"].items():
                b = sum(r["before"] for r in cut["queries"]) / len(cut["queries"])
                a = sum(r["after"] for r in cut["queries"]) / len(cut["queries"])
                parts.append(f"| {wording_label(wording)} | {b:.4f} | {a:.4f} | {_pct(cut['mean_cut'])} | "
                             f"{_pct(cut['worst_cut'])} |")
            parts.append("")
    parts += _edits_markdown(result.get("plan"))
    return "\n".join(parts)


def _edits_markdown(plan: dict | None) -> list[str]:
    """The debias report's account of its edits: what each kind contributed, and what the balance edit covers."""
    if not plan:
        return []
    provenance = plan.get("provenance", {})
    parts = ["## The edits", "",
             f"- heads edited: {len(plan.get('heads', []))}; neurons deactivated: "
             f"{sum(len(n['ids']) for n in plan.get('neurons', []))}; balance edits: "
             + (", ".join(f"{b['tower']} tower, rank {len(b['u'][0])}" for b in plan.get("balance", [])) or "none")
             + ("; open balance: text tower" if plan.get("open_balance") else "")]
    if "removal_searched" in provenance and not provenance["removal_searched"]:
        parts.append("- head and neuron edits were not searched: the balance edit alone met the targets on the "
                     "selection draws (`--removal always` searches them too)")
    contributions = provenance.get("contributions") or {}
    if contributions:
        before = provenance.get("before", {}).get("max_skew")
        parts += ["", "What each kind contributed, on the selection draws (mean MaxSkew, accuracy and recall "
                      "averaged over them):", "",
                  "| edits | mean MaxSkew | concept acc | group acc | t2i@5 | i2t@5 |", "| --- | ---: | ---: | ---: | ---: | ---: |",
                  f"| none | {_fmt(before)} | {_fmt(provenance['before'].get('accuracy'))} | "
                  f"{_fmt(provenance['before'].get('group_accuracy'))} | {_fmt(provenance['before'].get('recall'))} | "
                  f"{_fmt(provenance['before'].get('recall_i2t'))} |"]
        for name, f in contributions.items():
            if f is None:
                parts.append(f"| {name} | - | - | - | - | - |")
            else:
                parts.append(f"| {name} | {_fmt(f['max_skew'])} | {_fmt(f.get('accuracy'))} | "
                             f"{_fmt(f.get('group_accuracy'))} | {_fmt(f.get('recall'))} | {_fmt(f.get('recall_i2t'))} |")
    budget = provenance.get("search_budget")
    if budget:
        limits = ", ".join(x for x in (f"{budget['max_trials']} trials" if budget.get("max_trials") else "",
                                       f"{budget['max_seconds']:g} s" if budget.get("max_seconds") else "") if x)
        heads = (f", {budget['head_sets']} of them head sets (a forward pass over the selection images each; "
                 f"budget {budget['max_head_sets']})" if budget.get("max_head_sets") else "")
        parts += ["", f"The edit search measured {budget['trials']} sets{heads} (budget: "
                      f"{limits or 'none'}) and stopped: {budget['stopped_by']}."]
    for edit in plan.get("balance", []):
        held = (edit.get("provenance") or {}).get("held_out_queries") or {}
        queries = (edit.get("provenance") or {}).get("queries", [])
        parts += ["", f"### The balance edit ({edit['tower']} tower)", "",
                  f"It was fit on {len(queries)} neutral queries and covers those: a fixed map equalises each of "
                  "them across groups; a query outside the list is corrected only as far as it shares their "
                  "directions."]
        if held.get("cut") is not None:
            parts.append(f"Queries held out of the fit (two folds, each fit on half the queries and measured on the "
                         f"other half, selection draws): mean MaxSkew cut {_pct(held['cut'])}.")
    for edit in plan.get("open_balance", []):
        prov = edit.get("provenance") or {}
        held, gate = prov.get("held_out_queries") or {}, prov.get("gate") or {}
        parts += ["", "### The open balance (text tower)", "",
                  f"Every text gets its own correction at run time: its {edit['neighbours']} nearest images of each "
                  f"group in a bank of {len(edit['bank'])} probe images ({', '.join(map(str, edit['group_counts']))} "
                  "per group) are given equal evidence, unless the text names a group. The "
                  f"{len(prov.get('queries', []))} queries listed ({', '.join(prov.get('queries', [])[:8])}"
                  f"{', ...' if len(prov.get('queries', [])) > 8 else ''}) only calibrate that gate: fully corrected "
                  f"up to lean {edit['gate_lo']:.2f} toward one group prompt (in units of the group prompts' own lean; "
                  f"the listed queries lean at most {max(gate.get('neutral_leans') or [0]):.2f}), left alone from "
                  f"{edit['gate_hi']:.2f} (halfway to the least a listed query mixed with a group prompt leans)"
                  + ("" if gate.get("separable", True) else " (the listed queries lean as far as texts naming a group: "
                                                                "the gate cannot tell them apart)") + "."]
        if held.get("cut") is not None:
            parts.append(f"Queries held out of the gate's calibration (two folds, selection draws): mean MaxSkew cut "
                         f"{_pct(held['cut'])}.")
    parts.append("")
    return parts


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = result["before"], result.get("after")
    attr = next(iter(before["bias"]))
    queries = before["queries"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    idx = range(len(queries))
    width = 0.4 if after else 0.8
    ax1.bar([i - width / 2 if after else i for i in idx], before["bias"][attr]["per_query"]["max_skew"],
            width, label="before" if after else "MaxSkew")
    if after:
        ax1.bar([i + width / 2 for i in idx], after["bias"][attr]["per_query"]["max_skew"], width, label="after")
    ax1.set_xticks(list(idx))
    ax1.set_xticklabels([q.replace("a photo of ", "") for q in queries], rotation=60, ha="right", fontsize=7)
    ax1.set_ylabel(f"MaxSkew@{result['spec']['conventions']['k']} ({attr})")
    ax1.set_title("bias per neutral query")
    ax1.legend()
    names, vals_b, vals_a = [], [], []
    if "zero_shot_accuracy" in before:
        names.append("zero-shot acc")
        vals_b.append(before["zero_shot_accuracy"])
        vals_a.append(after["zero_shot_accuracy"] if after else None)
    if "group_accuracy" in before["bias"][attr]:
        names.append(f"{attr} acc")
        vals_b.append(before["bias"][attr]["group_accuracy"])
        vals_a.append(after["bias"][attr].get("group_accuracy") if after else None)
    if "cell_precision" in before:
        names.append(f"naming P@{before['cell_precision']['k']}")
        vals_b.append(before["cell_precision"]["mean"])
        vals_a.append(after.get("cell_precision", {}).get("mean") if after else None)
    for key in ("t2i@1", "t2i@5", "i2t@1", "i2t@5"):
        if key in before.get("retrieval", {}):
            names.append(key)
            vals_b.append(before["retrieval"][key])
            vals_a.append(after["retrieval"][key] if after else None)
    if names:
        pos = range(len(names))
        ax2.bar([p - width / 2 if after else p for p in pos], vals_b, width, label="before" if after else None)
        if after:
            ax2.bar([p + width / 2 for p in pos], vals_a, width, label="after")
            ax2.legend()
        ax2.set_xticks(list(pos))
        ax2.set_xticklabels(names, rotation=30, ha="right")
        ax2.set_ylim(0, 1.05)
        ax2.set_title("accuracy and recall")
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
