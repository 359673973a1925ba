"""End to end: a real uvicorn app, a real ``tq-web run`` process, a SQLite file.

Bounded in count and time; everything on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.wrappers_pb2 import Int64Value

import tq_web
from tests.conftest import serve_asgi


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tq_web", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_runner(backend: str, target: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tq_web",
            "run",
            "--backend",
            backend,
            "--target",
            target,
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class App:
    def __init__(self, db: Path) -> None:
        from starlette.applications import Starlette

        self.url_backend = f"sqlite:///{db}"
        self.d = tq_web.Dispatcher(self.url_backend)
        self.seen: list[tuple[Any, tq_web.RequestHeaders, float]] = []
        self.lock = threading.Lock()
        self.app = Starlette()
        self.d.install_routes(self.app)

    def record(self, payload: Any) -> None:
        with self.lock:
            self.seen.append((payload, tq_web.request_headers(), time.monotonic()))


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    a = App(tmp_path / "queue.db")
    yield a
    a.d.close()


def test_hundreds_of_tasks_delivered_with_headers(app: App) -> None:
    app.d.register_task(Int64Value, app.record, "work")
    before = datetime.now(UTC)
    app.d.add_task(
        *[
            tq_web.Task(Int64Value(value=i), deduplication_key=str(i), title=f"n{i}")
            for i in range(300)
        ]
    )
    with serve_asgi(app.app) as url:
        proc = start_runner(app.url_backend, url, "--drain")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert "300 delivered" in out
    values = sorted(p.value for p, _, _ in app.seen)
    assert values == list(range(300))
    names = {
        t.name
        for t in [
            tq_web.Task(Int64Value(value=i), deduplication_key=str(i))
            for i in range(300)
        ]
    }
    for _payload, h, _ in app.seen:
        assert h.queue_name == "work"
        assert h.task_name in names
        assert h.task_retry_count == 0 and h.task_execution_count == 0
        assert (
            h.task_eta is not None and abs((h.task_eta - before).total_seconds()) < 60
        )
    stats = cli("stats", "--backend", app.url_backend)
    assert stats.returncode == 0 and "work" in stats.stdout


def test_retries_follow_backoff_and_stop_at_limit(app: App) -> None:
    attempts: dict[int, list[float]] = {}
    headers: dict[int, list[tq_web.RequestHeaders]] = {}

    def flaky(p: Int64Value) -> None:
        attempts.setdefault(p.value, []).append(time.monotonic())
        headers.setdefault(p.value, []).append(tq_web.request_headers())
        if p.value == 1 and len(attempts[1]) < 4:
            raise tq_web.Transient("not yet")  # 500 three times, then 200
        if p.value == 2:
            raise tq_web.Retry("never")  # 409 until the limit

    opts = tq_web.RetryOptions(min_backoff=0.3, max_backoff=10, max_doublings=4)
    app.d.register_task(Int64Value, flaky, "retry", opts)
    app.d.add_task(tq_web.Task(Int64Value(value=1)))
    app.d.add_task(
        tq_web.Task(
            Int64Value(value=2), retry_options=tq_web.RetryOptions(retry_limit=2)
        )
    )
    with serve_asgi(app.app) as url:
        proc = start_runner(app.url_backend, url, "--drain")
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    t1 = attempts[1]
    gaps = [b - a for a, b in itertools.pairwise(t1)]
    assert len(t1) == 4
    for gap, want in zip(gaps, [0.3, 0.6, 1.2], strict=True):
        assert want - 0.05 <= gap <= want + 0.5, (gaps, want)
    assert [h.task_retry_count for h in headers[1]] == [0, 1, 2, 3]
    assert [h.task_previous_response for h in headers[1]] == [0, 500, 500, 500]
    assert headers[1][1].task_retry_reason == "task handler failed"
    assert len(attempts[2]) == 3  # retry_limit=2: first attempt + 2 retries
    assert [h.task_previous_response for h in headers[2]] == [0, 409, 409]
    assert [h.task_execution_count for h in headers[2]] == [0, 1, 2]

    failed = cli("failed", "--backend", app.url_backend)
    assert failed.returncode == 0
    assert "409" in failed.stdout and "retry" in failed.stdout
    again = cli("retry", "--backend", app.url_backend, "--all")
    assert again.returncode == 0 and "requeued 1" in again.stdout
    tasks = cli("tasks", "--backend", app.url_backend, "--queue", "retry")
    assert tasks.returncode == 0 and "pending" in tasks.stdout


def test_dropped_task_is_kept_as_failed(app: App) -> None:
    def boom(p: Duration) -> None:
        raise RuntimeError("bad data")

    app.d.register_task(Duration, boom, "drops")
    app.d.add_task(tq_web.Task(Duration(seconds=1)))
    with serve_asgi(app.app) as url:
        proc = start_runner(app.url_backend, url, "--drain")
        proc.communicate(timeout=60)
    [t] = app.d.backend.list_tasks("drops", "failed")
    assert t.last_status == 202 and "bad data" in t.last_response


def test_kill_9_loses_nothing(app: App) -> None:
    n = 1500
    app.d.register_task(Int64Value, app.record, "crash")
    app.d.add_task(*[tq_web.Task(Int64Value(value=i)) for i in range(n)])
    rng = random.Random(7)
    with serve_asgi(app.app) as url:
        for _ in range(3):
            proc = start_runner(app.url_backend, url, "--lease-seconds", "1")
            time.sleep(rng.uniform(0.3, 1.2))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        proc = start_runner(app.url_backend, url, "--lease-seconds", "1", "--drain")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    handled = {p.value for p, _, _ in app.seen}
    assert handled == set(range(n)), f"lost {n - len(handled)} tasks"
    assert app.d.backend.queue_stats(["crash"])[0].tasks == 0


def test_sigterm_finishes_in_flight(app: App) -> None:
    started = threading.Event()

    def slow(p: Duration) -> None:
        started.set()
        time.sleep(1.0)
        app.record(p)

    app.d.register_task(Duration, slow, "slow")
    app.d.add_task(tq_web.Task(Duration(seconds=5)))
    with serve_asgi(app.app) as url:
        proc = start_runner(app.url_backend, url)
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert len(app.seen) == 1
    assert "1 delivered" in out
    assert app.d.backend.queue_stats(["slow"])[0].tasks == 0


def test_in_process_runner_lifespan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.applications import Starlette

    from tests.conftest import free_port
    from tq_web.starlette import runner_lifespan

    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    port = free_port()
    d = tq_web.Dispatcher(f"sqlite:///{tmp_path}/inproc.db")
    got: list[Duration] = []
    d.register_task(Duration, got.append)
    app = Starlette(lifespan=runner_lifespan(d, f"http://127.0.0.1:{port}"))
    d.install_routes(app)
    import asyncio
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True
    )
    th.start()
    try:
        d.add_task(*[tq_web.Task(Duration(seconds=i)) for i in range(20)])
        deadline = time.monotonic() + 20
        while len(got) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.should_exit = True
        th.join(20)
    assert sorted(g.seconds for g in got) == list(range(20))


def test_cli_user_errors(tmp_path: Path) -> None:
    r = cli("tasks", "--backend", "bogus://x")
    assert (
        r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    )
    r = cli("tasks", "--backend", f"sqlite:///{tmp_path}/e.db", "--queue", "nope")
    assert r.returncode == 1 and "does not exist" in r.stderr
    bad = tmp_path / "queue.yaml"
    bad.write_text("queue:\n- name: q\n  rate: fast\n")
    r = cli(
        "run",
        "--backend",
        f"sqlite:///{tmp_path}/e.db",
        "--target",
        "http://127.0.0.1:9",
        "--queue-yaml",
        str(bad),
    )
    assert r.returncode == 1 and "bad rate" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "--backend", f"sqlite:///{tmp_path}/e.db")
    assert r.returncode == 2 and "no target" in r.stderr
    r = cli("purge", "--backend", f"sqlite:///{tmp_path}/e.db")
    assert r.returncode == 2
    for sub in ("run", "stats", "tasks", "failed", "retry", "purge", "migrate"):
        r = cli(sub, "--help")
        assert r.returncode == 0 and "--backend" in r.stdout


def test_queue_yaml_rate_bucket_and_concurrency(app: App, tmp_path: Path) -> None:
    """rate 5/s with bucket 1 spaces starts ~0.2 s apart; max 2 requests at once."""
    active = 0
    peak = 0
    starts: list[float] = []
    lock = threading.Lock()

    def handler(p: Int64Value) -> None:
        nonlocal active, peak
        with lock:
            starts.append(time.monotonic())
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1

    def slow(p: Duration) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak_slow.append(active)
        time.sleep(0.3)
        with lock:
            active -= 1

    peak_slow: list[int] = []
    app.d.register_task(Int64Value, handler, "limited")
    app.d.register_task(Duration, slow, "narrow")
    qy = tmp_path / "queue.yaml"
    qy.write_text(
        "queue:\n"
        "- name: limited\n  rate: 5/s\n  bucket_size: 1\n"
        "- name: narrow\n  rate: 100/s\n  max_concurrent_requests: 2\n"
    )
    app.d.add_task(*[tq_web.Task(Int64Value(value=i)) for i in range(8)])
    with serve_asgi(app.app) as url:
        proc = start_runner(
            app.url_backend,
            url,
            "--drain",
            "--queue-yaml",
            str(qy),
            "--queue",
            "limited",
        )
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        gaps = [b - a for a, b in itertools.pairwise(sorted(starts))]
        assert len(starts) == 8
        assert min(gaps) >= 0.15, gaps  # 5/s: one start per 0.2 s
        assert sum(gaps) >= 7 * 0.18
        app.d.add_task(*[tq_web.Task(Duration(seconds=i)) for i in range(6)])
        proc = start_runner(
            app.url_backend,
            url,
            "--drain",
            "--queue-yaml",
            str(qy),
            "--queue",
            "narrow",
        )
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert len(peak_slow) == 6 and max(peak_slow) == 2


def test_dispatch_deadline_retries(app: App) -> None:
    attempts: list[tq_web.RequestHeaders] = []

    def hang(p: Duration) -> None:
        attempts.append(tq_web.request_headers())
        if len(attempts) == 1:
            time.sleep(2.5)  # longer than the 1 s deadline

    app.d.register_task(
        Duration,
        hang,
        "deadline",
        tq_web.RetryOptions(min_backoff=0.1, max_backoff=0.2),
    )
    app.d.add_task(tq_web.Task(Duration(seconds=1)))
    with serve_asgi(app.app) as url:
        proc = start_runner(app.url_backend, url, "--drain", "--dispatch-deadline", "1")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert len(attempts) == 2
    assert attempts[1].task_retry_count == 1
    assert attempts[1].task_previous_response == 0  # no response: cut at the deadline
    assert attempts[1].task_retry_reason == "request failed or timed out"
    assert attempts[1].task_execution_count == 0
