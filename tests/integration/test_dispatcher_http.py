"""The Go package's Dispatcher tests (reference/luci_tq.md §2.1), ported.

Each case runs over real HTTP on 127.0.0.1 against five ways of serving the
push endpoint: Starlette ``install_routes``, FastAPI (through Starlette), Flask
``install_routes``, and the raw ``asgi_app()`` / ``wsgi_app()``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty

import tq_web
from tests.conftest import http_post, serve_asgi, serve_wsgi
from tq_web import taskqueue as tq

TARGETS = ["starlette", "fastapi", "flask", "asgi", "wsgi"]
KEY = "test-secret-key"


def build_app(kind: str, d: tq_web.Dispatcher) -> tuple[str, Any]:
    if kind == "starlette":
        from starlette.applications import Starlette

        app: Any = Starlette()
        d.install_routes(app)
        return "asgi", app
    if kind == "fastapi":
        from fastapi import FastAPI

        app = FastAPI()
        d.install_routes(app)
        return "asgi", app
    if kind == "flask":
        import flask

        app = flask.Flask(__name__)
        d.install_routes(app)
        return "wsgi", app
    if kind == "asgi":
        return "asgi", d.asgi_app()
    return "wsgi", d.wsgi_app()


class Harness:
    """A dispatcher on a memory backend with a served app, and a task runner."""

    def __init__(self, d: tq_web.Dispatcher, url: str) -> None:
        self.d = d
        self.url = url

    @property
    def backend(self) -> Any:
        return self.d.backend

    def scheduled(self, queue: str = "default") -> list[tq.Task]:
        return self.backend.list_tasks(queue, "pending", 10_000)

    def run_tasks(self) -> list[int]:
        """Post every due-or-not task once, as the Go test's runTasks does."""
        statuses = []
        for queue in self.backend.queue_names():
            for t in self.scheduled(queue):
                status, _, _ = http_post(self.url + t.path, t.payload, dict(t.headers))
                statuses.append(status)
                if 200 <= status < 300:
                    self.backend.delete(t, queue)
        return statuses


@pytest.fixture(params=TARGETS)
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., Harness]]:
    stack: list[Any] = []

    def make(**kw: Any) -> Harness:
        kw.setdefault("secret_key", KEY)
        d = tq_web.Dispatcher("memory://", **kw)
        kind, app = build_app(request.param, d)
        cm = serve_asgi(app) if kind == "asgi" else serve_wsgi(app)
        url = cm.__enter__()
        stack.append(cm)
        return Harness(d, url)

    yield make
    for cm in stack:
        cm.__exit__(None, None, None)


def test_single_task_add_execute(make):
    h = make()
    got: list[tuple[Duration, tq_web.RequestHeaders]] = []

    def handler(p: Duration) -> None:
        got.append((p, tq_web.request_headers()))

    h.d.register_task(Duration, handler, "")
    before = datetime.now(UTC)
    task = tq_web.Task(
        Duration(seconds=123),
        deduplication_key="abc",
        name_prefix="prefix",
        title="abc-def",
        delay=timedelta(seconds=30),
    )
    h.d.add_task(task)
    [t] = h.scheduled()
    assert t.path == "/internal/tasks/google.protobuf.Duration/abc-def"
    assert (
        t.name
        == "prefix-afc6f8271b8598ee04e359916e6c584a9bc3c520a11dd5244e3399346ac0d3a7"
    )
    assert t.payload == b'{"type":"google.protobuf.Duration","body":"123s"}'
    assert t.method == "POST"
    assert t.headers["Content-Type"] == "application/json"
    assert (
        before + timedelta(seconds=30)
        <= t.eta
        <= datetime.now(UTC) + timedelta(seconds=30)
    )
    assert h.scheduled("another-q") == []
    h.d.add_task(task)  # re-add: silent, still one task
    assert len(h.scheduled()) == 1

    assert h.run_tasks() == [200]
    [(payload, headers)] = got
    assert payload == Duration(seconds=123)
    assert headers == tq_web.RequestHeaders()  # no task-queue headers sent


def test_single_task_deleted(make):
    h = make()
    calls: list[Any] = []
    h.d.register_task(Duration, calls.append)
    task = tq_web.Task(
        Duration(seconds=123), deduplication_key="abc", name_prefix="prefix"
    )
    h.d.add_task(task)
    h.d.delete_task(task)
    assert h.run_tasks() == []
    assert calls == []
    h.d.delete_task(task)  # deleting again is fine
    h.d.add_task(task)  # tombstone: silently not re-added
    assert h.scheduled() == []


def test_deleting_unknown_task_returns_none(make):
    h = make()
    h.d.register_task(Duration, lambda p: None)
    assert (
        h.d.delete_task(tq_web.Task(Duration(), deduplication_key="something")) is None
    )
    assert h.d.delete_task(tq_web.Task(Duration())) is None  # unnamed: no effect


