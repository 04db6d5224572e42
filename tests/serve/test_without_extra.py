"""Every command but ``serve`` works without the serve extra (Starlette, uvicorn, prometheus-client):
README's first line installs only ``.[cpu]``. ``serve`` then says what to install, in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1])

# One fresh interpreter where the serve extra cannot be imported; it imports the CLI (as `clipsurgery`
# does at start) and runs each command line in a child forked from it (helpers.ForkedCli: a process of
# its own with its exit code and output, without another interpreter start's ~5 s of imports).
BLOCK = ("import json, sys\n"
         "for name in ('starlette', 'uvicorn', 'prometheus_client', 'multipart', 'python_multipart'):\n"
         "    sys.modules[name] = None  # import of it raises ImportError, as when it is not installed\n"
         "import surgery.cli.main\n"
         "sys.path.insert(0, sys.argv[1])\n"
         "from helpers import ForkedCli\n"
         "out = sys.argv[2]\n"
         "for i, argv in enumerate(json.loads(sys.argv[3])):\n"
         "    proc = ForkedCli(argv, out, f'{out}/{i}.out', err_log=f'{out}/{i}.err')\n"
         "    print(proc.wait(timeout=120), flush=True)\n")


def _cli(tmp_path, *argvs):
    """[(exit code, stdout, stderr)] of each command line, in the interpreter without the extra."""
    run = subprocess.run([sys.executable, "-c", BLOCK, TESTS, str(tmp_path), json.dumps(argvs)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    codes = [int(line) for line in run.stdout.split()]
    assert len(codes) == len(argvs), run.stdout
    return [(code, (tmp_path / f"{i}.out").read_text(), (tmp_path / f"{i}.err").read_text())
            for i, code in enumerate(codes)]


def test_commands_work_without_the_serve_extra_and_serve_says_what_to_install(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not used")
    helps = [["--help"], ["debias", "--help"], ["export", "--help"], ["serve", "--help"]]
    *results, refused = _cli(tmp_path, *helps, ["serve", str(model)])
    for argv, (code, out, err) in zip(helps, results):
        assert code == 0, (argv, out, err[-2000:])
        assert "Usage: clipsurgery" in out, (argv, out)
    import surgery.serve  # noqa: F401 - the light part imports anywhere

    code, _, err = refused
    assert code == 1 and "Traceback" not in err
    assert "needs the serve extra (missing: starlette)" in err
    assert len(err.strip().splitlines()) == 1
