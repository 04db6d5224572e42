"""The audit on the bundled world model (scores, outputs, plan) and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.audit.probe import world_probe_set
from surgery.audit.vision import AuditOptions, audit_vision
from surgery.cli.main import main
from surgery.errors import DataError
from surgery.world.checkpoint import world_params_of


@pytest.fixture(scope="module")
def world():
    loaded = surgery.load("builtin:world")
    probe = world_probe_set(world_params_of(loaded), loaded.preprocess, 240)
    return loaded, probe


def test_audit_scores_and_plan(world):
    loaded, probe = world
    result = audit_vision(loaded.model, probe, loaded.tokenizer,
                          AuditOptions(k=20, top_k=3, textspan_layers=1, textspan_images=64, textspan_iterations=3))
    assert set(result.scores) == {"cav", "group_acc", "gradient", "ablation"}
    assert all(s.shape == (4, 4) for s in result.scores.values())
    assert -1 <= result.spearman_gradient_vs_ablation <= 1
    assert 1 <= len(result.plan.heads) <= 3
    assert all(e.ablation == "mean" and len(e.mean) == 16 for e in result.plan.heads)
    chosen = [(e.layer, e.head) for e in result.plan.heads]
    assert chosen == plain_greedy(loaded, probe, result, 3)
    prov = result.plan.provenance
    assert prov["after"]["max_skew"] < prov["before"]["max_skew"]
    assert prov["before"]["accuracy"] - prov["after"]["accuracy"] <= 0.02 + 1e-9
    assert len(result.descriptions) == 4 and all(len(d) == 3 for d in result.descriptions.values())
    record = result.to_dict()
    assert len(record["heads"]) == 16 and "ccs" in record["heads"][-1]


def plain_greedy(loaded, probe, result, size):
    """The reference: at each step measure every open head with the chosen ones (no shortlist),
    keep the lowest mean MaxSkew within the 2-point accuracy budget."""
    from surgery.audit.ablation import evaluate_head_set
    from surgery.model.encode import text_embeddings

    model = loaded.model
    queries = text_embeddings(model, probe.queries, loaded.tokenizer)
    classes = text_embeddings(model, probe.class_prompts, loaded.tokenizer)
    heads = [(l, h) for l in range(4) for h in range(4)]
    before = evaluate_head_set(model, probe, [], result.means, queries, classes, 20)
    chosen, current = [], before
    for _ in range(size):  # its own stopping rule: no open head lowers bias within budget
        trials = {h: evaluate_head_set(model, probe, chosen + [h], result.means, queries, classes, 20)
                  for h in heads if h not in chosen}
        ok = {h: f for h, f in trials.items()
              if before["accuracy"] - f["accuracy"] <= 0.02 + 1e-9 and f["max_skew"] < current["max_skew"]}
        if not ok:
            break
        best = min(ok, key=lambda h: ok[h]["max_skew"])
        chosen.append(best)
        current = ok[best]
    return chosen


def test_cli_audit_writes_every_output(tmp_path):
    out = tmp_path / "audit"
    result = CliRunner().invoke(main, ["audit", "builtin:world", "--n-probe", "240", "--k", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["audit.json", "heatmap_vision_ablation.png", "heatmap_vision_cav.png", "heatmap_vision_gradient.png",
                     "heatmap_vision_group_acc.png", "plan.json", "report.md"]
    record = json.loads((out / "audit.json").read_text())
    assert record["probe"]["n_images"] == 240 and record["sha256"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"]["sha256"] == record["sha256"] and 1 <= len(plan["heads"]) <= 3
    assert "greedy forward selection" in plan["provenance"]["method"]
    assert "Chosen at set level" in (out / "report.md").read_text()


def test_cli_audit_sweeps_only_its_shortlist_and_says_so(tmp_path):
    """--sweep-top 5: the sweep (c) ablates the top 5 of the cheap ranking; audit.json lists them,
    the other heads have no (c) figure (null, not NaN), and the report says what ran."""
    out = tmp_path / "audit"
    result = CliRunner().invoke(main, ["audit", "builtin:world", "--n-probe", "240", "--k", "20", "--top-k", "1",
                                       "--sweep-top", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "audit.json").read_text())
    swept = {tuple(h) for h in record["swept_heads"]}
    by_rank = sorted(record["heads"], key=lambda h: h["cheap_rank"])
    assert swept == {(h["layer"], h["head"]) for h in by_rank[:5]}
    assert all((h["ablation"] is None) == ((h["layer"], h["head"]) not in swept) for h in record["heads"])
    assert "ran on 5 heads" in (out / "report.md").read_text()
    assert 0 <= len(json.loads((out / "plan.json").read_text())["heads"]) <= 1


def test_cli_audit_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["audit", "builtin:tiny", "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and "needs probe images" in result.output
    result = runner.invoke(main, ["audit", "builtin:world", "--k", "5000", "--n-probe", "120", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "larger than the 120 probe images" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_folder_probe_set_streams_and_matches_the_world(tmp_path):
    """A world split written to disk and read back as a folder probe set gives the same images."""
    from surgery.audit.probe import FolderImages, folder_probe_set
    from surgery.world.generator import generate, write_split
    from surgery.world.params import WorldParams

    params = WorldParams()
    write_split(generate(params, "eval", 48), tmp_path / "w")
    loaded = surgery.load("builtin:world")
    probe = folder_probe_set(str(tmp_path / "w" / "images"), str(tmp_path / "w" / "labels.csv"), "group",
                             loaded.preprocess)
    assert isinstance(probe.images, FolderImages) and len(probe) == 48
    in_memory = world_probe_set(params, loaded.preprocess, 48)
    torch.testing.assert_close(probe.images[0:5], in_memory.images[0:5], atol=1e-6, rtol=0)
    assert probe.group_names == ["blue", "red"] and probe.source["hash"]
    # a world split brings the world's own queries, group prompts, concepts and captions
    assert probe.queries == in_memory.queries and probe.class_prompts == in_memory.class_prompts
    order = [in_memory.group_names.index(g) for g in probe.group_names]
    assert probe.group_prompts == [in_memory.group_prompts[i] for i in order]
    assert torch.equal(probe.concepts, in_memory.concepts) and probe.captions == in_memory.captions
    assert [probe.group_names[g] for g in probe.groups] == [in_memory.group_names[g] for g in in_memory.groups]
    (tmp_path / "w" / "images" / "000001.png").write_bytes(b"not a png")  # skipped by the scan
    probe = folder_probe_set(str(tmp_path / "w" / "images"), str(tmp_path / "w" / "labels.csv"), "group",
                             loaded.preprocess, max_skipped_fraction=0.5)
    assert len(probe) == 47 and probe.source["skipped"] == ["000001.png"]
    torch.testing.assert_close(probe.images[1:2], in_memory.images[2:3], atol=1e-6, rtol=0)  # labels stay aligned
    assert probe.group_names[probe.groups[1]] == in_memory.group_names[in_memory.groups[2]]
    (tmp_path / "w" / "images" / "000003.png").write_bytes(b"not a png")  # skipped: the rest stays aligned
    skipped = folder_probe_set(str(tmp_path / "w" / "images"), str(tmp_path / "w" / "labels.csv"), "group",
                               loaded.preprocess, max_skipped_fraction=0.5)
    kept = [i for i in range(48) if i not in (1, 3)]  # 000001.png is broken above
    assert torch.equal(skipped.concepts, in_memory.concepts[kept]) and skipped.captions == [in_memory.captions[i] for i in kept]
    captions = (tmp_path / "w" / "captions.csv").read_text().splitlines()
    (tmp_path / "w" / "captions.csv").write_text("\n".join(captions[:-1]) + "\n")  # the last image loses its caption
    with pytest.raises(DataError, match="has no caption for"):
        folder_probe_set(str(tmp_path / "w" / "images"), str(tmp_path / "w" / "labels.csv"), "group", loaded.preprocess)
    labels_text = (tmp_path / "w" / "labels.csv").read_text()
    (tmp_path / "w" / "labels.csv").write_text(labels_text.replace(",red", ",green", 1))  # a group the world lacks
    with pytest.raises(DataError, match="'green' is not one of the world's groups"):
        folder_probe_set(str(tmp_path / "w" / "images"), str(tmp_path / "w" / "labels.csv"), "group", loaded.preprocess)


def test_cheap_audit_baseline_comes_from_the_decomposition_pass(world):
    """Without the sweep the unedited figures come from the one decomposition pass's text scores;
    they equal a separate plain forward pass."""
    from surgery.audit.ablation import evaluate_head_set
    from surgery.model.encode import text_embeddings

    loaded, probe = world
    opt = AuditOptions(k=20, sweep=False, textspan_iterations=0)
    result = audit_vision(loaded.model, probe, loaded.tokenizer, opt)
    queries = text_embeddings(loaded.model, probe.queries, loaded.tokenizer)
    classes = text_embeddings(loaded.model, probe.class_prompts, loaded.tokenizer)
    want = evaluate_head_set(loaded.model, probe, [], None, queries, classes, k=20)  # a plain pass, nothing ablated
    assert abs(result.baseline["max_skew"] - want["max_skew"]) < 1e-6
    assert abs(result.baseline["accuracy"] - want["accuracy"]) < 1e-9
    assert "ablation" not in result.scores and result.cheap_rank
