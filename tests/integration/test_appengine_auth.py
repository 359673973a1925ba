"""App Engine headers authenticate only on App Engine standard (SPEC 3).

On App Engine standard Google strips ``X-AppEngine-*`` from outside requests, so
``X-AppEngine-QueueName`` proves the push came from the app's queue. Anywhere
else (Cloud Run, a VM, a laptop) any client can send it. Pushes go over real
HTTP to Starlette (uvicorn) and Flask (werkzeug) apps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

import tq_web
from tests.conftest import http_post, serve_asgi, serve_wsgi
from tq_web.auth import SIGNATURE_HEADER, Signer
from tq_web.oidc import AppEngineAuthenticator, running_on_app_engine_standard
from tq_web.request import PushRequest

PATH = "/internal/tasks/google.protobuf.Duration"
BODY = b'{"type":"google.protobuf.Duration","body":"7s"}'
QUEUE = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "t1"}
CLOUD_TASKS = {
    "X-CloudTasks-QueueName": "default",
    "X-CloudTasks-TaskName": "t1",
    "X-CloudTasks-TaskRetryCount": "0",
    "X-CloudTasks-TaskExecutionCount": "0",
    "X-CloudTasks-TaskETA": "1700000000.5",
}
CLOUD_RUN = {
    "K_SERVICE": "my-service",
    "K_REVISION": "my-service-00001-abc",
    "K_CONFIGURATION": "my-service",
    "PORT": "8080",
}
APP_ENGINE = {
    "GAE_ENV": "standard",
    "GAE_APPLICATION": "s~my-project",
    "GAE_SERVICE": "default",
    "GAE_VERSION": "v1",
    "GAE_RUNTIME": "python312",
}


class Switch:
    """Delegates to the authenticator under test (one server per framework)."""

    def __init__(self) -> None:
        self.current = AppEngineAuthenticator(force=False)

    def authenticate(self, request: PushRequest) -> str | None:
        return self.current.authenticate(request)


class Served:
    def __init__(self, url: str, switch: Switch, calls: list[Duration]) -> None:
        self.url, self.switch, self.calls = url, switch, calls


@pytest.fixture(scope="module", params=["starlette", "flask"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A Dispatcher with a signing key and the switchable App Engine check."""
    switch = Switch()
    calls: list[Duration] = []
    d = tq_web.Dispatcher("memory://", secret_key="k", authenticators=[switch])
    d.register_task(Duration, calls.append)
    if request.param == "starlette":
        from starlette.applications import Starlette

        app: Any = Starlette()
        d.install_routes(app)
        server = serve_asgi(app)
    else:
        import flask

        app = flask.Flask(__name__)
        d.install_routes(app)
        server = serve_wsgi(app)
    with server as url:
        yield Served(url + PATH, switch, calls)


@contextmanager
def serve(
    served: Served, auth: AppEngineAuthenticator
) -> Iterator[tuple[str, list[Duration]]]:
    served.calls.clear()
    served.switch.current = auth
    yield served.url, served.calls


@pytest.mark.parametrize(
    "environ",
    [{}, CLOUD_RUN, {"GAE_ENV": "localdev"}, {**APP_ENGINE, **CLOUD_RUN}],
    ids=["plain", "cloud-run", "dev-server", "cloud-run-with-GAE_ENV"],
)
def test_queue_header_alone_is_403_off_app_engine(
    served: Served, environ: Mapping[str, str]
) -> None:
    auth = AppEngineAuthenticator(environ=environ)
    assert not auth.on_app_engine
    with serve(served, auth) as (url, calls):
        assert http_post(url, BODY, QUEUE)[0] == 403
        assert http_post(url, BODY, {**QUEUE, **CLOUD_TASKS})[0] == 403
    assert calls == []


def test_queue_header_authenticates_on_app_engine_standard(served: Served) -> None:
    auth = AppEngineAuthenticator(environ={"GAE_ENV": "standard"})
    assert auth.on_app_engine
    with serve(served, auth) as (url, calls):
        assert http_post(url, BODY, QUEUE)[0] == 200
        assert calls == [Duration(seconds=7)]
        # still required there: no header, an empty one, or only Cloud Tasks'
        assert http_post(url, BODY, {})[0] == 403
        assert http_post(url, BODY, {"X-AppEngine-QueueName": ""})[0] == 403
        assert http_post(url, BODY, {"X-AppEngine-TaskName": "t1"})[0] == 403
        assert http_post(url, BODY, CLOUD_TASKS)[0] == 403
    assert len(calls) == 1


def test_cloud_tasks_headers_never_authenticate(served: Served) -> None:
    for environ in ({}, CLOUD_RUN, APP_ENGINE):
        with serve(served, AppEngineAuthenticator(environ=environ)) as (url, calls):
            assert http_post(url, BODY, CLOUD_TASKS)[0] == 403
            assert calls == []


def test_detection_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("GAE_ENV", "K_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    assert not running_on_app_engine_standard()
    assert not AppEngineAuthenticator().on_app_engine
    monkeypatch.setenv("GAE_ENV", "standard")
    assert running_on_app_engine_standard()
    assert AppEngineAuthenticator().on_app_engine
    monkeypatch.setenv("K_SERVICE", "svc")
    assert not AppEngineAuthenticator().on_app_engine


def test_detection_rules() -> None:
    assert running_on_app_engine_standard(APP_ENGINE)
    assert running_on_app_engine_standard({"GAE_ENV": "standard"})
    for env in (
        {},
        CLOUD_RUN,
        {"GAE_ENV": "localdev"},
        {"GAE_ENV": "flex"},
        {"GAE_ENV": "Standard"},
        {"GAE_SERVICE": "default", "GAE_VERSION": "v1"},
        {**APP_ENGINE, "K_SERVICE": "svc"},
    ):
        assert not running_on_app_engine_standard(env), env


def test_force_overrides_detection() -> None:
    request = PushRequest(PATH, BODY, {"x-appengine-queuename": "default"})
    assert AppEngineAuthenticator(environ={}, force=True).authenticate(request) is None
    forced_off = AppEngineAuthenticator(environ=APP_ENGINE, force=False)
    assert forced_off.authenticate(request) is not None


def test_warns_once_off_app_engine(caplog: pytest.LogCaptureFixture) -> None:
    auth = AppEngineAuthenticator(environ=CLOUD_RUN)
    request = PushRequest(PATH, BODY, {"x-appengine-queuename": "default"})
    for _ in range(3):
        reason = auth.authenticate(request)
        assert reason is not None and "App Engine" in reason
    warnings = [
        r
        for r in caplog.records
        if r.levelname == "WARNING" and "X-AppEngine-* headers are ignored" in r.message
    ]
    assert len(warnings) == 1


def test_combined_with_signatures(served: Served) -> None:
    """Off App Engine a signed push still runs; the header adds nothing."""
    signature = Signer("k").sign(PATH, BODY)
    auth = AppEngineAuthenticator(environ=CLOUD_RUN)
    with serve(served, auth) as (url, calls):
        assert http_post(url, BODY, {**QUEUE, SIGNATURE_HEADER: signature})[0] == 200
        assert http_post(url, BODY, QUEUE)[0] == 403
        assert http_post(url, BODY, {**QUEUE, SIGNATURE_HEADER: "1.x"})[0] == 403
    assert calls == [Duration(seconds=7)]


def test_implements_the_authenticator_protocol() -> None:
    assert isinstance(AppEngineAuthenticator(environ={}), tq_web.Authenticator)
