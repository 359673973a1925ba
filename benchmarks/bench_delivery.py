"""Delivery: runner → uvicorn app over 127.0.0.1, next to the ceiling of the
same HTTP client (aiohttp + uvloop, 32-way) posting to a bare endpoint of the
same server, measured in one run (run by hand).

    python benchmarks/bench_delivery.py [--n 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp
import uvloop
from google.protobuf.duration_pb2 import Duration

import tq_web
from tq_web.runner import Runner

BODY = b'{"type":"google.protobuf.Duration","body":"123s"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ceiling(url: str, n: int, conc: int = 32) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        for _ in range(50):
            async with s.post(url, data=BODY) as r:
                await r.read()
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with s.post(url, data=BODY) as r:
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        return n / (time.perf_counter() - t0)


async def deliver(backend_url: str, target: str, n: int) -> float:
    d = tq_web.Dispatcher(backend_url, secret_key="bench-key")
    d.register_task(Duration, lambda p: None)
    for i in range(0, n, 1000):
        d.add_task(
            *[tq_web.Task(Duration(seconds=j)) for j in range(i, min(n, i + 1000))]
        )
    # The default queue is limited to Cloud Tasks' 500 tasks/s: lift it here.
    fast = {"default": tq_web.QueueConfig("default", rate=1e6, bucket_size=10_000)}
    runner = Runner(d.backend, target, queues=fast, max_in_flight=32, batch_size=32)
    t0 = time.perf_counter()
    await runner.start()
    while runner.stats.delivered + runner.stats.failed < n:
        await asyncio.sleep(0.01)
    dt = time.perf_counter() - t0
    await runner.stop()
    assert runner.stats.failed == 0, runner.stats
    d.close()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {
            **os.environ,
            "TQ_WEB_BACKEND": f"sqlite:///{tmp}/app.db",
            "TQ_WEB_SECRET_KEY": "bench-key",
            "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "_bench_app:app",
                "--port",
                str(port),
                "--http",
                "httptools",
                "--loop",
                "uvloop",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
        )
        try:
            target = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            ceil, runs = [], []
            for r in range(args.runs):
                ceil.append(uvloop.run(ceiling(target + "/bare", args.n)))
                rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                runs.append(
                    uvloop.run(deliver(f"sqlite:///{tmp}/q{r}.db", target, args.n))
                )
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(
                    f"run {r + 1}: {runs[-1]:,.0f} tasks/s, max RSS {rss:.0f} MiB "
                    f"(+{rss - rss_before / 1024:.1f} MiB during this run)"
                )
        finally:
            server.terminate()
            server.wait(10)
    c, d = statistics.median(ceil), statistics.median(runs)
    print(
        f"aiohttp+uvloop ceiling, bare endpoint : {c:8,.0f} req/s  "
        f"[{min(ceil):,.0f}-{max(ceil):,.0f}]"
    )
    print(
        f"tq_web runner -> push endpoint, SQLite: {d:8,.0f} tasks/s "
        f"[{min(runs):,.0f}-{max(runs):,.0f}]  = {d / c:.2f}x ceiling"
    )


if __name__ == "__main__":
    main()
