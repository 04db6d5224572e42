"""Issue 29, data loss: one rule for every command that writes. An output is never an input (the
model, the plan, the plan's SAE, labels, queries, group prompts, an image under --images), never a
device or a named pipe, and --force removes only what the tool wrote. Each test failed on the main
it was written against (the input overwritten, the pipe replaced by a file, a user's file deleted)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import assert_one_line_error, labelled_image_folder, run_cli

from surgery.errors import SurgeryError
from surgery.io.fs import atomic_output, check_output_path




def _probe(tmp_path):
    images, labels = labelled_image_folder(tmp_path, 8)
    queries = tmp_path / "q.txt"
    queries.write_text("a photo of a nurse\na photo of a pilot\n")
    prompts = tmp_path / "groups.json"
    prompts.write_text(json.dumps({"red": "a red thing", "blue": "a blue thing"}))
    return images, labels, queries, prompts


def test_balance_force_never_overwrites_its_queries_group_prompts_or_images(tmp_path):
    images, labels, queries, prompts = _probe(tmp_path)
    image = Path(images) / "00.png"
    before = {p: Path(p).read_bytes() for p in (queries, prompts, image, labels)}
    common = ["balance", "builtin:tiny", "--images", images, "--labels", labels, "--queries", queries,
              "--group-prompts", prompts, "--k", "2", "--force", "--out"]
    assert_one_line_error(run_cli(*common, queries), "is the input file")
    assert_one_line_error(run_cli(*common, prompts), "is the input file")
    assert_one_line_error(run_cli(*common, labels), "is the input file")
    assert_one_line_error(run_cli(*common, image), "lies in the input folder")
    assert all(Path(p).read_bytes() == data for p, data in before.items())


def test_bake_force_never_overwrites_its_plan_or_the_plans_sae(tmp_path, tiny):
    from surgery.edit.plan import NeuronEdit, SurgeryPlan
    from surgery.sae import SAEConfig, SparseAutoencoder, save_sae

    plan_path = tmp_path / "p.safetensors"  # a plan under a model's suffix: bake's OUT could name it
    SurgeryPlan().save(str(plan_path))
    before = plan_path.read_bytes()
    assert_one_line_error(run_cli("bake", "builtin:tiny", plan_path, plan_path, "--force"), "is the input file")
    assert plan_path.read_bytes() == before

    sae_dir = tmp_path / "sae"
    save_sae(SparseAutoencoder(SAEConfig(d_in=32, expansion=2, kind="relu", site="embedding", tower="vision")).eval(),
             str(sae_dir))
    neuron_plan = tmp_path / "n.json"
    SurgeryPlan(neurons=[NeuronEdit("vision", str(sae_dir), [1, 2], site="embedding")]).save(str(neuron_plan))
    weights = sae_dir / "weights.safetensors"
    kept = weights.read_bytes()
    assert_one_line_error(run_cli("bake", "builtin:tiny", neuron_plan, weights, "--force"), "lies in the input folder")
    assert weights.read_bytes() == kept


@pytest.mark.parametrize("command", ["export", "balance", "bake"])
def test_force_never_replaces_a_named_pipe(tmp_path, command):
    pipe = tmp_path / ("pipe.json" if command == "balance" else "pipe.safetensors")
    os.mkfifo(pipe)
    if command == "export":
        args = ["export", "builtin:tiny", pipe, "--force"]
    elif command == "bake":
        from surgery.edit.plan import SurgeryPlan

        plan = tmp_path / "p.json"
        SurgeryPlan().save(str(plan))
        args = ["bake", "builtin:tiny", plan, pipe, "--force"]
    else:
        images, labels = labelled_image_folder(tmp_path, 8)
        args = ["balance", "builtin:tiny", "--images", images, "--labels", labels, "--k", "2", "--out", pipe, "--force"]
    assert_one_line_error(run_cli(*args), "is a named pipe, not a regular file")
    assert os.path.exists(pipe) and not os.path.isfile(pipe)


def test_no_writer_replaces_a_device_or_a_pipe(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for target in (pipe, Path(os.devnull)):
        with pytest.raises(SurgeryError, match="not a regular file"):
            check_output_path(target, force=True)
        with pytest.raises(SurgeryError, match="not a regular file"):
            with atomic_output(target) as tmp:
                tmp.write_text("x")
    link = tmp_path / "null.safetensors"
    link.symlink_to(os.devnull)  # a link to a device is refused too
    with pytest.raises(SurgeryError, match="a device"):
        check_output_path(link, force=True)
    assert not os.path.isfile(os.devnull)


def test_debias_force_removes_only_the_sae_files_it_wrote(tmp_path):
    from surgery.debias.outputs import Outputs, remove_previous

    outputs = Outputs.of(str(tmp_path / "m.onnx"), "both")
    sae = tmp_path / "m.sae"
    sae.mkdir()
    (sae / "weights.safetensors").write_bytes(b"an earlier run's SAE")
    (sae / "cfg.json").write_text("{}")
    (sae / "notes.md").write_text("years of work")
    # a run that may train an SAE is refused before any work: the SAE could not be moved in
    with pytest.raises(SurgeryError, match=r"holds files clipsurgery did not write \(notes.md\)"):
        outputs.check("builtin:world", True, sae_needed=True)
    outputs.check("builtin:world", True, sae_needed=False)  # --balance-only / --heads-only: allowed ...
    remove_previous(outputs)  # ... and only the tool's own files go
    assert sorted(p.name for p in sae.iterdir()) == ["notes.md"]
    assert (sae / "notes.md").read_text() == "years of work"
    (sae / "notes.md").unlink()
    (sae / "cfg.json").write_text("{}")
    remove_previous(outputs)
    assert not sae.exists()  # nothing else in it: the folder goes with the files


def test_debias_outputs_are_never_its_inputs(tmp_path):
    from surgery.debias.outputs import Outputs

    queries = tmp_path / "m.plan.json"  # a queries file where the plan would go
    queries.write_text('["a nurse"]')
    with pytest.raises(SurgeryError, match="is the input file"):
        Outputs.of(str(tmp_path / "m.onnx"), "both").check("builtin:world", True, (None, None, str(queries)))
