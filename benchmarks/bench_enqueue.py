"""Enqueue rates on SQLite, side by side with the raw store (run by hand).

    python benchmarks/bench_enqueue.py [--n 5000] [--batch-n 100000]

Prints one table; docs/performance.md records the results and this command.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time

from google.protobuf.duration_pb2 import Duration

import tq_web
from tq_web import taskqueue as tq


def raw_single(path: str, n: int) -> float:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, queue TEXT, name TEXT, payload BLOB,"
        " state INT, due_at INT, lease_until INT, attempts INT)"
    )
    con.execute("CREATE INDEX t_due ON t(state, due_at)")
    payload = b"x" * 160
    t0 = time.perf_counter()
    for i in range(n):
        con.execute("BEGIN IMMEDIATE")
        con.execute(
            "INSERT INTO t (queue, name, payload, state, due_at, attempts) "
            "VALUES (?,?,?,0,?,0)",
            ("default", f"n{i}", payload, i),
        )
        con.execute("COMMIT")
    dt = time.perf_counter() - t0
    con.close()
    return n / dt


def raw_pg_single(url: str, n: int) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        con.execute("DROP TABLE IF EXISTS tq_bench_raw")
        con.execute(
            "CREATE TABLE tq_bench_raw (id bigserial PRIMARY KEY, queue text,"
            " name text, payload bytea, state int, due_at timestamptz,"
            " lease_until timestamptz, attempts int)"
        )
        con.execute("CREATE INDEX ON tq_bench_raw (due_at) WHERE state = 0")
        payload = b"x" * 160
        t0 = time.perf_counter()
        for i in range(n):
            con.execute(
                "INSERT INTO tq_bench_raw"
                " (queue, name, payload, state, due_at, attempts)"
                " VALUES (%s, %s, %s, 0, now(), 0)",
                ("default", f"n{i}", payload),
            )
        dt = time.perf_counter() - t0
        con.execute("DROP TABLE tq_bench_raw")
    return n / dt


def tq_single(url: str, n: int) -> float:
    b = tq_web.connect(url)
    payload = b'{"type":"google.protobuf.Duration","body":"123s"}' + b" " * 110
    t0 = time.perf_counter()
    for _ in range(n):
        b.add(tq.Task(path="/internal/tasks/x", payload=payload))
    dt = time.perf_counter() - t0
    getattr(b, "drop_schema", lambda: None)()  # PostgreSQL: leave nothing behind
    b.close()
    return n / dt


def tq_multi(url: str, n: int) -> float:
    b = tq_web.connect(url)
    payload = b'{"type":"google.protobuf.Duration","body":"123s"}' + b" " * 110
    batches = [
        [tq.Task(path="/internal/tasks/x", payload=payload) for _ in range(1000)]
        for _ in range(n // 1000)
    ]
    t0 = time.perf_counter()
    for batch in batches:
        b.add_multi(batch)
    dt = time.perf_counter() - t0
    getattr(b, "drop_schema", lambda: None)()  # PostgreSQL: leave nothing behind
    b.close()
    return n / dt


def dispatcher_batched(url: str, n: int) -> float:
    d = tq_web.Dispatcher(url, secret_key="bench")
    d.register_task(Duration, lambda p: None)
    tasks = [tq_web.Task(Duration(seconds=i)) for i in range(1000)]
    t0 = time.perf_counter()
    for _ in range(n // 1000):
        d.add_task(*tasks)
    dt = time.perf_counter() - t0
    getattr(d.backend, "drop_schema", lambda: None)()
    d.close()
    return n / dt


def median(f, runs: int) -> tuple[float, float, float]:
    vals = [f() for _ in range(runs)]
    return statistics.median(vals), min(vals), max(vals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch-n", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--postgres", default=os.environ.get("TQ_WEB_BENCH_POSTGRES", ""))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def fresh(prefix: str = "sqlite:///") -> str:
            return f"{prefix}{tmp}/b{next(counter)}.db"

        rows = []
        raw = median(
            lambda: raw_single(f"{tmp}/raw{next(counter)}.db", args.n), args.runs
        )
        rows.append(("raw sqlite INSERT, 1 row/txn", raw, None))
        single = median(lambda: tq_single(fresh(), args.n), args.runs)
        rows.append(("tq_web sqlite backend.add()", single, single[0] / raw[0]))
        multi = median(lambda: tq_multi(fresh(), args.batch_n), args.runs)
        rows.append(("tq_web sqlite add_multi(1000)", multi, None))
        disp = median(lambda: dispatcher_batched(fresh(), args.batch_n), args.runs)
        rows.append(("Dispatcher.add_task(*1000 tasks), signed", disp, None))
        if args.postgres:
            import uuid

            def pg() -> str:
                sep = "&" if "?" in args.postgres else "?"
                return f"{args.postgres}{sep}schema=bench_{uuid.uuid4().hex[:8]}"

            raw_pg = median(
                lambda: raw_pg_single(args.postgres, args.n // 4), args.runs
            )
            rows.append(("raw postgres INSERT, 1 row/txn", raw_pg, None))
            pg_single = median(lambda: tq_single(pg(), args.n // 4), args.runs)
            rows.append(
                ("tq_web postgres backend.add()", pg_single, pg_single[0] / raw_pg[0])
            )
            rows.append(
                (
                    "tq_web postgres add_multi(1000)",
                    median(lambda: tq_multi(pg(), args.batch_n // 2), args.runs),
                    None,
                )
            )
            rows.append(
                (
                    "Dispatcher.add_task(*1000), postgres",
                    median(
                        lambda: dispatcher_batched(pg(), args.batch_n // 2), args.runs
                    ),
                    None,
                )
            )
    print(f"{'benchmark':45} {'tasks/s (median [min-max])':32} ratio")
    for name, (med, lo, hi), ratio in rows:
        r = f"{ratio:.2f}x raw" if ratio else ""
        print(f"{name:45} {med:10,.0f} [{lo:,.0f}-{hi:,.0f}]{'':6} {r}")


if __name__ == "__main__":
    main()
