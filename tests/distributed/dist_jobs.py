"""Running clipsurgery as a multi-process job from a test: through torchrun (as users do), or as
hand-started ranks (to give each rank other arguments)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

#: Each rank runs on one thread (as torchrun sets it), so two ranks fit two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m surgery ARGV`` (one process; --nproc in ARGV launches torchrun)."""
    return subprocess.run([sys.executable, "-m", "surgery", *argv], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(argvs: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start one process per argv as ranks 0..n-1 of one gloo job (each may get other arguments)."""
    port = free_port()
    procs = []
    for rank, argv in enumerate(argvs):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(argvs)), "LOCAL_WORLD_SIZE": str(len(argvs))}
        procs.append(subprocess.Popen([sys.executable, "-m", "surgery", *argv], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
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
