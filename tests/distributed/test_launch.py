"""The --nproc convenience: the torchrun command it builds, the flags it strips, the output it filters."""
from __future__ import annotations

import sys

import pytest

from surgery.cli.launch import LauncherFilter, strip_launch_flags
from surgery.errors import DataError
from surgery.runtime.distributed import launch_command


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
