"""debias / balance with --retrieval: a group-labels-only probe whose recall budgets are measured
on a separate retrieval set, whose captions anchor the balance edit."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery.audit.ablation import head_edited_embeddings
from surgery.audit.probe import CaptionedImages, world_probe_set
from surgery.debias.budget import Budget
from surgery.eval.embedding import embed_images, embed_texts
from surgery.eval.encoders import TorchEncoder
from surgery.io.captions import caption_pairs
from surgery.io.retrieval import load_retrieval_set
from surgery.metrics import retrieval_recall
from surgery.model.encode import text_embeddings
from surgery.world.checkpoint import world_params_of
from surgery.world.generator import generate, write_split
from surgery.world.params import WorldParams
from surgery.world.prompts import group_prompts, neutral_queries

from helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def world():
    """The bundled world model, one selection draw without captions (a labels-only probe) and a
    retrieval set drawn with another seed."""
    loaded = surgery.load("builtin:world")
    params = world_params_of(loaded)
    draw = dataclasses.replace(world_probe_set(dataclasses.replace(params, seed=params.seed + 1000), loaded.preprocess,
                                               240), captions=None)
    other = world_probe_set(dataclasses.replace(params, seed=params.seed + 77), loaded.preprocess, 96)
    retrieval = CaptionedImages(other.images, list(other.captions), torch.arange(len(other)))
    return loaded, draw, retrieval


def test_the_search_measures_recall_on_the_retrieval_set_with_every_edit_of_the_set_applied(world, monkeypatch):
    """Balance and a head in one set: the search scores recall on the retrieval set's images through
    the head edit and the balance's image side, and on its captions through the balance's text side
    (each checked on both sides of the fixed map); unedited, the figures are the model's own."""
    from surgery.audit.vision import AuditOptions, audit_vision
    from surgery.debias.balance import BalanceOptions, Draw, Texts, fit_balance
    from surgery.debias.search import BalanceCandidate, EditSearchOptions, search_edits

    loaded, draw, retrieval = world
    q = text_embeddings(loaded.model, draw.queries, loaded.tokenizer)
    groups = text_embeddings(loaded.model, draw.group_prompts, loaded.tokenizer)
    caps = text_embeddings(loaded.model, retrieval.captions, loaded.tokenizer)
    audit = audit_vision(loaded.model, draw, loaded.tokenizer, AuditOptions(k=20, textspan_iterations=0, propose=False))
    budget = Budget(max_bias_ratio=0.9, max_accuracy_drop=1.0, max_recall_drop=1.0, max_group_accuracy_drop=1.0)
    scored = []  # (image_emb, caption_emb) of every recall the search measured
    original = retrieval.recalls
    monkeypatch.setattr(retrieval, "recalls", lambda img, cap: scored.append((img, cap)) or original(img, cap))
    plain = head_edited_embeddings(loaded.model, retrieval, {}, None)
    for side, max_heads in (("text", 1), ("image", 0)):
        scored.clear()
        candidate = BalanceCandidate(BalanceOptions(k=20, side=side), torch.cat([q, groups]),
                                     torch.ones(len(q) + len(groups)))
        options = EditSearchOptions(budget=budget, max_heads=max_heads, k=20, confirm=2, stop_at_target=False)
        result = search_edits(loaded.model, [draw], audit, q, None, options, group_emb=groups, balance=candidate,
                              retrieval=retrieval, retrieval_emb=caps)
        assert result.balance is not None and len(result.heads) == max_heads, result.order
        assert {k: result.before[k] for k in ("recall", "recall_i2t")} == original(F.normalize(plain, dim=-1), caps)
        embs = head_edited_embeddings(loaded.model, draw, result.heads, audit.means)
        fit = fit_balance(Texts(q, candidate.pool, candidate.pool_weights), [Draw(embs, draw.groups)], 2,
                          candidate.options)
        images = F.normalize(fit.apply_images(head_edited_embeddings(loaded.model, retrieval, result.heads,
                                                                     audit.means)), dim=-1)
        texts = F.normalize(fit.apply_texts(caps), dim=-1)
        moved = texts if side == "text" else images
        assert not torch.allclose(moved, caps if side == "text" else F.normalize(plain, dim=-1), atol=1e-3)
        assert any(torch.allclose(img, images, atol=1e-6) and torch.allclose(cap, texts, atol=1e-6)
                   for img, cap in scored), side  # the chosen set was scored on exactly these
        assert {k: result.after[k] for k in ("recall", "recall_i2t")} == pytest.approx(original(images, texts), abs=1e-12)
    with pytest.raises(ValueError, match="caption embeddings"):
        search_edits(loaded.model, [draw], None, q, None, options, retrieval=retrieval)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A labels-only probe folder (file,group) of the bundled world, its group prompts, queries, and a
    retrieval split of another seed."""
    root = tmp_path_factory.mktemp("labels-only")
    params = WorldParams()
    write_split(generate(params, "eval", 240), root / "probe")
    with open(root / "probe" / "labels.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    (root / "only").mkdir()
    (root / "only" / "labels.csv").write_text("file,group\n" + "".join(f"{r['file']},{r['group']}\n" for r in rows))
    (root / "only" / "groups.csv").write_text(
        "group,prompt\n" + "".join(f"{g},{p}\n" for g, p in zip(params.groups, group_prompts(params))))
    (root / "only" / "queries.txt").write_text("\n".join(neutral_queries(params)[:4]) + "\n")
    write_split(generate(dataclasses.replace(params, seed=9), "eval", 120), root / "ret")
    return root


def _args(root, out, *more):
    return ["debias", "builtin:world", out, "--images", root / "probe" / "images", "--labels",
            root / "only" / "labels.csv", "--group-prompts", root / "only" / "groups.csv", "--queries",
            root / "only" / "queries.txt", "--k", "20", "--balance-only", *more]


def test_debias_with_a_retrieval_set_anchors_on_its_captions_and_reports_recall_on_its_held_out_half(
        folders, tmp_path, monkeypatch):
    """A labels-only probe: the fixed balance's anchors are the group prompts and the distinct
    captions of the retrieval set's selection half; the report's recall is on the other half and
    equals retrieval_recall of the original model there; the plan records the set and its split."""
    from surgery.debias import search as search_module

    pools = []
    original = search_module.fit_balance
    monkeypatch.setattr(search_module, "fit_balance",
                        lambda texts, *a, **kw: pools.append(texts.pool.shape[0]) or original(texts, *a, **kw))
    out = tmp_path / "out.safetensors"
    result = run_cli(*_args(folders, out, "--retrieval", folders / "ret" / "captions.csv", "--balance-mode", "fixed",
                            "--allow-miss"))
    assert result.exit_code == 0, result.output
    assert "retrieval set: 120 captioned images" in result.output and "recall budget cannot be checked" not in result.output
    whole = load_retrieval_set(str(folders / "ret" / "captions.csv"))
    chosen, held = whole.split(0.5)
    distinct = {c for f in chosen.files for c in chosen.captions[f]}
    assert pools and set(pools) == {len(distinct) + 2}  # the selection half's captions and the 2 group prompts
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    source = plan["provenance"]["probe"]["retrieval"]
    assert (source["images"], source["selection_images"], source["report_images"]) == (120, 60, 60)
    report = json.loads((tmp_path / "out.report" / "report.json").read_text())
    assert report["spec"]["retrieval_set"]["images"] == 60 and report["before"]["retrieval_set"]["n_images"] == 60
    encoder = TorchEncoder(surgery.load("builtin:world"))
    images = F.normalize(embed_images(encoder, held.images_dir, held.files).embeddings, dim=-1)
    texts, owners = caption_pairs(held.captions, held.files)
    want = retrieval_recall(embed_texts(encoder, texts), images, torch.from_numpy(owners), (1, 5, 10),
                            text_keys=[" ".join(t.lower().split()) for t in texts])
    assert report["before"]["retrieval"] == pytest.approx(want, abs=1e-6)
    recall_checks = [c for c in report["targets"] if "Recall@5" in c["name"]]
    assert len(recall_checks) == 2 and all(c["interval"] is not None for c in recall_checks)
    assert "recall: on a retrieval set, 60 images" in (tmp_path / "out.report" / "report.md").read_text()


def test_retrieval_options_are_refused_where_they_do_not_apply_in_one_line(folders, tmp_path):
    result = run_cli("debias", "builtin:world", tmp_path / "o.onnx", "--retrieval", folders / "ret" / "captions.csv")
    assert result.exit_code == 2 and "--retrieval goes with --images/--labels" in result.output
    result = run_cli(*_args(folders, tmp_path / "o.onnx", "--retrieval-images", folders / "ret"))
    assert result.exit_code == 2 and "--retrieval-images goes with --retrieval" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\n" + "".join(f"x{i}.png,a caption\n" for i in range(8)))
    assert_one_line_error(run_cli(*_args(folders, tmp_path / "o.onnx", "--retrieval", bad)),
                          "image 'x0.png' is not under")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o.")]
    assert_one_line_error(run_cli("eval", "builtin:world", "--images", folders / "probe" / "images", "--labels",
                                  folders / "probe" / "labels.csv", "--captions", folders / "probe" / "captions.csv",
                                  "--retrieval", folders / "ret" / "captions.csv", "--out", tmp_path / "ev"),
                          "--captions and --retrieval both say where recall is measured")


def test_balance_with_a_retrieval_set_measures_recall_on_all_of_it(folders, tmp_path):
    """clipsurgery balance has no report: the whole retrieval set gates recall and anchors the map."""
    result = run_cli("balance", "builtin:world", "--images", folders / "probe" / "images", "--labels",
                     folders / "only" / "labels.csv", "--group-prompts", folders / "only" / "groups.csv",
                     "--queries", folders / "only" / "queries.txt", "--k", "20", "--balance-mode", "fixed",
                     "--retrieval", folders / "ret" / "captions.csv", "--out", tmp_path / "plan.json", "--allow-miss")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["provenance"]["probe"]["retrieval"]["images"] == 120
    assert "recall" in plan["provenance"]["before"] and "recall_i2t" in plan["provenance"]["after"]
