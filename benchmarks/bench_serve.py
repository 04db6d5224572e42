"""clipsurgery serve under load on loopback: dynamic batching vs batch-1 serving, side by side;
the same for an int8 file; and a hostile mix beside normal load.

    python benchmarks/bench_serve.py [--arch ViT-B-32] [--clients 32] [--requests 2000] [--time-limit-s 240]
                                     [--max-batch 32] [--max-wait-ms 5] [--model OUT.onnx] [--int8]
    python benchmarks/bench_serve.py --hostile [--model OUT.onnx] [--phase-s 40] [--clients 8] [--rss-ceiling-mib 2048]
                                     [--refusers 3] [--heavies 6]

``--int8``: the random --arch export is quantized (int8 dynamic, the export's defaults, no gate:
random weights) and served the same way. Before the runs, ONNX Runtime alone is timed at batch 1
and batch 32 with the server's session options: the most batching can give on this machine.

``--hostile`` (issue 24): the world model's pair (both towers; or --model) under normal load
(``--clients`` closed-loop clients alternating one 224x224 JPEG and one short text), first alone
(clean), then beside ``--refusers`` closed-loop clients sending, in turn, requests that must be
refused (a 20000 x 20000 PNG bomb, an 8000 x 8000 one under Pillow's own limit, a 1 x 1,000,000
aspect-ratio bomb, a 100,000-character text, JSON nested 100,000 deep, a 17 MB body, a form field
beside a file, another model's name), then also beside ``--heavies`` clients sending heavy requests
that are legal (a 6000 x 6000 PNG: 36 M pixels to decode; 256 texts of 4,096 characters of new
words) in closed loops (a flood). Targets: server RSS under --rss-ceiling-mib, p99 of the normal
requests within 2x of the clean phase, no crash (the server answers throughout and exits 0 on
SIGTERM), every must-refuse request answered 4xx/503 (heavy ones: 200 or 503, counted).

Issue 16 targets: throughput with dynamic batching >= 3x batch-1 serving (32 concurrent clients,
2,000 image requests each run, ViT-B/32 vision tower with random weights), 0 errors, server RSS
flat over the run; p50 / p99 latency reported. Each run starts the real server (a subprocess on
127.0.0.1), waits for /readyz, drives it with a minimal asyncio HTTP/1.1 client (one 224x224 JPEG per
multipart request, ``--clients`` keep-alive connections in a closed loop), samples the server's RSS every 0.5 s, reads
the batch-size histogram from /metrics, and stops it with SIGTERM (exit status reported). A run
stops early at --time-limit-s (the figures then say how many requests it made). The client
shares the machine's cores with the server. "ONNX Runtime busy" is the time the server spent in
ONNX Runtime calls during the run: with it near the run's length the server is bound by ONNX
Runtime, and the throughput ratio by ONNX Runtime's own per-image gain from batching (compare
benchmarks/bench_onnx.py's batch 1 and 32 rows on the same machine).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import torch
from bench_onnx import cpu_name
from PIL import Image

from surgery.export.onnx import OnnxOptions, export_onnx
from surgery.export.quantize import QuantizeOptions, quantize_file
from surgery.io.onnx import ort_session
from surgery.model.arch import build_model, get_config
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import default_preprocess, tokenizer_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_random(arch: str, root: str) -> str:
    torch.manual_seed(0)
    cfg = get_config(arch)
    loaded = LoadedModel(model=build_model(cfg).eval(), arch=arch, config=cfg, source="random", format="builtin",
                         sha256=None, preprocess=default_preprocess(cfg), tokenizer=tokenizer_info(cfg))
    path = os.path.join(root, "vision.onnx")
    export_onnx(loaded, path, options=OnnxOptions(tower="vision"))
    return path


def ort_alone(model: str, rounds: int = 3) -> dict[int, float]:
    """ONNX Runtime alone with the server's session options: seconds per image at batch 1 and 32."""
    from bench_onnx import timed_rounds

    session = ort_session(model, spinning=False, memory_pattern=False, arena=False)
    inp = session.get_inputs()[0]
    size = inp.shape[-1]
    rng = np.random.default_rng(0)
    fns = {}
    for batch in (1, 32):
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        fns[batch] = (lambda x=x: session.run(None, {inp.name: x}))
    t = timed_rounds(fns, rounds, 3)
    return {batch: t[batch] / batch for batch in t}


def jpeg(seed: int, size: int = 224) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size)[None, :, None] * rng.random(3)[None, None, :]
    img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def multipart_request(port: int, image: bytes) -> bytes:
    """One pre-built HTTP/1.1 keep-alive request: POST /v1/embeddings/image with one JPEG file."""
    boundary = "benchboundary7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/embeddings/image HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; (status, body)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


