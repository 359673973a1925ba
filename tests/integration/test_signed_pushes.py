"""Signed pushes (SPEC 3): unsigned, wrongly signed and tampered pushes get 403."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

import tq_web
from tests.conftest import http_post, serve_asgi, serve_wsgi
from tq_web.auth import SIGNATURE_HEADER, Signer


def _apps(d: tq_web.Dispatcher) -> list[tuple[str, Any]]:
    import flask
    from starlette.applications import Starlette

    s = Starlette()
    d.install_routes(s)
    f = flask.Flask(__name__)
    d.install_routes(f)
    return [("asgi", s), ("wsgi", f), ("asgi", d.asgi_app()), ("wsgi", d.wsgi_app())]


@pytest.fixture(params=range(4), ids=["starlette", "flask", "asgi", "wsgi"])
def served(request):
    calls: list[Duration] = []
    d = tq_web.Dispatcher("memory://", secret_key="k1")
    d.register_task(Duration, calls.append)
    kind, app = _apps(d)[request.param]
    with serve_asgi(app) if kind == "asgi" else serve_wsgi(app) as url:
        yield d, url, calls


def _task(d: tq_web.Dispatcher):
    d.add_task(tq_web.Task(Duration(seconds=5), title="t1"))
    [t] = d.backend.list_tasks("default")
    d.backend.purge("default")
    return t


def test_valid_signature_runs(served):
    d, url, calls = served
    t = _task(d)
    assert SIGNATURE_HEADER in t.headers
    assert http_post(url + t.path, t.payload, dict(t.headers))[0] == 200
    assert calls == [Duration(seconds=5)]


def test_unsigned_is_403(served):
    d, url, calls = served
    t = _task(d)
    headers = {k: v for k, v in t.headers.items() if k != SIGNATURE_HEADER}
    status, h, _ = http_post(url + t.path, t.payload, headers)
    assert status == 403 and h["x-tq-web-outcome"] == "rejected"
    assert calls == []


def test_wrong_key_is_403(served):
    d, url, calls = served
    t = _task(d)
    forged = Signer("not-the-key").sign(t.path, t.payload)
    assert (
        http_post(url + t.path, t.payload, {**t.headers, SIGNATURE_HEADER: forged})[0]
        == 403
    )
    assert (
        http_post(url + t.path, t.payload, {**t.headers, SIGNATURE_HEADER: "garbage"})[
            0
        ]
        == 403
    )
    assert calls == []


def test_tampered_body_or_path_is_403(served):
    d, url, calls = served
    t = _task(d)
    other = b'{"type":"google.protobuf.Duration","body":"999s"}'
    assert http_post(url + t.path, other, dict(t.headers))[0] == 403
    assert http_post(url + t.path + "x", t.payload, dict(t.headers))[0] == 403
    assert calls == []


def test_headers_cannot_replace_auth(served):
    d, url, calls = served
    t = _task(d)
    headers = {"X-AppEngine-QueueName": "default", "X-CloudTasks-QueueName": "default"}
    assert http_post(url + t.path, t.payload, headers)[0] == 403
    assert calls == []


def test_no_auth_configured_refuses_everything(caplog, monkeypatch):
    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    calls: list[Any] = []
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, calls.append)
    d.add_task(tq_web.Task(Duration(seconds=1)))
    [t] = d.backend.list_tasks("default")
    assert "X-TQ-Web-Signature" not in t.headers
    with serve_asgi(d.asgi_app()) as url:
        for _ in range(3):
            assert http_post(url + t.path, t.payload, dict(t.headers))[0] == 403
    assert calls == []
    warnings = [
        r for r in caplog.records if "no authentication is configured" in r.getMessage()
    ]
    assert len(warnings) == 1


def test_allow_unauthenticated_accepts_all():
    calls: list[Any] = []
    d = tq_web.Dispatcher("memory://", secret_key="k", allow_unauthenticated=True)
    d.register_task(Duration, calls.append)
    with serve_asgi(d.asgi_app()) as url:
        body = b'{"type":"google.protobuf.Duration","body":"1s"}'
        assert http_post(url + "/internal/tasks/x", body)[0] == 200
    assert calls == [Duration(seconds=1)]


def test_key_from_environment(monkeypatch):
    monkeypatch.setenv("TQ_WEB_SECRET_KEY", "old-key,new-key")
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, lambda p: None)
    d.add_task(tq_web.Task(Duration(seconds=1)))
    [t] = d.backend.list_tasks("default")
    sig = t.headers[SIGNATURE_HEADER]
    assert Signer("new-key").verify(t.path, t.payload, sig) is None  # newest signs
    assert Signer("old-key").verify(t.path, t.payload, sig) == "bad signature"
    # rotation: a task signed with the old key still verifies
    old_sig = Signer("old-key").sign(t.path, t.payload)
    assert Signer(["old-key", "new-key"]).verify(t.path, t.payload, old_sig) is None


def test_signature_max_age():
    s = Signer("k", max_age=1)
    sig = s.sign("/p", b"b")
    assert s.verify("/p", b"b", sig) is None
    import time

    time.sleep(2.1)
    assert s.verify("/p", b"b", sig) == "expired signature"


def test_signer_repr_hides_key():
    assert "k-secret" not in repr(Signer("k-secret"))


def test_signature_covers_root_path():
    """Mounted under a prefix, the verifier uses the full path."""
    from starlette.applications import Starlette
    from starlette.routing import Mount, Router

    calls: list[Any] = []
    d = tq_web.Dispatcher("memory://", secret_key="k", base_url="/api/internal/tasks/")
    d.register_task(Duration, calls.append)
    inner = Router()
    d.install_routes(inner)
    app = Starlette(routes=[Mount("/api", app=inner)])
    d.add_task(tq_web.Task(Duration(seconds=2)))
    [t] = d.backend.list_tasks("default")
    assert t.path.startswith("/api/internal/tasks/")
    with serve_asgi(app) as url:
        assert http_post(url + t.path, t.payload, dict(t.headers))[0] == 200
    assert calls == [Duration(seconds=2)]


def test_flask_blueprint_with_prefix():
    import flask

    calls: list[Any] = []
    d = tq_web.Dispatcher("memory://", secret_key="k", base_url="/api/internal/tasks/")
    d.register_task(Duration, calls.append)
    bp = flask.Blueprint("tasks", __name__)
    d.install_routes(bp)
    app = flask.Flask(__name__)
    app.register_blueprint(bp, url_prefix="/api")
    d.add_task(tq_web.Task(Duration(seconds=3)))
    [t] = d.backend.list_tasks("default")
    with serve_wsgi(app) as url:
        assert http_post(url + t.path, t.payload, dict(t.headers))[0] == 200
    assert calls == [Duration(seconds=3)]
    bad = flask.Blueprint("bad", __name__)
    d.install_routes(bad)
    with pytest.raises(tq_web.ConfigurationError):
        flask.Flask(__name__).register_blueprint(bad, url_prefix="/elsewhere")


def test_fast_verifier_agrees_with_itsdangerous():
    """The verifier re-implements itsdangerous' check; both must agree."""
    import random

    rng = random.Random(3)
    s = Signer(["old", "new"])
    old = Signer("old")
    path, body = "/internal/tasks/google.protobuf.Duration/t", b'{"type":"x","body":1}'
    good = [s.sign(path, body), old.sign(path, body)]
    # our signer writes exactly what itsdangerous writes (same second)
    value = (
        b"POST\n" + path.encode() + b"\n" + hashlib.sha256(body).hexdigest().encode()
    )
    for _ in range(5):
        ours = s.sign(path, body)
        theirs = s._signer.sign(value)[len(value) + 1 :].decode()
        if ours.split(".")[0] == theirs.split(".")[0]:
            break
    assert ours == theirs
    for sig in good:
        assert s.verify(path, body, sig) is None
        assert s.verify_with_itsdangerous(path, body, sig)
    for _ in range(300):
        sig = list(rng.choice(good))
        i = rng.randrange(len(sig))
        sig[i] = rng.choice("ABCabc012.-_=!")
        forged = "".join(sig)
        assert (s.verify(path, body, forged) is None) == s.verify_with_itsdangerous(
            path, body, forged
        ), forged
    assert Signer("other").verify(path, body, good[0]) == "bad signature"
    assert not Signer("other").verify_with_itsdangerous(path, body, good[0])
