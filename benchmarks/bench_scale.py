"""Lease (claim) time with 1,000 vs 1,000,000 queued tasks, and the runner's
memory over a long drain (run by hand).

    python benchmarks/bench_scale.py [--big 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import uuid

import tq_web
from tq_web import taskqueue as tq

PAYLOAD = b'{"type":"google.protobuf.Duration","body":"123s"}'


def fill(b: tq_web.Backend, n: int) -> None:
    for i in range(0, n, 1000):
        b.add_multi(
            [
                tq.Task(path="/internal/tasks/x", payload=PAYLOAD)
                for _ in range(min(1000, n - i))
            ]
        )


def lease_ms(b: tq_web.Backend, rounds: int = 300) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        got = b.lease_push(10, 300)
        times.append((time.perf_counter() - t0) * 1000)
        b.complete_many(got)
    return statistics.median(times)


def measure(url: str, n: int) -> float:
    b = tq_web.connect(url)
    try:
        fill(b, n)
        return lease_ms(b, rounds=min(300, n // 20))  # never drain the queue
    finally:
        getattr(b, "drop_schema", lambda: None)()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--postgres", default=os.environ.get("TQ_WEB_BENCH_POSTGRES", ""))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("sqlite", lambda: f"sqlite:///{tmp}/s{uuid.uuid4().hex[:6]}.db")]
        if args.postgres:
            sep = "&" if "?" in args.postgres else "?"
            stores.append(
                (
                    "postgresql",
                    lambda: f"{args.postgres}{sep}schema=bs_{uuid.uuid4().hex[:8]}",
                )
            )
        for name, url in stores:
            small = measure(url(), 1000)
            big = measure(url(), args.big)
            print(
                f"{name:10} lease_push(10): {small:.3f} ms at 1,000 queued, "
                f"{big:.3f} ms at {args.big:,} queued = {big / small:.2f}x"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"max RSS of this process: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
