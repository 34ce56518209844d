"""Latency and throughput of ``imgfeat serve`` under a bounded load from this machine (docs/serving.md).

Starts nothing: point it at a running server. Sends ``--requests`` POST /predict calls (raw bytes of the given
images, round robin) from ``--clients`` concurrent threads, with a ``--seconds`` cap, after ``--warmup`` calls;
prints one JSON line: p50/p90/p99/max latency (ms), throughput (requests/s), status counts, and the server's
own timings (median decode / inference / head ms). Also the server's RSS before and after when ``--pid`` is set.

    python bench/serve_load.py --url http://127.0.0.1:8000 --image x.jpeg --clients 1 --requests 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from pathlib import Path


def _rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def run(url: str, images: list[str], clients: int, requests: int, seconds: float, warmup: int, explain: bool,
        pid: int | None) -> dict:
    import httpx

    blobs = [Path(p).read_bytes() for p in images]
    kinds = ["image/png" if p.lower().endswith(".png") else "image/jpeg" for p in images]
    target = f"{url.rstrip('/')}/predict" + ("?explain=true" if explain else "")
    with httpx.Client(timeout=120) as client:
        for i in range(warmup):
            client.post(target, content=blobs[i % len(blobs)], headers={"Content-Type": kinds[i % len(kinds)]})
    rss_before = _rss_mb(pid)
    latencies: list[float] = []
    server: dict[str, list[float]] = {"decode": [], "inference": [], "head": [], "explain": []}
    statuses: Counter = Counter()
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = client.post(target, content=blobs[i % len(blobs)], headers={"Content-Type": kinds[i % len(kinds)]})
                elapsed = 1000 * (time.perf_counter() - t0)
                with lock:
                    statuses[r.status_code] += 1
                    latencies.append(elapsed)
                    if r.status_code == 200:
                        for k, v in r.json()["timings_ms"].items():
                            if k in server:
                                server[k].append(v)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "images": images, "clients": clients, "requests": len(latencies), "explain": explain,
        "p50_ms": round(q[49], 1), "p90_ms": round(q[89], 1), "p99_ms": round(q[98], 1), "max_ms": round(max(latencies), 1),
        "throughput_rps": round(len(latencies) / wall, 2), "statuses": dict(statuses),
        "server_median_ms": {k: round(statistics.median(v), 1) for k, v in server.items() if v},
        "rss_mb_before": rss_before, "rss_mb_after": _rss_mb(pid),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--image", action="append", required=True, help="image file(s) to send, round robin")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--explain", action="store_true")
    p.add_argument("--pid", type=int, help="the server's process id, for its memory")
    a = p.parse_args()
    print(json.dumps(run(a.url, a.image, a.clients, a.requests, a.seconds, a.warmup, a.explain, a.pid)), flush=True)


if __name__ == "__main__":
    main()
