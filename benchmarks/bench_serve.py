"""Load on `vitqc serve` over loopback: requests/s, latency percentiles, errors, memory.

Starts the real service (``vitqc serve MODEL`` in a child process, a free port on
127.0.0.1, an API key), then for each concurrency level sends a bounded number of
``POST /predict`` requests (raw image bodies, cycling through the images) from that many
client threads, each on its own keep-alive connection. Latency is the client's, from
sending to the last byte of the answer, over the requests answered 200; answered/s
counts every answer, decisions/s the 200s. 503s (queue full, answered at once with
``Retry-After``) are counted apart from other errors. The server's resident memory
(RSS, psutil) is read before and after each level. Last, hostile uploads (garbage, a
truncated PNG, a 20000 x 20000 PNG bomb, a 30 MB body, a request without the key) with
their status and time. Run:

.venv/bin/python benchmarks/bench_serve.py MODEL.onnx --images ../shared/data/kolektorsdd/test
    [--requests 200] [--concurrency 1,4,16] [--workers 2] [--max-queue 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from vitqc.data.io import expand_inputs
from vitqc.data.synth import png_bomb

KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def post(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> int:
    conn.request("POST", "/predict", body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def load_level(port: int, payloads: list[bytes], n: int, concurrency: int) -> dict:
    """``n`` requests from ``concurrency`` threads; per-request (status, seconds)."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    counter = iter(range(n))
    headers = {"Content-Type": "image/png", "X-API-Key": KEY}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                status = post(conn, payloads[i % len(payloads)], headers)
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                results.append((status, time.perf_counter() - start))
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = np.array([s for code, s in results if code == 200]) * 1000
    codes = Counter(code for code, _ in results)
    return {
        "n": n,
        "wall": wall,
        "ok": int(codes[200]),
        "busy": int(codes[503]),
        "errors": sum(v for k, v in codes.items() if k not in (200, 503)),
        "p50": float(np.percentile(ok, 50)) if ok.size else float("nan"),
        "p95": float(np.percentile(ok, 95)) if ok.size else float("nan"),
        "p99": float(np.percentile(ok, 99)) if ok.size else float("nan"),
    }


def hostile(port: int, good_png: bytes) -> list[tuple[str, int, float, str]]:
    cases = [
        ("garbage bytes (4 KB)", os.urandom(4096), {"X-API-Key": KEY}),
        ("truncated PNG", good_png[: len(good_png) // 2], {"X-API-Key": KEY}),
        ("20000x20000 PNG bomb", png_bomb(), {"X-API-Key": KEY}),
        ("30 MB body", b"\0" * (30 << 20), {"X-API-Key": KEY}),
        ("no API key", good_png, {}),
    ]
    rows = []
    for name, body, headers in cases:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start = time.perf_counter()
        conn.request(
            "POST", "/predict", body=body, headers={**headers, "Content-Type": "image/png"}
        )
        resp = conn.getresponse()
        detail = resp.read().decode(errors="replace")
        rows.append((f"{name} [{len(body):,} B]", resp.status, time.perf_counter() - start, detail))
        conn.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="MODEL.onnx (or a bundle folder)")
    parser.add_argument("--images", type=Path, required=True, help="images or a folder")
    parser.add_argument("--requests", type=int, default=200, help="requests per level")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker")
    parser.add_argument("--max-images", type=int, default=32, help="distinct images sent")
    args = parser.parse_args()

    files = expand_inputs([args.images])[: args.max_images]
    payloads = [p.read_bytes() for p in files]
    buf = io.BytesIO()
    Image.open(files[0]).save(buf, format="PNG")
    port = free_port()
    cmd = [sys.executable, "-m", "vitqc.cli", "serve", str(args.model), "--port", str(port)]
    cmd += ["--workers", str(args.workers), "--max-queue", str(args.max_queue)]
    cmd += ["--threads", str(args.threads), "--api-key", KEY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited: {proc.stdout.read().decode()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("server did not start")
            time.sleep(0.2)
        load_level(port, payloads, 8, 1)  # warm-up
        print(
            f"model {args.model}, {len(payloads)} images from {args.images} "
            f"({Image.open(files[0]).size[0]}x{Image.open(files[0]).size[1]} first), server "
            f"--workers {args.workers} --threads {args.threads} --max-queue {args.max_queue}, "
            f"{os.cpu_count()} CPUs"
        )
        print()
        print(
            "| concurrency | requests | answered/s | decisions/s | p50 ms | p95 ms | p99 ms | "
            "200 | 503 | "
            "other errors | RSS before MB | RSS after MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for level in (int(c) for c in args.concurrency.split(",")):
            before = rss_mb(proc.pid)
            r = load_level(port, payloads, args.requests, level)
            after = rss_mb(proc.pid)
            print(
                f"| {level} | {r['n']} | {r['n'] / r['wall']:.1f} | {r['ok'] / r['wall']:.1f} | "
                f"{r['p50']:.1f} | "
                f"{r['p95']:.1f} | {r['p99']:.1f} | {r['ok']} | {r['busy']} | {r['errors']} | "
                f"{before:.0f} | {after:.0f} |",
                flush=True,
            )
        print()
        before = rss_mb(proc.pid)
        print("| hostile upload | status | ms | answer |")
        print("|---|---|---|---|")
        for name, status, seconds, detail in hostile(port, buf.getvalue()):
            print(f"| {name} | {status} | {seconds * 1000:.1f} | {detail[:110]} |")
        print(
            f"\nserver RSS before the hostile uploads {before:.0f} MB, "
            f"after {rss_mb(proc.pid):.0f} MB"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
