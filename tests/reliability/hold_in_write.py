"""Run a clipsurgery command that stops inside one of its file writes (for test_kills.py).

    python hold_in_write.py MARKER WRITER NAME N -- CLIPSURGERY ARGS...

WRITER names the function that writes the files: ``safetensors`` (safetensors.torch.save_file,
under every .safetensors the tool writes) or ``onnx`` (onnx.save_model). Its N-th call (1-based)
writing a file whose name contains NAME writes that file as usual (to the temporary or staging
path the tool gave it), then writes MARKER (holding that path) and waits there for the test's
signal. So the kill lands inside the write, known to be there: the bytes are on disk, the rename
to the final path has not happened. Nothing in clipsurgery itself is changed.

test_kills.py calls :func:`hold` in a forked child (helpers.ForkedCli) rather than this script in
a fresh interpreter: the same patch, without an interpreter start per run.
"""
from __future__ import annotations

import os
import signal
import sys

WRITERS = {"safetensors": ("safetensors.torch", "save_file"), "onnx": ("onnx", "save_model")}


def hold(marker: str, writer: str, name: str, nth: int) -> None:
    """Patch WRITER so that its ``nth`` write of a file named like ``name`` stops there (see above)."""
    module_name, attr = WRITERS[writer]
    module = __import__(module_name, fromlist=[attr])
    original = getattr(module, attr)
    calls = 0

    def held(*a, **kw):
        nonlocal calls
        result = original(*a, **kw)
        path = os.path.abspath(str(a[1]))  # save_file(tensors, filename, ...), save_model(proto, f, ...)
        if name in os.path.basename(path):
            calls += 1
            if calls == int(nth):
                with open(marker + ".tmp", "w") as fh:
                    fh.write(path)
                os.replace(marker + ".tmp", marker)
                while True:  # killed here (SIGTERM's handler raises out of pause)
                    signal.pause()
        return result

    setattr(module, attr, held)


def main() -> None:
    marker, writer, name, nth = sys.argv[1:5]
    hold(marker, writer, name, int(nth))
    sys.argv = ["clipsurgery", *sys.argv[sys.argv.index("--") + 1:]]
    from surgery.cli.main import main as cli

    cli()


if __name__ == "__main__":
    main()
