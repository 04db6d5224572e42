"""Every command but ``serve`` works without the serve extra (Starlette, uvicorn, prometheus-client):
README's first line installs only ``.[cpu]``. ``serve`` then says what to install, in one line."""
from __future__ import annotations

import subprocess
import sys

BLOCK = ("import sys\n"
         "for name in ('starlette', 'uvicorn', 'prometheus_client', 'multipart', 'python_multipart'):\n"
         "    sys.modules[name] = None  # import of it raises ImportError, as when it is not installed\n"
         "sys.argv = ['clipsurgery'] + sys.argv[1:]\n"
         "from surgery.cli.main import main\n"
         "main()\n")


def _cli(*argv):
    return subprocess.run([sys.executable, "-c", BLOCK, *argv], capture_output=True, text=True, timeout=120)


def test_commands_work_without_the_serve_extra_and_serve_says_what_to_install(tmp_path):
    for argv in (["--help"], ["debias", "--help"], ["export", "--help"], ["serve", "--help"]):
        result = _cli(*argv)
        assert result.returncode == 0, (argv, result.stderr[-2000:])
    import surgery.serve  # noqa: F401 - the light part imports anywhere

    model = tmp_path / "m.onnx"
    model.write_bytes(b"not used")
    refused = _cli("serve", str(model))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "needs the serve extra (missing: starlette)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
