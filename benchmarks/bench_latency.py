"""Latency from enqueue to handler start at a steady 200 tasks/s (run by hand).

    python benchmarks/bench_latency.py [--seconds 10] [--rate 200]

Two set-ups on SQLite: the runner in the app's process (woken on add), and a
separate ``tq-web run`` process (it polls the queue every 10 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def measure(inprocess: bool, seconds: float, rate: float) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        target = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "TQ_WEB_BACKEND": f"sqlite:///{tmp}/lat.db",
            "BENCH_INPROCESS": "1" if inprocess else "0",
            "BENCH_TARGET": target,
            "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "_latency_app:app",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
        )
        runner = None
        try:
            wait_port(port)
            if not inprocess:
                runner = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tq_web",
                        "run",
                        "--backend",
                        env["TQ_WEB_BACKEND"],
                        "--target",
                        target,
                        "--no-progress",
                    ],
                    stdout=subprocess.DEVNULL,
                    env=env,
                )
                time.sleep(1.0)
            n = int(seconds * rate)
            start = time.perf_counter()
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                req = urllib.request.Request(
                    target + "/enqueue", data=b"", method="POST"
                )
                urllib.request.urlopen(req).read()
            time.sleep(1.0)
            with urllib.request.urlopen(target + "/results") as resp:
                lat = json.loads(resp.read())
            assert len(lat) == n, (len(lat), n)
            return [x * 1000 for x in lat]
        finally:
            if runner is not None:
                runner.terminate()
                runner.wait(30)
            server.terminate()
            server.wait(30)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rate", type=float, default=200)
    args = ap.parse_args()
    for name, inproc in (("in-process runner", True), ("tq-web run process", False)):
        lat = measure(inproc, args.seconds, args.rate)
        print(
            f"{name:20} n={len(lat)}  p50 {statistics.median(lat):6.2f} ms  "
            f"p99 {pct(lat, 99):6.2f} ms  max {max(lat):6.2f} ms"
        )


if __name__ == "__main__":
    main()
