"""clipsurgery debias end to end on the bundled world model (small probe sets)."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from surgery.cli.main import main
from surgery.io.onnx import read_metadata


def test_debias_world_to_onnx_meets_its_targets_with_the_balance_edit(tmp_path):
    """Unchanged defaults, no --allow-miss: the balance edit alone meets every target on the
    report's images (the world's own eval split, which no edit was chosen on)."""
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["debias", "builtin:world", str(out), "--n-probe", "240", "--k", "20",
                                       "--selection-draws", "2"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["out.plan.json", "out.report", "out.text.onnx", "out.visual.onnx"]  # no SAE: not searched
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    # the default balance is the open one (every text corrected at run time), not a fixed map
    assert plan["heads"] == [] and plan["neurons"] == [] and "balance" not in plan
    assert [b["tower"] for b in plan["open_balance"]] == ["text"]
    assert plan["provenance"]["removal_searched"] is False
    assert json.loads(read_metadata(str(tmp_path / "out.text.onnx"))["clipsurgery.plan"]) == plan
    report = json.loads((tmp_path / "out.report" / "report.json").read_text())
    before, after = report["before"], report["after"]
    bias_b, bias_a = before["bias"]["group"], after["bias"]["group"]
    assert bias_a["max_skew"] <= 0.5 * bias_b["max_skew"]  # the default target, on ONNX Runtime's embeddings
    assert before["zero_shot_accuracy"] - after["zero_shot_accuracy"] <= 0.02
    assert bias_b["group_accuracy"] - bias_a["group_accuracy"] <= 0.02
    for key in ("t2i@5", "i2t@5"):
        assert before["retrieval"][key] - after["retrieval"][key] <= 0.02
    assert set(bias_b["wordings"]) == {"{}", "a picture of {}", "an image of {}", "a drawing of {}"}
    assert "cell_precision" in after and "targets on the report's images (met)" in result.output
    assert "what each kind contributed" in result.output and "left out of the calibration is cut" in result.output


def test_debias_removal_edits_to_onnx(tmp_path):
    """--no-balance: the seeds' removal edits (heads and SAE neurons) in one search, as before the balance edit."""
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["debias", "builtin:world", str(out), "--n-probe", "240", "--k", "20",
                                       "--selection-draws", "2", "--no-balance", "--allow-miss"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["out.plan.json", "out.report", "out.sae", "out.text.onnx", "out.visual.onnx"]
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    assert plan["neurons"][0]["site"] == "embedding" and plan["neurons"][0]["ids"]
    assert plan["provenance"]["neurons"]["sae"]["explained_variance"] > 0.5
    assert (tmp_path / "out.sae" / "weights.safetensors").is_file()
    assert json.loads(read_metadata(str(tmp_path / "out.visual.onnx"))["clipsurgery.plan"]) == plan
    report = json.loads((tmp_path / "out.report" / "report.json").read_text())
    before, after = report["before"]["bias"]["group"]["max_skew"], report["after"]["bias"]["group"]["max_skew"]
    assert after < before  # the ONNX model, run through ONNX Runtime, is less biased
    assert "| group: mean MaxSkew@20 |" in result.output


def test_debias_heads_only_to_safetensors(tmp_path):
    import surgery

    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["debias", "builtin:world", str(out), "--n-probe", "240", "--k", "20",
                                       "--heads-only", "--selection-draws", "1", "--allow-miss"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out.sae").exists()
    restored = surgery.load(str(out))
    assert restored.metadata["plan"]["heads"] and not restored.metadata["plan"]["neurons"]


def test_debias_refuses_bad_outputs(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["debias", "builtin:world", str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and "must end in .onnx or .safetensors" in result.output
    result = runner.invoke(main, ["debias", "builtin:tiny", str(tmp_path / "out.onnx")])
    assert result.exit_code == 1 and "needs probe images" in result.output
    result = runner.invoke(main, ["debias", "builtin:world", str(tmp_path / "o.onnx"), "--heads-only", "--neurons-only"])
    assert result.exit_code == 2 and "exclude each other" in result.output
    assert list(tmp_path.iterdir()) == []


def test_debias_on_a_folder_reports_on_held_out_images(tmp_path):
    """--images: the edits are chosen on one half of each group's images and the report is on the
    other half; --holdout out of range is refused before anything is written."""
    from surgery.world.generator import generate, write_split
    from surgery.world.params import WorldParams

    write_split(generate(WorldParams(), "eval", 240), tmp_path / "w")
    images, labels = str(tmp_path / "w" / "images"), str(tmp_path / "w" / "labels.csv")
    out = tmp_path / "out.safetensors"
    runner = CliRunner()
    result = runner.invoke(main, ["debias", "builtin:world", str(out), "--images", images, "--labels", labels,
                                  "--attributes", "group", "--k", "20", "--heads-only", "--max-accuracy-drop", "5",
                                  "--allow-miss"])
    assert result.exit_code == 0, result.output
    assert "reporting on the other 50%" in result.output
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    assert plan["provenance"]["probe"]["selection_images"] == 120 and plan["provenance"]["probe"]["holdout"] == 0.5
    report = json.loads((tmp_path / "out.report" / "report.json").read_text())
    assert report["before"]["n_images"] == 120  # the held-out half only
    assert "zero_shot_accuracy" in report["before"]  # the world's concepts came along with the split
    result = runner.invoke(main, ["debias", "builtin:world", str(tmp_path / "o2.onnx"), "--images", images,
                                  "--labels", labels, "--holdout", "1"])
    assert result.exit_code == 1 and "--holdout must be" in result.output
    # K larger than the held-out half (but not than the selection half): refused before anything is written
    result = runner.invoke(main, ["debias", "builtin:world", str(tmp_path / "o2.onnx"), "--images", images,
                                  "--labels", labels, "--attributes", "group", "--k", "60", "--holdout", "0.2"])
    assert result.exit_code == 1 and "K=60 is larger than the 48 images" in result.output, result.output
    result = runner.invoke(main, ["debias", "builtin:world", str(tmp_path / "o2.onnx"), "--holdout", "0.3"])
    assert result.exit_code == 2 and "--holdout applies to --images probes only" in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o2")]


MISS_ARGS = ["--n-probe", "240", "--k", "20", "--selection-draws", "1", "--heads-only", "--max-heads", "1",
             "--max-bias-ratio", "0.01"]  # one head cannot cut MaxSkew by 99%


@pytest.fixture(scope="module")
def missed_but_allowed(tmp_path_factory):
    """(folder, result) of a one-head debias that misses its target, run with --allow-miss (as b.onnx);
    read by the exit-code test and the report-naming test."""
    folder = tmp_path_factory.mktemp("allowed")
    return folder, CliRunner().invoke(main, ["debias", "builtin:world", str(folder / "b.onnx"), *MISS_ARGS,
                                             "--allow-miss"])


def test_debias_exits_3_when_a_target_is_missed_and_allow_miss_exits_0(tmp_path, missed_but_allowed):
    missed = CliRunner().invoke(main, ["debias", "builtin:world", str(tmp_path / "a.onnx"), *MISS_ARGS])
    assert missed.exit_code == 3, missed.output
    assert "targets on the report's images (NOT met)" in missed.output
    assert (tmp_path / "a.plan.json").is_file() and (tmp_path / "a.visual.onnx").is_file()  # the outputs are written
    _, allowed = missed_but_allowed
    assert allowed.exit_code == 0, allowed.output
    assert "(NOT met)" in allowed.output
    assert "MaxSkew@20 cut" in allowed.output and "on the worst query" in allowed.output


def test_debias_report_names_generated_images_not_their_temp_folder(missed_but_allowed):
    folder, result = missed_but_allowed  # the run above: images generated from the model's world
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "b.report" / "report.json").read_text())
    assert report["spec"]["images_dir"].startswith("the model's own world, eval split (seed 0, 240 images")
    assert "clipsurgery-debias-" not in (folder / "b.report" / "report.md").read_text()


def test_an_sae_that_no_kept_edit_uses_is_not_left_and_force_removes_the_previous_runs_plan_and_sae(
        tmp_path, monkeypatch):
    """The SAE is trained in staging; when the search keeps no latent it is removed, and --force
    takes the earlier run's plan and SAE away together (never a new plan beside an old SAE)."""
    import functools

    from surgery.cli import main as cli_main
    from surgery.debias import pipeline
    from surgery.debias.heads import SearchResult

    def heads_only(loaded, probes, prompts, options, audit, neurons, balance, say):
        assert neurons is not None and neurons.candidates  # an SAE was trained, in staging
        assert os.path.isdir(neurons.staging)
        return SearchResult({(3, 0): 0.0}, False, {"max_skew": 1.0}, {"max_skew": 0.9}, order=["L3.H0@0"])

    monkeypatch.setattr(pipeline, "run_search", heads_only)
    # the SAE only has to exist, with candidates: a small one (480 images; candidates at tau 0.1)
    monkeypatch.setattr(cli_main, "DebiasOptions", functools.partial(pipeline.DebiasOptions, sae_images=480))
    monkeypatch.setattr(pipeline, "NeuronStageOptions", functools.partial(pipeline.NeuronStageOptions, tau=0.1))
    out = tmp_path / "m.onnx"
    (tmp_path / "m.sae").mkdir()
    (tmp_path / "m.sae" / "weights.safetensors").write_bytes(b"an earlier run's SAE")
    (tmp_path / "m.plan.json").write_text("{}")
    result = CliRunner().invoke(main, ["debias", "builtin:world", str(out), "--n-probe", "240", "--k", "20",
                                       "--selection-draws", "1", "--tower", "vision", "--force", "--allow-miss",
                                       "--no-balance"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.onnx", "m.plan.json", "m.report"], names  # no SAE folder, no staging left
    plan = json.loads((tmp_path / "m.plan.json").read_text())
    assert plan["neurons"] == []
    assert [(h["layer"], h["head"]) for h in plan["heads"]] == [(3, 0)]


def test_clipsurgery_balance_writes_a_plan_that_bake_folds_into_the_text_projection(tmp_path):
    """`balance` fits only the balance edit (world draws here), its plan round-trips through
    `bake`, and the baked checkpoint's text embeddings are the map of the original ones."""
    import torch

    import surgery
    from surgery.edit.bake import balance_map
    from surgery.edit.plan import SurgeryPlan
    from surgery.model.encode import text_embeddings

    plan_path, out = tmp_path / "plan.json", tmp_path / "balanced.safetensors"
    runner = CliRunner()
    # one draw's text->image Recall@5 moves in steps of 1/60 (1.7 points), coarser than the selection
    # budget's 1.5: a wider recall budget keeps this a test of the command, not of one caption's rank
    result = runner.invoke(main, ["balance", "builtin:world", "--out", str(plan_path), "--selection-draws", "1",
                                  "--k", "20", "--max-recall-drop", "4", "--balance-mode", "fixed"])
    assert result.exit_code == 0, result.output
    assert "removal only: not asked for" in result.output
    plan = SurgeryPlan.load(str(plan_path))
    assert not plan.heads and not plan.neurons and len(plan.balance) == 1 and not plan.open_balance
    prov = plan.balance[0].provenance
    assert prov["groups"] == ["red", "blue"] and len(prov["queries"]) == 6 and prov["fit"]["residual"] < 1e-6
    assert runner.invoke(main, ["balance", "builtin:world", "--out", str(plan_path)]).exit_code == 1  # no --force
    result = runner.invoke(main, ["bake", "builtin:world", str(plan_path), str(out)])
    assert result.exit_code == 0, result.output
    original, baked = surgery.load("builtin:world"), surgery.load(str(out))
    texts = ["a photo of a circle", "a red square", "a picture of a dotted star"]
    with torch.no_grad():
        raw = original.model.encode_text(__import__("surgery.model.preprocess", fromlist=["tokenize"]).tokenize(
            texts, original.tokenizer))
    want = torch.nn.functional.normalize(balance_map(plan.balance[0])(raw), dim=-1)
    torch.testing.assert_close(text_embeddings(baked.model, texts, baked.tokenizer), want, atol=1e-5, rtol=0)


def test_clipsurgery_balance_open_mode_writes_a_plan_that_bake_attaches_to_the_text_tower(tmp_path):
    """`balance --balance-mode open` on a query list: the plan carries the open balance calibrated on
    that list only, and the baked checkpoint's text embeddings are the module applied to the
    original ones (a query outside the list is corrected, a group-naming text is not)."""
    import torch

    import surgery
    from surgery.edit.bake import open_balance_module
    from surgery.edit.plan import SurgeryPlan
    from surgery.model.preprocess import tokenize

    listed = ["a photo of a circle", "a photo of a square", "a photo of a triangle"]
    (tmp_path / "q.txt").write_text("\n".join(listed) + "\n")
    plan_path, out = tmp_path / "plan.json", tmp_path / "open.safetensors"
    runner = CliRunner()
    result = runner.invoke(main, ["balance", "builtin:world", "--out", str(plan_path), "--selection-draws", "2",
                                  "--k", "20", "--queries", str(tmp_path / "q.txt"), "--balance-mode", "open"])
    assert result.exit_code == 0, result.output
    plan = SurgeryPlan.load(str(plan_path))
    assert not plan.balance and len(plan.open_balance) == 1
    prov = plan.open_balance[0].provenance
    assert prov["queries"] == listed and len(prov["gate"]["neutral_leans"]) == 3
    assert runner.invoke(main, ["bake", "builtin:world", str(plan_path), str(out)]).exit_code == 0
    original, baked = surgery.load("builtin:world"), surgery.load(str(out))
    texts = ["a photo of a ring", "a drawing of a star", "a photo of a red circle", "a photo of something blue"]
    tokens = tokenize(texts, original.tokenizer)
    with torch.no_grad():
        raw = original.model.encode_text(tokens)
        module = open_balance_module(plan.open_balance[0])
        torch.testing.assert_close(baked.model.encode_text(tokens), module(raw), atol=1e-6, rtol=0)
        gate = module.gate(raw)
    assert gate[:2].min() > 0.5 and gate[2:].max() == 0.0  # unlisted neutral queries corrected, naming texts not
    assert (module(raw)[:2] - raw[:2]).abs().max() > 1e-3


def test_clipsurgery_balance_refuses_bad_probes_in_one_line(tmp_path):
    from helpers import labelled_image_folder

    images, labels = labelled_image_folder(tmp_path, n=12)
    one_group = tmp_path / "one.csv"
    one_group.write_text("file,colour\n" + "".join(f"{i:02d}.png,red\n" for i in range(12)))
    empty = tmp_path / "q.txt"
    empty.write_text("# nothing\n")
    runner = CliRunner()
    for args, message in [
        (["--images", images, "--labels", str(one_group), "--attributes", "colour"], "single group"),
        (["--images", images, "--labels", labels, "--attributes", "colour", "--queries", str(empty)], "holds no queries"),
        (["--images", images, "--labels", labels, "--attributes", "colour", "--k", "50"], "K=50 is larger than the gallery of 12"),
        (["--images", images], "--images and --labels go together"),
        (["--side", "audio"], "Invalid value for '--side'"),
    ]:
        result = runner.invoke(main, ["balance", "builtin:world", "--out", str(tmp_path / "p.json"), *args])
        assert result.exit_code in (1, 2) and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "p.json").exists()
