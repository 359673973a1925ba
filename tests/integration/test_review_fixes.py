"""Regression tests for defects found in review (each failed before its fix)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

import tq_web
from tests.conftest import http_post, serve_asgi, serve_wsgi
from tq_web import taskqueue as tq
from tq_web.backends import redact_url


def test_urls_never_show_passwords():
    assert redact_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert "S3cret" not in redact_url("postgresql://u@h/db?password=S3cret&schema=x")
    assert "schema=x" in redact_url("postgresql://u@h/db?password=S3cret&schema=x")
    with pytest.raises(tq_web.InvalidBackendURL) as info:
        tq_web.connect("postgresql+psycopg://app:S3cretPW@127.0.0.1/db")
    assert "S3cretPW" not in str(info.value)


def test_cli_bad_option_value_is_one_line(tmp_path: Path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tq_web",
            "stats",
            "--backend",
            f"sqlite:///{tmp_path}/q.db?tombstone_ttl=abc",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "tombstone_ttl" in r.stderr


def test_runner_rejects_bad_queue_names():
    from tq_web.runner import Runner

    with pytest.raises(ValueError, match="invalid queue name"):
        Runner("memory://", "http://127.0.0.1:9", only_queues=["bad/name"])


def test_header_injection_refused_at_add():
    b = tq_web.connect("memory://")
    for headers in ({"X-A": "a\r\nInjected: 1"}, {"X A": "1"}, {"X-A": "\x00"}):
        with pytest.raises(ValueError):
            b.add(tq.Task(path="/x", headers=headers))


def test_paused_queue_delivers_nothing():
    from starlette.applications import Starlette

    from tq_web.runner import RunnerThread

    calls: list[Any] = []
    d = tq_web.Dispatcher(
        "memory://",
        allow_unauthenticated=True,
        queues=[tq_web.QueueConfig("paused", rate=0)],
    )
    d.register_task(Duration, calls.append, "paused")
    app = Starlette()
    d.install_routes(app)
    d.add_task(*[tq_web.Task(Duration(seconds=i)) for i in range(5)])
    with serve_asgi(app) as url:
        th = RunnerThread(d.backend, url, queues=d.queue_configs)
        th.start()
        time.sleep(1.0)
        th.stop()
    assert calls == []
    assert d.backend.queue_stats(["paused"])[0].tasks == 5
    assert all(t.retry_count == 0 for t in d.backend.list_tasks("paused"))


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_unprintable_exception_is_still_dropped_with_202():
    def handler(p: Duration) -> None:
        raise BadStr()

    d = tq_web.Dispatcher("memory://", allow_unauthenticated=True)
    d.register_task(Duration, handler)
    body = b'{"type":"google.protobuf.Duration","body":"1s"}'
    with serve_asgi(d.asgi_app()) as url:
        status, headers, text = http_post(url + "/internal/tasks/x", body)
    assert status == 202 and headers["x-tq-web-outcome"] == "dropped"
    assert b"BadStr" in text


def test_logged_paths_cannot_forge_lines(caplog: pytest.LogCaptureFixture):
    d = tq_web.Dispatcher("memory://", secret_key="k")
    d.register_task(Duration, lambda p: None)
    with (
        caplog.at_level(logging.WARNING, logger="tq_web"),
        serve_asgi(d.asgi_app()) as url,
    ):
        status, _, _ = http_post(url + "/internal/tasks/x%0ACRITICAL%20forged", b"{}")
    assert status == 403
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("\n" not in m for m in messages)
    assert any("\\nCRITICAL" in m for m in messages)


def test_fastapi_apirouter_is_refused():
    from fastapi import APIRouter

    d = tq_web.Dispatcher("memory://")
    with pytest.raises(TypeError, match="include_router"):
        d.install_routes(APIRouter())


def test_flask_app_under_script_name():
    import flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    calls: list[Any] = []
    d = tq_web.Dispatcher("memory://", secret_key="k", base_url="/api/internal/tasks/")
    d.register_task(Duration, calls.append)
    inner = flask.Flask(__name__)
    d.install_routes(inner, mount_path="/api")
    outer = DispatcherMiddleware(flask.Flask("outer"), {"/api": inner})
    d.add_task(tq_web.Task(Duration(seconds=4)))
    [t] = d.backend.list_tasks("default")
    with serve_wsgi(outer) as url:
        assert http_post(url + t.path, t.payload, dict(t.headers))[0] == 200
    assert calls == [Duration(seconds=4)]
    with pytest.raises(tq_web.ConfigurationError):
        d.install_routes(flask.Flask("x"), mount_path="/elsewhere")


def test_slow_authenticator_does_not_block_the_event_loop():
    """An authenticator that blocks (a certificate fetch) runs off the loop."""
    import asyncio

    class Slow:
        def authenticate(self, request: tq_web.PushRequest) -> str | None:
            time.sleep(0.4)
            return None

    calls: list[Any] = []
    d = tq_web.Dispatcher("memory://", secret_key="k", authenticators=[Slow()])
    d.register_task(Duration, calls.append)
    app = d.asgi_app()
    body = b'{"type":"google.protobuf.Duration","body":"1s"}'

    async def main() -> float:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        t = asyncio.create_task(ticker())
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/internal/tasks/x",
            "root_path": "",
            "headers": [],
        }
        await app(scope, receive, send)
        t.cancel()
        assert sent[0]["status"] == 200
        return ticks

    assert asyncio.run(main()) >= 20  # the loop kept ticking during the 0.4 s check
    assert calls == [Duration(seconds=1)]
