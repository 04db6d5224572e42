"""Running clipsurgery as a multi-process job from a test: through torchrun (as users do), or as
hand-started ranks (to give each rank other arguments)."""
from __future__ import annotations

import os
import socket
import subprocess

import numpy as np
from PIL import Image

#: Each rank runs on one thread (as torchrun sets it), so two ranks fit two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m surgery ARGV`` (one process; --nproc in ARGV launches torchrun), as a forked child
    of the test process (helpers.ForkedCli: no interpreter start; torchrun's workers are fresh ones)."""
    import tempfile

    from helpers import ForkedCli

    with tempfile.TemporaryDirectory(prefix="dist-cli-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = ForkedCli(argv, os.getcwd(), out, err_log=err, env={**ENV, **(env or {})})
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
            proc.wait()
        with open(out) as fo, open(err) as fe:
            return subprocess.CompletedProcess(["clipsurgery", *argv], proc.returncode, fo.read(), fe.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(argvs: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start one process per argv as ranks 0..n-1 of one gloo job (each may get other arguments);
    each a forked child of the test process, as :func:`cli`."""
    import tempfile

    from helpers import ForkedCli

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dist-ranks-") as tmp:
        procs = []
        for rank, argv in enumerate(argvs):
            env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(argvs)), "LOCAL_WORLD_SIZE": str(len(argvs))}
            logs = os.path.join(tmp, f"{rank}.out"), os.path.join(tmp, f"{rank}.err")
            procs.append((argv, logs, ForkedCli(argv, os.getcwd(), logs[0], err_log=logs[1], env=env)))
        out = []
        try:
            for _, _, proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for _, _, proc in procs:
                proc.kill()
                proc.wait()
        for argv, (o, e), proc in procs:
            with open(o) as fo, open(e) as fe:
                out.append(subprocess.CompletedProcess(["clipsurgery", *argv], proc.returncode, fo.read(), fe.read()))
    return out


def image_folder(folder, n: int, size: int = 40, seed: int = 0) -> list[str]:
    """n PNGs of random colours in ``folder``; returns their names."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        names.append(f"{i:04d}.png")
        Image.fromarray(arr).save(os.path.join(folder, names[-1]))
    return names


def write_shards(folder, out_dir, names: list[str], per_shard: int, labels: dict[str, str] | None = None) -> list[str]:
    """WebDataset shards (written by webdataset's own TarWriter) of the folder's images, with a
    caption and a JSON label per sample; returns the shard paths."""
    import webdataset as wds

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s in range(0, len(names), per_shard):
        path = os.path.join(out_dir, f"{s // per_shard:05d}.tar")
        with wds.TarWriter(path) as tar:
            for name in names[s:s + per_shard]:
                key = name.rsplit(".", 1)[0]
                with open(os.path.join(folder, name), "rb") as fh:
                    sample = {"__key__": key, "png": fh.read(), "txt": f"caption of {key}",
                              "json": {"group": (labels or {}).get(name, "g")}}
                tar.write(sample)
        paths.append(path)
    return paths
