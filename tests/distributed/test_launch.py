"""The --nproc convenience: the torchrun command it builds, the flags it strips, the output it filters."""
from __future__ import annotations

import sys

import pytest

from surgery.cli.launch import LauncherFilter, strip_launch_flags
from surgery.errors import DataError
from surgery.runtime.distributed import LAUNCH_OPTIONS, launch_command


def test_launch_command_is_standalone_on_one_machine_and_passes_rendezvous_flags_through():
    one = launch_command(2, ["embed", "M", "--out", "c"])
    assert one[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in one and "--standalone" in one
    assert one[-6:] == ["-m", "surgery", "embed", "M", "--out", "c"]
    many = launch_command(8, ["embed"], {"nnodes": "2", "rdzv_endpoint": "host0:29500", "rdzv_id": "j1",
                                         "master_port": None})
    assert "--standalone" not in many
    assert {"--nnodes=2", "--rdzv-endpoint=host0:29500", "--rdzv-id=j1"} <= set(many)
    assert not any(a.startswith("--master-port") for a in many)
    with pytest.raises(DataError, match="--nproc must be >= 1"):
        launch_command(0, [])


def test_strip_launch_flags_removes_both_spellings_and_keeps_the_rest():
    argv = ["embed", "M", "--nproc", "2", "--images", "d", "--nnodes=2", "--rdzv-endpoint", "h:1", "--out", "c"]
    assert strip_launch_flags(argv) == ["embed", "M", "--images", "d", "--out", "c"]


def test_launcher_filter_keeps_one_error_line_and_drops_torchrun_noise():
    stream = ("embedding: 10img\r"
              "W1129 09:13:28.906000 1503 torch/distributed/run.py:1] Setting OMP_NUM_THREADS=1\n"
              "*****************************************\n"
              "Error: bad input\n"
              "Error: bad input\n"
              "E1129 09:13:28.970000 1503 api.py:1002] failed (exitcode: 1)\n"
              "Traceback (most recent call last):\n"
              '  File "run.py", line 1\n'
              "ChildFailedError:\n")
    quiet = LauncherFilter()
    shown = "".join(quiet.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + quiet.feed("", final=True)
    assert shown == "embedding: 10img\rError: bad input\n"
    assert quiet.errors == {"Error: bad input"}
    # a rank's own traceback with no one-line error before it is shown (a bug should be visible)
    crash = LauncherFilter()
    assert "Traceback" in crash.feed("Traceback (most recent call last):\n  File x\nValueError: boom\n", final=True)


def _readme_command(start: str) -> list[str]:
    """The README's command line that starts with ``start`` (continuation lines joined), as argv."""
    import shlex
    from pathlib import Path

    lines = (Path(__file__).parents[2] / "README.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
    text = lines[at]
    while text.rstrip().endswith("\\"):
        at += 1
        text = text.rstrip()[:-1] + " " + lines[at]
    return shlex.split(text.split("#")[0])[1:]


def test_the_readme_multi_node_example_gives_each_machine_its_node_rank_and_a_rendezvous_backend():
    from surgery.cli.embed import embed

    argv = _readme_command("clipsurgery embed MODEL --images '/shared/laion/")
    launch = embed.make_context("embed", argv[1:]).params
    assert launch["nnodes"] == "2" and launch["node_rank"] == "0" and launch["rdzv_backend"] == "static"
    cmd = launch_command(launch["nproc"], strip_launch_flags(argv[1:]),
                         {k: launch[k] for k in LAUNCH_OPTIONS})
    assert {"--nnodes=2", "--node-rank=0", "--rdzv-backend=static", "--rdzv-endpoint=host0:29500"} <= set(cmd)


def test_the_readme_headline_debias_of_a_checkpoint_shows_its_probe_images():
    from surgery.cli.main import debias

    argv = _readme_command("clipsurgery debias in.pt")
    params = debias.make_context("debias", argv[1:]).params
    assert params["images_dir"] and params["labels_path"]  # a checkpoint carries no world to probe with