def test_many_tasks(make):
    h = make()
    h.d.register_task(Duration, lambda p: None, "default")
    h.d.register_task(Empty, lambda p: None, "another-q")
    tasks = []
    for i in range(200):
        payload = Duration(seconds=i) if i % 2 == 0 else Empty()
        tasks.append(tq_web.Task(payload, deduplication_key=str(i // 2), delay=i))
    tasks.append(tq_web.Task(Duration(seconds=100), deduplication_key="50", delay=100))
    assert h.d.add_task(*tasks) is None
    for queue in ("default", "another-q"):
        etas = {t.eta for t in h.scheduled(queue)}
        assert len(h.scheduled(queue)) == 100 and len(etas) == 100
    assert h.d.delete_task(*tasks) is None
    assert h.run_tasks() == []


def test_add_task_validates_all_first(make):
    h = make()
    h.d.register_task(Duration, lambda p: None)
    with pytest.raises(tq_web.UnregisteredTaskType):
        h.d.add_task(tq_web.Task(Duration(seconds=1)), tq_web.Task(Empty()))
    with pytest.raises(ValueError):
        h.d.add_task(tq_web.Task(Duration(seconds=1)), tq_web.Task(Empty()))
    assert h.scheduled() == []
    with pytest.raises(ValueError):
        h.d.add_task(tq_web.Task(Duration(), title="has space"))
    with pytest.raises(ValueError):
        h.d.add_task(tq_web.Task(Duration(), title="x" * 101))
    for dots in (".", ".."):
        with pytest.raises(ValueError):
            h.d.add_task(tq_web.Task(Duration(), title=dots))
    assert h.scheduled() == []


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("raise_", "status", "outcome", "text"),
    [
        (None, 200, "ok", "OK\n"),
        (lambda: Boom("fatal err"), 202, "dropped", "Fatal error: fatal err\n"),
        (
            lambda: tq_web.Transient.tag(Boom("transient err")),
            500,
            "transient",
            "Transient error: transient err\n",
        ),
        (
            lambda: tq_web.Retry.tag(tq_web.Transient.tag(Boom("retry me"))),
            409,
            "retry",
            "The handler asked for retry: retry me\n",
        ),
        (
            lambda: tq_web.Retry("later"),
            409,
            "retry",
            "The handler asked for retry: later\n",
        ),
        (
            lambda: tq_web.Transient("flaky"),
            500,
            "transient",
            "Transient error: flaky\n",
        ),
    ],
    ids=[
        "ok",
        "fatal",
        "transient",
        "retry-and-transient",
        "retry-class",
        "transient-class",
    ],
)
def test_execution_errors(make, raise_, status, outcome, text):
    h = make()

    def handler(p: Duration) -> None:
        if raise_ is not None:
            raise raise_()

    h.d.register_task(Duration, handler)
    h.d.add_task(tq_web.Task(Duration(seconds=1)))
    [t] = h.scheduled()
    got_status, headers, body = http_post(h.url + t.path, t.payload, dict(t.headers))
    assert got_status == status
    assert headers["x-tq-web-outcome"] == outcome
    assert body.decode() == text


def test_tag_in_cause_chain_counts(make):
    h = make()

    def handler(p: Duration) -> None:
        try:
            raise tq_web.Transient.tag(KeyError("inner"))
        except KeyError as err:
            raise RuntimeError("outer") from err

    h.d.register_task(Duration, handler)
    h.d.add_task(tq_web.Task(Duration(seconds=1)))
    [t] = h.scheduled()
    assert http_post(h.url + t.path, t.payload, dict(t.headers))[0] == 500


def test_retry_untagged_errors_option(make):
    h = make(retry_untagged_errors=True)
    h.d.register_task(Duration, lambda p: 1 / 0)
    h.d.add_task(tq_web.Task(Duration(seconds=1)))
    [t] = h.scheduled()
    assert http_post(h.url + t.path, t.payload, dict(t.headers))[0] == 500


@pytest.mark.parametrize(
    "body",
    [
        b"not a json",
        b'{"type":"google.protobuf.Duration"}',
        b'{"type":"google.protobuf.Duration","body":null}',
        b'{"type":"google.protobuf.Duration","body":"blah"}',
        b'{"type":"unknown.proto.type","body":"{}"}',
        b'["type"]',
        b'{"type":"google.protobuf.Empty","body":{}}',  # known proto, no handler
    ],
)
def test_bad_payloads_are_dropped(make, body):
    h = make(allow_unauthenticated=True)

    def handler(p: Duration) -> None:
        raise AssertionError("must not be called")

    h.d.register_task(Duration, handler)
    status, headers, text = http_post(
        h.url + "/internal/tasks/google.protobuf.Duration", body
    )
    assert status == 202
    assert headers["x-tq-web-outcome"] == "dropped"
    assert text.startswith(b"Bad payload, can't deserialize")


def test_unknown_json_fields_are_ignored(make):
    h = make(allow_unauthenticated=True)
    from google.protobuf.struct_pb2 import Struct
    from google.protobuf.wrappers_pb2 import StringValue

    seen: list[Any] = []
    h.d.register_task(Struct, seen.append)
    h.d.register_task(StringValue, seen.append)
    body = b'{"type":"google.protobuf.Struct","body":{"a":1},"extra":true}'
    assert http_post(h.url + "/internal/tasks/x", body)[0] == 200
    assert seen[0]["a"] == 1


def test_go_producer_path_is_served(make):
    """Bodies posted by the Go package to /internal/tasks/<queue>/<title> work."""
    h = make(allow_unauthenticated=True)
    seen: list[Any] = []
    h.d.register_task(Duration, seen.append)
    body = b'{"type":"google.protobuf.Duration","body":"123s"}'
    assert (
        http_post(h.url + "/internal/tasks/default/google.protobuf.Duration", body)[0]
        == 200
    )
    assert seen == [Duration(seconds=123)]


def test_body_too_large_is_413(make):
    h = make(max_body_size=1000)
    h.d.register_task(Duration, lambda p: None)
    status, headers, _ = http_post(h.url + "/internal/tasks/x", b"x" * 5000)
    assert status == 413 and headers["x-tq-web-outcome"] == "rejected"


def test_only_post(make):
    h = make(allow_unauthenticated=True)
    h.d.register_task(Duration, lambda p: None)
    for method in ("PUT", "GET", "DELETE"):
        status, headers, _ = http_post(
            h.url + "/internal/tasks/x", b"" if method == "PUT" else None, method=method
        )
        assert status == 405
        assert headers["x-tq-web-outcome"] == "rejected"


def test_get_queues():
    d = tq_web.Dispatcher("memory://")
    assert d.get_queues() == []
    d.register_task(Duration, lambda p: None, "")
    assert d.get_queues() == ["default"]
    d2 = tq_web.Dispatcher("memory://")
    d2.register_task(Duration, lambda p: None, "default")
    d2.register_task(Empty, lambda p: None, "another")
    assert d2.get_queues() == ["another", "default"]
    d3 = tq_web.Dispatcher("memory://")
    d3.register_task(Duration, lambda p: None, "default")
    d3.register_task(Empty, lambda p: None, "default")
    assert d3.get_queues() == ["default"]


def test_register_errors():
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, lambda p: None)
    with pytest.raises(tq_web.DuplicateTaskType):
        d.register_task(Duration, lambda p: None)
    with pytest.raises(ValueError):
        d.register_task(Duration, lambda p: None)
    for bad in (object, dict, "google.protobuf.Duration", 3):
        with pytest.raises(tq_web.NotAProtoMessage):
            d.register_task(bad, lambda p: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        d.register_task(Empty, lambda p: None, "bad queue name!")


HEADERS = {
    "X-AppEngine-QueueName": "q1",
    "X-AppEngine-TaskName": "task-7",
    "X-AppEngine-TaskRetryCount": "3",
    "X-CloudTasks-TaskExecutionCount": "2",
    "X-CloudTasks-TaskETA": "1700000000.25",
    "X-CloudTasks-TaskPreviousResponse": "500",
    "X-CloudTasks-TaskRetryReason": "task handler failed",
    "X-AppEngine-FailFast": "true",
}
EXPECTED = tq_web.RequestHeaders(
    queue_name="q1",
    task_name="task-7",
    task_retry_count=3,
    task_execution_count=2,
    task_eta=datetime.fromtimestamp(1700000000.25, UTC),
    task_previous_response=500,
    task_retry_reason="task handler failed",
    fail_fast=True,
)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_request_headers_in_handlers(make, kind):
    h = make()
    got: list[tuple[tq_web.RequestHeaders, str]] = []
    if kind == "sync":

        def handler(p: Duration) -> None:
            got.append((tq_web.request_headers(), threading.current_thread().name))
    else:

        async def handler(p: Duration) -> None:  # type: ignore[misc]
            await asyncio.sleep(0)
            got.append((tq_web.request_headers(), threading.current_thread().name))

    h.d.register_task(Duration, handler)
    h.d.add_task(tq_web.Task(Duration(seconds=1)))
    [t] = h.scheduled()
    status, _, _ = http_post(h.url + t.path, t.payload, {**t.headers, **HEADERS})
    assert status == 200
    [(headers, _thread)] = got
    assert headers == EXPECTED
    with pytest.raises(tq_web.NotInTaskHandler):
        tq_web.request_headers()


def test_sync_starlette_handler_runs_in_worker_thread():
    from starlette.applications import Starlette

    d = tq_web.Dispatcher("memory://", allow_unauthenticated=True)
    threads: list[str] = []
    headers: list[tq_web.RequestHeaders] = []

    def handler(p: Duration) -> None:
        threads.append(threading.current_thread().name)
        headers.append(tq_web.request_headers())

    d.register_task(Duration, handler)
    app = Starlette()
    d.install_routes(app)
    body = b'{"type":"google.protobuf.Duration","body":"1s"}'
    with serve_asgi(app) as url:
        loop_thread_names = set()
        status, _, _ = http_post(
            url + "/internal/tasks/x", body, {"X-CloudTasks-QueueName": "qq"}
        )
        assert status == 200
        loop_thread_names.add(threads[0])
    assert threads[0] != threading.main_thread().name
    assert "asyncio" in threads[0] or "ThreadPool" in threads[0]
    assert headers[0].queue_name == "qq"
