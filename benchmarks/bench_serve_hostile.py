"""The hostile mix of ``python benchmarks/bench_serve.py --hostile`` (issue 24): normal load alone,
then the same load beside hostile and heavy clients, against one server. See bench_serve.py's
docstring for what is sent and the targets.
"""
from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import httpx
import numpy as np
from bench_onnx import cpu_name
from bench_serve import REPO, jpeg, rss_mib
from PIL import Image

BOUNDARY = "benchboundary7f3a"


def huge_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height greyscale pixels and a few rows of data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 64))
            + chunk(b"IEND", b""))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def request(port: int, path: str, body: bytes, content_type: str, length: int | None = None) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")
    return head.encode() + body


def multipart(port: int, files: list[bytes], fields: dict[str, str] | None = None) -> bytes:
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in (fields or {}).items()]
    parts += [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x{i}.png\"\r\n"
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return request(port, "/v1/embeddings/image", body, f"multipart/form-data; boundary={BOUNDARY}")


def json_request(port: int, path: str, payload) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return request(port, path, body, "application/json")


def new_words(rng: np.random.Generator, n: int = 256, chars: int = 4096) -> dict:
    letters = rng.integers(ord("a"), ord("z") + 1, size=(n, chars), dtype=np.uint8)
    letters[:, 9::10] = ord(" ")
    return {"texts": [row.tobytes().decode() for row in letters]}


async def exchange(port: int, data: bytes, conn=None) -> tuple[int | str, tuple | None]:
    """Send one request (on ``conn`` = (reader, writer), or a new connection); (status, connection to reuse).
    An error status comes with the answer's error code: ``"503 busy"``."""
    reader, writer = conn or await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (OSError, asyncio.IncompleteReadError):
        writer.close()
        raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    if status != 200:
        try:
            status = f"{status} {json.loads(body)['error']['code']}"
        except (ValueError, KeyError, TypeError):
            pass
    if headers.get("connection", "").lower() == "close":
        writer.close()
        return status, None
    return status, (reader, writer)


def must_refuse(port: int) -> list[tuple[str, bytes]]:
    return [
        ("PNG bomb 20000 x 20000", multipart(port, [huge_png(20_000, 20_000)])),
        ("PNG 8000 x 8000 (under Pillow's limit)", multipart(port, [huge_png(8000, 8000)])),
        ("aspect bomb 1 x 1,000,000", multipart(port, [png(Image.new("L", (1, 1_000_000), 128))])),
        ("text of 100,000 characters", json_request(port, "/v1/embeddings/text", {"texts": ["a" * 100_000]})),
        ("JSON nested 100,000 deep", json_request(port, "/v1/embeddings",
                                                  b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
        ("17 MB body (declared)", request(port, "/v1/embeddings/text", b"", "application/json", 17_000_000)),
        ("form field beside a file", multipart(port, [jpeg(1)], {"caption": "a dog"})),
        ("another model's name", json_request(port, "/v1/embeddings", {"input": "a dog", "model": "gpt-4"})),
    ]


async def drive(port: int, pid: int, phase_s: float, clients: int, refusers: int, heavies: int) -> dict:
    hostile = bool(refusers or heavies)
    normal = [multipart(port, [jpeg(i)]) for i in range(8)] + \
             [json_request(port, "/v1/embeddings/text", {"texts": [f"a photo of thing number {i}"]}) for i in range(8)]
    refuse = must_refuse(port) if hostile else []
    big = png(Image.fromarray(np.broadcast_to(np.linspace(0, 255, 6000, dtype=np.uint8)[None, :, None],
                                              (6000, 6000, 3)).copy())) if hostile else b""
    rng = np.random.default_rng(0)
    out = {"latencies": [], "normal_errors": collections.Counter(), "refuse": collections.defaultdict(collections.Counter),
           "heavy": collections.defaultdict(collections.Counter), "rss": [], "errors": collections.Counter()}
    deadline = time.perf_counter() + phase_s

    async def normal_client(k: int) -> None:
        conn = None
        i = k
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                status, conn = await exchange(port, normal[i % len(normal)], conn)
            except (OSError, asyncio.IncompleteReadError) as exc:
                status, conn = repr(exc)[:60], None
            out["latencies"].append(time.perf_counter() - start)
            if status != 200:
                out["normal_errors"][status] += 1
            i += 1

    async def refuse_client(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            name, data = refuse[i % len(refuse)]
            try:
                status, conn = await exchange(port, data)
                if conn:
                    conn[1].close()
            except (OSError, asyncio.IncompleteReadError) as exc:
                status = repr(exc)[:60]
            out["refuse"][name][status] += 1
            i += 1

    async def heavy_client(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            if i % 2:
                name, data = "PNG 6000 x 6000 (36 M pixels)", multipart(port, [big])
            else:
                name, data = "256 texts x 4,096 chars of new words", json_request(
                    port, "/v1/embeddings/text", new_words(rng))
            try:
                status, conn = await exchange(port, data)
                if conn:
                    conn[1].close()
            except (OSError, asyncio.IncompleteReadError) as exc:
                status = repr(exc)[:60]
            out["heavy"][name][status] += 1
            i += 1

    async def sample() -> None:
        while True:
            out["rss"].append(rss_mib(pid))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    tasks = [normal_client(k) for k in range(clients)]
    tasks += [refuse_client(k) for k in range(refusers)] + [heavy_client(k) for k in range(heavies)]
    start = time.perf_counter()
    await asyncio.gather(*tasks)
    out["elapsed"] = time.perf_counter() - start
    sampler.cancel()
    out["rss"].append(rss_mib(pid))
    return out


def run_hostile(opt) -> None:
    root = tempfile.mkdtemp(prefix="bench-serve-hostile-")
    try:
        model = opt.model
        if model is None:
            import surgery
            from surgery.export.onnx import export_onnx

            model = os.path.join(root, "world.onnx")
            export_onnx(surgery.load("builtin:world"), model)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, "-m", "surgery", "serve", model, "--port", str(port), "--log-level",
                                 "error"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
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
        ready_rss = rss_mib(proc.pid)
        phases = {}
        for name, refusers, heavies in (("clean", 0, 0), ("must-refuse", opt.refusers, 0),
                                        ("+ heavy flood", opt.refusers, opt.heavies)):
            phases[name] = asyncio.run(drive(port, proc.pid, opt.phase_s, opt.clients, refusers, heavies))
            phases[name]["alive"] = proc.poll() is None and httpx.get(url + "/healthz").status_code == 200
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 120 s"
        stderr = proc.stderr.read().decode(errors="replace")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{opt.model or 'builtin:world (both towers)'}; {opt.clients} normal clients (224x224 JPEG / short text, "
          f"alternating), {opt.phase_s:g} s per phase; then {opt.refusers} must-refuse clients beside them, then "
          f"{opt.heavies} heavy ones too (all closed loops); "
          f"{cpu_name()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'phase':<12} {'normal req':>10} {'normal errors':>14} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'RSS MiB ready / peak':>21} {'alive':>6}")
    p99 = {}
    for name, r in phases.items():
        lat = sorted(r["latencies"])
        p99[name] = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"{name:<12} {len(lat):>10} {sum(r['normal_errors'].values()):>14} {1000 * statistics.median(lat):>7.0f} "
              f"{1000 * p99[name]:>7.0f} {ready_rss:>10.0f} / {max(r['rss']):>7.0f} {str(r['alive']):>6}")
        if r["normal_errors"]:
            print(f"{'':<12} normal errors: {dict(r['normal_errors'])}")
    mix = phases["+ heavy flood"]
    print("\nmust-refuse requests, both hostile phases (status: count)")
    refused_ok = True
    merged = collections.defaultdict(collections.Counter)
    for phase in ("must-refuse", "+ heavy flood"):
        for name, counts in phases[phase]["refuse"].items():
            merged[name].update(counts)
    for name, counts in merged.items():
        ok = all(str(s)[:1] == "4" or str(s).startswith("503") for s in counts)
        refused_ok &= ok
        print(f"  {name:<42} {dict(counts)}{'' if ok else '  <- not 4xx/503'}")
    print("heavy legal requests (status: count)")
    for name, counts in mix["heavy"].items():
        print(f"  {name:<42} {dict(counts)}")
    peak = max(max(r["rss"]) for r in phases.values())
    print(f"\nserver RSS peak {peak:.0f} MiB (ceiling {opt.rss_ceiling_mib:.0f}): "
          f"{'met' if peak <= opt.rss_ceiling_mib else 'NOT met'}")
    for phase in ("must-refuse", "+ heavy flood"):
        ratio = p99[phase] / p99["clean"]
        print(f"p99 of normal requests, {phase} / clean: {ratio:.2f}x (target <= 2x): {'met' if ratio <= 2 else 'NOT met'}")
    print(f"crashes: {0 if all(r['alive'] for r in phases.values()) and code == 0 else 'yes'} (exit {code} after "
          f"SIGTERM); every must-refuse request 4xx/503: {'yes' if refused_ok else 'NO'}")
    if "Traceback" in stderr:
        print(f"server log had a traceback:\n{stderr[-3000:]}")
