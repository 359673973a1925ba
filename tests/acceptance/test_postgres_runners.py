"""Several ``tq-web run`` processes on one PostgreSQL queue (a real server).

Skips without a server unless ``TQ_WEB_REQUIRE_POSTGRES=1`` (CI), which fails
instead. The restart test restarts the local server with ``pg_ctlcluster`` and
runs only when ``TQ_WEB_TEST_PG_RESTART=1`` (CI sets it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.wrappers_pb2 import Int64Value

import tq_web
from tests.conftest import serve_asgi
from tests.contract.conftest import postgres_url, require_postgres

KEY = "pg-acceptance-key"


def runner(url: str, target: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tq_web",
            "run",
            "--backend",
            url,
            "--target",
            target,
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Recorder:
    """Handler that records each handling interval, to check for overlaps."""

    def __init__(self, hold: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.intervals: dict[int, list[tuple[float, float]]] = {}
        self.active: set[int] = set()
        self.overlaps: list[int] = []
        self.hold = hold

    def __call__(self, p: Int64Value) -> None:
        start = time.monotonic()
        with self.lock:
            if p.value in self.active:
                self.overlaps.append(p.value)
            self.active.add(p.value)
        if self.hold:
            time.sleep(self.hold)
        with self.lock:
            self.active.discard(p.value)
            self.intervals.setdefault(p.value, []).append((start, time.monotonic()))


@pytest.fixture
def pg_url() -> Iterator[str]:
    require_postgres()
    schema = "tq_acc_" + uuid.uuid4().hex[:10]
    base = postgres_url()
    url = f"{base}{'&' if '?' in base else '?'}schema={schema}"
    yield url
    b = tq_web.connect(url)
    b.drop_schema()  # type: ignore[attr-defined]
    b.close()


def make_app(url: str, rec: Recorder, queue: str) -> tuple[tq_web.Dispatcher, Any]:
    from starlette.applications import Starlette

    d = tq_web.Dispatcher(url, secret_key=KEY)
    d.register_task(Int64Value, rec, queue)
    app = Starlette()
    d.install_routes(app)
    return d, app


def add_many(d: tq_web.Dispatcher, n: int) -> None:
    for i in range(0, n, 1000):
        d.add_task(
            *[tq_web.Task(Int64Value(value=j)) for j in range(i, min(n, i + 1000))]
        )


def wait_drained(
    d: tq_web.Dispatcher, queue: str, rec: Recorder, n: int, limit: float
) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if len(rec.intervals) >= n and d.backend.queue_stats([queue])[0].tasks == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"not drained: {len(rec.intervals)} of {n} handled")


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.communicate(timeout=60)


def test_four_runners_share_one_queue(pg_url: str) -> None:
    n = 2000
    rec = Recorder()
    d, app = make_app(pg_url, rec, "shared")
    add_many(d, n)
    with serve_asgi(app) as target:
        procs = [runner(pg_url, target, "--lease-seconds", "30") for _ in range(4)]
        try:
            wait_drained(d, "shared", rec, n, 180)
        finally:
            stop_all(procs)
    assert set(rec.intervals) == set(range(n))
    assert rec.overlaps == []  # never handled by two runners at once
    assert all(len(v) == 1 for v in rec.intervals.values())  # within a lease: once
    d.close()


def test_killed_runner_tasks_come_back(pg_url: str) -> None:
    n = 400
    rec = Recorder(hold=0.02)
    d, app = make_app(pg_url, rec, "crashy")
    add_many(d, n)
    with serve_asgi(app) as target:
        victim = runner(pg_url, target, "--lease-seconds", "2")
        time.sleep(1.0)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=10)
        survivors = [runner(pg_url, target, "--lease-seconds", "2") for _ in range(2)]
        try:
            wait_drained(d, "crashy", rec, n, 180)
        finally:
            stop_all(survivors)
    assert set(rec.intervals) == set(range(n))
    assert rec.overlaps == []
    d.close()


def test_transactional_add_rollback_never_delivered(pg_url: str) -> None:
    import psycopg

    rec = Recorder()
    d, app = make_app(pg_url, rec, "txn")
    with psycopg.connect(postgres_url()) as conn:
        with conn.transaction():  # commits
            d.add_task(tq_web.Task(Int64Value(value=1)), conn=conn)
            d.add_task(
                tq_web.Task(Int64Value(value=2), deduplication_key="two"), conn=conn
            )
        with pytest.raises(ZeroDivisionError), conn.transaction():  # rolls back
            d.add_task(tq_web.Task(Int64Value(value=3)), conn=conn)
            raise ZeroDivisionError
    with serve_asgi(app) as target:
        proc = runner(pg_url, target, "--drain")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert set(rec.intervals) == {1, 2}  # 3 rolled back: never delivered
    d.close()


@pytest.mark.skipif(
    os.environ.get("TQ_WEB_TEST_PG_RESTART") != "1",
    reason="restarts the local server; set TQ_WEB_TEST_PG_RESTART=1",
)
def test_postgres_restart_mid_drain(pg_url: str) -> None:
    assert shutil.which("pg_ctlcluster"), (
        "pg_ctlcluster is needed to restart the server"
    )
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    n = 1500
    rec = Recorder(hold=0.002)
    d, app = make_app(pg_url, rec, "restart")
    add_many(d, n)
    with serve_asgi(app) as target:
        procs = [runner(pg_url, target, "--lease-seconds", "5") for _ in range(2)]
        try:
            deadline = time.monotonic() + 60
            while len(rec.intervals) < n // 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(
                [
                    "pg_ctlcluster",
                    "--skip-systemctl-redirect",
                    version,
                    "main",
                    "restart",
                    "-m",
                    "fast",
                ],
                check=True,
                timeout=120,
            )
            wait_drained(d, "restart", rec, n, 240)
        finally:
            stop_all(procs)
    assert set(rec.intervals) == set(range(n))
    d.close()


def test_cli_migrate_and_stats_on_postgres(pg_url: str) -> None:
    url = pg_url.replace("postgres@", "postgres:not-a-secret@", 1)
    for args in (["migrate"], ["stats"]):
        r = subprocess.run(
            [sys.executable, "-m", "tq_web", *args, "--backend", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert "not-a-secret" not in r.stdout + r.stderr
    assert (
        "schema is up to date"
        in subprocess.run(
            [sys.executable, "-m", "tq_web", "migrate", "--backend", pg_url],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
