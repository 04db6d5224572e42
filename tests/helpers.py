"""Helpers shared by tests."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def embeddings(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def assert_same_embeddings(model_a, model_b, images, tokens, atol=1e-6):
    """Equal to ``atol`` absolute plus ``atol`` relative (float32 rounding of O(1) values)."""
    img_a, txt_a = embeddings(model_a, images, tokens)
    img_b, txt_b = embeddings(model_b, images, tokens)
    torch.testing.assert_close(img_a, img_b, atol=atol, rtol=atol)
    torch.testing.assert_close(txt_a, txt_b, atol=atol, rtol=atol)


def labelled_image_folder(tmp_path, n=12):
    """(images_dir, labels.csv): n 32x32 PNGs, alternately red and blue (column ``colour``)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,colour"]
    for i in range(n):
        colour = "red" if i % 2 == 0 else "blue"
        arr = np.zeros((32, 32, 3), dtype=np.uint8)
        arr[..., 0 if colour == "red" else 2] = 200
        arr += rng.integers(0, 40, size=arr.shape, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{colour}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(folder), str(tmp_path / "labels.csv")


class IdentityImageEncoder(torch.nn.Module):
    """A 'CLIP' whose image embedding is its input: build_cache over it caches given rows as they are."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))  # one parameter, so the model has a weights hash

    def encode_image(self, x):
        return x


def random_probe(n: int = 40):
    """A ProbeSet of n random 32 px images: 2 groups, 4 concepts, 3 neutral queries (the audit tests' probe)."""
    from surgery.audit.probe import ProbeSet

    gen = torch.Generator().manual_seed(0)
    return ProbeSet(
        images=torch.randn(n, 3, 32, 32, generator=gen),
        groups=torch.arange(n) % 2, group_names=["a", "b"],
        queries=["q1", "q2", "q3"], group_prompts=["ga", "gb"],
        concepts=torch.arange(n) % 4, class_prompts=["c0", "c1", "c2", "c3"],
    )


def unit_texts(dim: int, count: int, seed: int) -> torch.Tensor:
    """(count, dim) random unit vectors standing in for text embeddings."""
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)),
                                         dim=-1)


class ForkedCli:
    """``python -m surgery ARGS`` as a forked child of the test process, which has imported torch,
    open_clip and surgery already: a separate process (its own pid, signals, exit status and
    memory, so kill tests hold) without the ~5 s of imports a fresh interpreter pays per run.

    Output goes to ``log`` (stderr to ``err_log`` when given, else to ``log`` too); ``env`` updates
    the child's environment (its subprocesses inherit it). ``setup`` runs in the child before the command
    (a writer held by hold_in_write.hold, a monkeypatch for the child alone). Popen's poll, wait,
    send_signal, kill and returncode (negative: killed by that signal). Not for tests of what
    differs between interpreters (hash seeds: tests/reliability/test_determinism.py runs fresh ones).
    """

    def __init__(self, args, cwd, log, setup=None, err_log=None, env=None):
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                code = _forked_child(list(args), str(cwd), str(log), setup, err_log, env)
            finally:
                os._exit(code)

    def poll(self):
        import os

        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked clipsurgery (pid {self.pid})", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig):
        import os

        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        import signal

        self.send_signal(signal.SIGKILL)


def _forked_child(args, cwd, log, setup, err_log=None, env=None) -> int:
    """Run the CLI in a forked child as ``python -m surgery`` would: fresh stdout/stderr on the
    log file, default signal handlers, the root logger without pytest's handlers; the exit code."""
    import io
    import logging
    import os
    import signal
    import sys
    import traceback

    for target, path in ((1, log), (2, err_log or log)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if target == 1 or err_log else os.O_APPEND), 0o644)
        os.dup2(fd, target)
        os.close(fd)
    os.environ.update(env or {})
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    logging.root.handlers.clear()
    os.chdir(cwd)
    sys.argv = ["clipsurgery", *args]
    code = 1
    try:
        if setup is not None:
            setup()
        from surgery.cli.main import main

        main(prog_name="clipsurgery")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught error, as the interpreter would print it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def forked_cli(args, cwd, setup=None) -> tuple[int, str]:
    """(exit code, output) of ``clipsurgery ARGS`` run to its end in a forked child, in ``cwd``."""
    import pathlib

    log = pathlib.Path(cwd).parent / f"{pathlib.Path(cwd).name}.forked.log"
    proc = ForkedCli(args, cwd, log, setup)
    rc = proc.wait(timeout=1200)
    return rc, log.read_text()


def run_cli(*args):
    """``clipsurgery ARGS`` through click's CliRunner (arguments as strings)."""
    from click.testing import CliRunner

    from surgery.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, message):
    """Exit 1, the message in the output, no traceback, one line."""
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert len(result.output.strip().splitlines()) == 1, result.output