async def drive(port: int, images: list[bytes], clients: int, requests: int, time_limit: float, pid: int) -> dict:
    """``clients`` keep-alive connections, each sending its next request when the last one is answered (a
    closed loop, like wrk): a light load generator, so the client takes little of the cores the server needs."""
    latencies, errors, rss = [], [], []
    counter = iter(range(requests))
    deadline = time.perf_counter() + time_limit
    prepared = [multipart_request(port, image) for image in images]

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                try:
                    status, body = await exchange(reader, writer, prepared[i % len(prepared)])
                    ok = status == 200 and len(json.loads(body)["data"]) == 1
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    status, ok = repr(exc), False
                latencies.append(time.perf_counter() - start)
                if not ok:
                    errors.append(str(status))
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    async def sample_rss() -> None:
        while True:
            rss.append((len(latencies), rss_mib(pid)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    sampler.cancel()
    rss.append((len(latencies), rss_mib(pid)))
    return {"n": len(latencies), "errors": errors, "elapsed": elapsed, "latencies": latencies, "rss": rss}


def run_server(model: str, args: list[str], images: list[bytes], opt) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "serve", model, "--port", str(port), "--log-level",
                             "warning", "--max-queue", str(max(1024, opt.clients * 2)), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not become ready: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        start_rss = rss_mib(proc.pid)
        for i in range(opt.clients):  # warm the connection pool's server side and ORT's batch shapes
            httpx.post(url + "/v1/embeddings/image", files={"image": ("x.jpg", images[i % len(images)], "image/jpeg")})
        before = httpx.get(url + "/metrics").text  # the warm-up requests are not part of the run's figures
        result = asyncio.run(drive(port, images, opt.clients, opt.requests, opt.time_limit_s, proc.pid))
        result["start_rss"] = start_rss
        after = httpx.get(url + "/metrics").text

        def delta(name: str) -> float:
            return metric(after, name) - metric(before, name)

        result["batch_mean"] = delta("clipsurgery_batch_size_sum") / max(1.0, delta("clipsurgery_batch_size_count"))
        result["ort_s"] = delta("clipsurgery_inference_seconds_sum")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result_code = "killed after 60 s"
    result["exit"] = result_code
    return result


def rss_at(run: dict, fraction: float) -> float:
    """The server's RSS when ``fraction`` of the run's requests were answered."""
    return next((mib for done, mib in run["rss"] if done >= fraction * run["n"]), run["rss"][-1][1])


def print_runs(runs: dict) -> dict:
    print(f"{'run':<32} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} "
          f"{'RSS MiB: ready / 10% / 25% / 50% / 75% / end':>46} {'exit':>5}")
    rates = {}
    for name, r in runs.items():
        lat = sorted(r["latencies"])
        rates[name] = r["n"] / r["elapsed"]
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"{name:<32} {r['n']:>8} {len(r['errors']):>6} {rates[name]:>8.1f} {1000 * statistics.median(lat):>8.0f} "
              f"{1000 * p99:>8.0f} {r['batch_mean']:>10.1f} "
              f"{r['start_rss']:>13.0f} / " + " / ".join(f"{rss_at(r, f):.0f}" for f in (0.1, 0.25, 0.5, 0.75))
              + f" / {r['rss'][-1][1]:.0f}{'':>3} {r['exit']!s:>5}")
        print(f"{'':<32} ONNX Runtime busy {r['ort_s']:.1f} s of {r['elapsed']:.1f} s "
              f"({1000 * r['ort_s'] / max(1, r['n']):.1f} ms per image)")
        if r["errors"]:
            print(f"  errors: {sorted(set(r['errors']))[:5]}")
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--model", default=None, help="serve this exported file instead of a random --arch export")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 32; --hostile: 8 normal)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--time-limit-s", type=float, default=240.0, help="per run")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--int8", action="store_true", help="also serve an int8 (dynamic) quantization of the export")
    ap.add_argument("--hostile", action="store_true", help="the hostile mix beside normal load (see the docstring)")
    ap.add_argument("--phase-s", type=float, default=40.0, help="--hostile: seconds of each phase")
    ap.add_argument("--rss-ceiling-mib", type=float, default=2048.0, help="--hostile: the server's RSS ceiling")
    ap.add_argument("--refusers", type=int, default=3, help="--hostile: clients sending must-refuse requests")
    ap.add_argument("--heavies", type=int, default=6, help="--hostile: clients sending heavy legal requests")
    opt = ap.parse_args()
    if opt.hostile:
        from bench_serve_hostile import run_hostile

        opt.clients = opt.clients or 8
        return run_hostile(opt)
    opt.clients = opt.clients or 32
    root = tempfile.mkdtemp(prefix="bench-serve-")
    try:
        model = opt.model or export_random(opt.arch, root)
        models = {"fp32": model}
        if opt.int8:
            models["int8"] = os.path.join(root, "vision-int8.onnx")
            quantize_file(model, models["int8"], QuantizeOptions())
        images = [jpeg(i) for i in range(16)]
        alone = {name: ort_alone(path) for name, path in models.items()}
        runs = {}
        for name, path in models.items():
            runs[name] = {
                f"{name} dynamic (max {opt.max_batch}, {opt.max_wait_ms:g} ms)": run_server(
                    path, ["--max-batch", str(opt.max_batch), "--max-wait-ms", str(opt.max_wait_ms)], images, opt),
                f"{name} batch-1": run_server(path, ["--max-batch", "1", "--max-wait-ms", "0"], images, opt),
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{opt.model or opt.arch + ' vision tower, random weights'}; {opt.clients} concurrent clients, up to "
          f"{opt.requests} image requests per run (224x224 JPEG, multipart); {cpu_name()}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    for name, per_image in alone.items():
        print(f"ONNX Runtime alone ({name}, the server's session options): {1000 * per_image[1]:.1f} ms per image at "
              f"batch 1, {1000 * per_image[32]:.1f} at batch 32: {per_image[1] / per_image[32]:.2f}x")
    for name, group in runs.items():
        print()
        dyn, one = print_runs(group).values()
        print(f"{name} throughput dynamic / batch-1: {dyn / one:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
