"""Property-based fuzzing of the push endpoint (SPEC 3, "hostile input").

Hypothesis posts arbitrary bodies (bytes, JSON-ish envelopes, deep nesting,
huge numbers, bad UTF-8, oversize), paths, methods and headers (garbage
signatures, forged bearer tokens, ``X-AppEngine-*``/``X-CloudTasks-*``, content
types) to a Starlette app (Starlette's TestClient) and a Flask app (Flask's test
client), and a smaller run over real HTTP. Properties:

- without a valid signature: 403 (405 for other methods, 413 when too large);
  never 200, never 5xx, and the handler is never called;
- with a valid signature over any body: 200 exactly when the body decodes,
  else 202 (dropped); never 5xx;
- no input crashes the server; nothing secret reaches the logs.

Runs are deterministic (``derandomize=True``); ``TQ_WEB_FUZZ_EXAMPLES`` raises
the example count for a longer local run.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt, jwt
from google.protobuf import any_pb2, duration_pb2, empty_pb2, struct_pb2, wrappers_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tq_web
from tests.conftest import http_post, serve_asgi, serve_wsgi
from tq_web.auth import SIGNATURE_HEADER, Signer
from tq_web.codec import DecodeError, decode
from tq_web.oidc import AppEngineAuthenticator, OIDCAuthenticator

pytestmark = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)

EXAMPLES = int(os.environ.get("TQ_WEB_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEY = "fuzz-secret-key-5f0c2a9d7e"
BASE = "/internal/tasks/"
LIMIT = 256 * 1024
AUDIENCE = "https://fuzz.example.com"
ACCOUNT = "tasks@fuzz.iam.gserviceaccount.com"
CLOUD_RUN = {"K_SERVICE": "fuzz", "K_REVISION": "fuzz-00001"}
TYPES = [
    "google.protobuf.Duration",
    "google.protobuf.Empty",
    "google.protobuf.StringValue",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Any",
]
PROTOS: list[Any] = [
    duration_pb2.Duration,
    empty_pb2.Empty,
    wrappers_pb2.StringValue,
    struct_pb2.Struct,
    struct_pb2.Value,
    struct_pb2.ListValue,
    any_pb2.Any,
]

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = (
    _KEY.public_key()
    .public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    .decode()
)
_SIGNER = crypt.RSASigner.from_string(
    _KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ),
    key_id="k1",
)


def id_token(**claims: Any) -> str:
    """A token really signed by the key the authenticator trusts."""
    now = int(time.time())
    payload = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": ACCOUNT,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    return jwt.encode(_SIGNER, payload).decode("ascii")


@dataclass
class Target:
    """A dispatcher with every authenticator, its handler calls, and clients."""

    dispatcher: tq_web.Dispatcher
    calls: list[Any] = field(default_factory=list)

    def lookup(self, type_name: str) -> Any:
        reg = self.dispatcher.registration(type_name)
        return None if reg is None else reg.prototype


def make_target(**options: Any) -> Target:
    options.setdefault("secret_key", KEY)
    d = tq_web.Dispatcher(
        "memory://",
        max_body_size=LIMIT,
        authenticators=[
            AppEngineAuthenticator(environ=CLOUD_RUN),  # as on Cloud Run: ignored
            OIDCAuthenticator(
                audience=AUDIENCE,
                service_accounts=[ACCOUNT],
                certs={"k1": PUBLIC_PEM},
            ),
        ],
        **options,
    )
    target = Target(d)
    for proto in PROTOS:
        d.register_task(proto, target.calls.append)
    return target


Post = Callable[[str, str, bytes, dict[str, str]], tuple[int, dict[str, str]]]


def starlette_client(target: Target) -> Post:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    app = Starlette()
    target.dispatcher.install_routes(app)
    client = TestClient(app, raise_server_exceptions=True)

    def post(
        method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        r = client.request(method, path, content=body, headers=headers)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}

    return post


def flask_client(target: Target) -> Post:
    import flask

    app = flask.Flask(__name__)
    app.testing = True  # exceptions propagate instead of becoming 500s
    target.dispatcher.install_routes(app)
    client = app.test_client()

    def post(
        method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        r = client.open(path, method=method, data=body, headers=headers)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}

    return post


TARGET = make_target()
CLIENTS: dict[str, Post] = {
    "starlette": starlette_client(TARGET),
    "flask": flask_client(TARGET),
}


@pytest.fixture(autouse=True)
def _quiet_tq_web_logs() -> Iterator[None]:
    """Thousands of rejected pushes log warnings; keep test output readable."""
    logger = logging.getLogger("tq_web")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- strategies -----------------------------------------------------------

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
type_names = (
    st.sampled_from(TYPES)
    | st.text(max_size=40)
    | st.sampled_from(
        [
            "",
            "google.protobuf.Timestamp",  # a real type, not registered
            "google.protobuf.Duration ",
            "Google.Protobuf.Duration",
            "x" * 1000,
            "google.protobuf.Duration\x00",
        ]
    )
)
# Bodies the registered types accept or nearly accept.
typed_bodies = st.sampled_from(
    [
        "5s",
        "-1.5s",
        "315576000001s",
        "1e9s",
        "abc",
        {},
        {"seconds": 3},
        {"a": [1, {"b": None}]},
        [1, "a", None],
        {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "1s"},
        {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {"a": 1}},
        {"@type": "type.googleapis.com/nope.Nope", "value": 1},
        {"@type": 5},
        {"@type": "type.googleapis.com/google.protobuf.Any", "value": {"@type": 1}},
    ]
)
envelopes = (
    st.builds(
        lambda t, b, extra: {**extra, "type": t, "body": b},
        type_names,
        typed_bodies | json_values,
        st.dictionaries(st.text(max_size=6), json_values, max_size=2),
    )
    | st.dictionaries(st.sampled_from(["type", "body", "extra"]), json_values)
    | json_values
)


def _encode_envelope(value: Any, encoding: str, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode(encoding, "surrogatepass")


envelope_bytes = st.builds(
    _encode_envelope,
    envelopes,
    st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32"]),
    st.booleans(),
)


def _deep(kind: str, depth: int) -> bytes:
    if kind == "open":
        return b"[" * depth
    if kind == "closed":
        return b"[" * depth + b"]" * depth
    if kind == "struct":
        inner = b'{"a":' * depth + b"1" + b"}" * depth
        return b'{"type":"google.protobuf.Struct","body":' + inner + b"}"
    if kind == "value":
        inner = b"[" * depth + b"]" * depth
        return b'{"type":"google.protobuf.Value","body":' + inner + b"}"
    inner = b'{"@type":"type.googleapis.com/google.protobuf.Any","value":' * depth
    return b'{"type":"google.protobuf.Any","body":' + inner + b"{}" + b"}" * (depth + 1)


deep_bodies = st.builds(
    _deep,
    st.sampled_from(["open", "closed", "struct", "value", "any"]),
    st.integers(1, 5000) | st.sampled_from([100_000, 990, 1000, 3000, 20]),
)
huge_numbers = st.builds(
    lambda t, n: f'{{"type":"{t}","body":{n}}}'.encode(),
    st.sampled_from(TYPES),
    st.text("0123456789", min_size=1, max_size=6000)
    | st.sampled_from(
        ["1e999999", "-1e400", "1" + "0" * 5000 + ".5", "NaN", "-Infinity"]
    ),
)
bad_utf8 = st.builds(
    lambda prefix, junk, suffix: prefix + junk + suffix,
    st.sampled_from(
        [b'{"type":"google.protobuf.StringValue","body":"', b'{"type":"', b""]
    ),
    st.sampled_from(
        [
            b"\xff",
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
            b"\x80",
            b"\xfe\xff",
        ]
    )
    | st.binary(min_size=1, max_size=16),
    st.sampled_from([b'"}', b'","body":"x"}', b""]),
)
oversize = st.integers(1, 4096).map(lambda extra: b"x" * (LIMIT + extra))
small_bodies = st.one_of(
    st.binary(max_size=512),
    envelope_bytes,
    deep_bodies.filter(lambda b: len(b) <= LIMIT),
    huge_numbers,
    bad_utf8,
)
bodies = small_bodies | oversize

paths = st.from_regex(
    r"\A[A-Za-z0-9_~-][A-Za-z0-9_.~-]{0,40}(/[A-Za-z0-9_~-][A-Za-z0-9_.~-]{0,30})?\Z"
).map(lambda p: BASE + p)
methods = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH"])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


forged_tokens = st.builds(
    lambda header, claims, sig: ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), sig]
    ),
    st.fixed_dictionaries(
        {
            "alg": st.sampled_from(["RS256", "none", "HS256", "ES256"]) | json_scalars,
            "kid": st.sampled_from(["k1", "k2"]) | json_scalars,
        }
    ),
    st.fixed_dictionaries(
        {
            "iss": st.just("https://accounts.google.com"),
            "aud": st.just(AUDIENCE),
            "email": st.just(ACCOUNT),
            "email_verified": st.just(True),
            "iat": st.just(int(time.time())),
            "exp": st.just(int(time.time()) + 3600) | json_scalars,
        }
    ),
    st.from_regex(r"\A[A-Za-z0-9_-]{0,400}\Z"),
)
header_values = (
    st.text(printable, max_size=120)
    | st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\.[A-Za-z0-9_-]{0,60}\Z")
    | forged_tokens.map(lambda t: "Bearer " + t)
    | st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-16",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/octet-stream",
            "",
            "default",
            "1e400",
            "nan",
            "-inf",
            "9" * 40,
            "Bearer",
            "Basic dXNlcjpwYXNz",
        ]
    )
)
header_names = st.sampled_from(
    [
        "x-tq-web-signature",
        "authorization",
        "content-type",
        "x-appengine-queuename",
        "x-appengine-taskname",
        "x-appengine-taskretrycount",
        "x-appengine-taskexecutioncount",
        "x-appengine-tasketa",
        "x-appengine-failfast",
        "x-appengine-fake-is-admin",
        "x-appengine-cron",
        "x-cloudtasks-queuename",
        "x-cloudtasks-taskname",
        "x-cloudtasks-tasketa",
        "x-cloudtasks-taskretrycount",
        "x-forwarded-proto",
        "x-forwarded-for",
    ]
) | st.from_regex(r"\Ax-[a-z]{1,12}\Z")
headers_st = st.dictionaries(header_names, header_values, max_size=6)


@st.composite
def unauthenticated_signatures(draw: st.DrawFn, path: str, body: bytes) -> str:
    """Signature headers that must not pass: garbage, or a real signature of
    something else (another path or body, another key)."""
    kind = draw(st.sampled_from(["garbage", "other-path", "other-body", "other-key"]))
    if kind == "garbage":
        return draw(header_values)
    if kind == "other-path":
        return Signer(KEY).sign(path + draw(st.sampled_from(["x", "/", "/t"])), body)
    if kind == "other-body":
        return Signer(KEY).sign(path, body + draw(st.binary(min_size=1, max_size=4)))
    return Signer(KEY + "x").sign(path, body)


# --- properties -----------------------------------------------------------


def _check_unauthenticated(
    post: Post, method: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    before = len(TARGET.calls)
    status, out = post(method, path, body, headers)
    assert TARGET.calls[before:] == [], "a handler ran without authentication"
    if method != "POST":
        assert status == 405
    elif len(body) > LIMIT:
        assert status == 413
        assert out["x-tq-web-outcome"] == "rejected"
    else:
        assert status == 403
        assert out["x-tq-web-outcome"] == "rejected"


def _expected_authenticated(body: bytes) -> int:
    if len(body) > LIMIT:
        return 413
    try:
        decode(body, TARGET.lookup)
    except DecodeError:
        return 202
    return 200


def _check_authenticated(
    post: Post, path: str, body: bytes, headers: dict[str, str]
) -> None:
    headers = {k: v for k, v in headers.items() if k.lower() != "x-tq-web-signature"}
    headers[SIGNATURE_HEADER] = Signer(KEY).sign(path, body)
    before = len(TARGET.calls)
    status, out = post("POST", path, body, headers)
    expected = _expected_authenticated(body)
    assert status == expected
    assert len(TARGET.calls) - before == (1 if expected == 200 else 0)
    outcome = {200: "ok", 202: "dropped", 413: "rejected"}[expected]
    assert out["x-tq-web-outcome"] == outcome


@pytest.mark.parametrize("client", list(CLIENTS))
@FUZZ
@given(method=methods, path=paths, body=bodies, headers=headers_st, data=st.data())
def test_unauthenticated_input_never_reaches_a_handler(
    client: str,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    data: st.DataObject,
) -> None:
    if "x-tq-web-signature" in headers or data.draw(st.booleans()):
        headers = {
            **headers,
            "x-tq-web-signature": data.draw(unauthenticated_signatures(path, body)),
        }
    _check_unauthenticated(CLIENTS[client], method, path, body, headers)


@pytest.mark.parametrize("client", list(CLIENTS))
@FUZZ
@given(path=paths, body=bodies, headers=headers_st)
def test_signed_garbage_is_dropped_never_5xx(
    client: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    _check_authenticated(CLIENTS[client], path, body, headers)


@pytest.mark.parametrize("client", list(CLIENTS))
@FUZZ
@given(path=paths, body=bodies, headers=headers_st, claims=st.data())
def test_bearer_tokens_that_fail_any_check_are_403(
    client: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    claims: st.DataObject,
) -> None:
    """Really signed tokens with one claim wrong never authenticate."""
    wrong = claims.draw(
        st.sampled_from(
            [
                {"aud": "https://elsewhere.example.com"},
                {"iss": "https://evil.example.com"},
                {"email": "intruder@evil.example.com"},
                {"email_verified": False},
                {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
                {"iat": int(time.time()) + 3600},
                {"nbf": int(time.time()) + 3600},
            ]
        )
    )
    headers = {**headers, "authorization": "Bearer " + id_token(**wrong)}
    headers.pop("x-tq-web-signature", None)
    _check_unauthenticated(CLIENTS[client], "POST", path, body, headers)


@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_valid_token_authenticates(client: str) -> None:
    """The fuzzed dispatcher really accepts tokens (so the 403s above mean
    something)."""
    body = b'{"type":"google.protobuf.Duration","body":"1s"}'
    headers = {"authorization": "Bearer " + id_token()}
    before = len(TARGET.calls)
    assert CLIENTS[client]("POST", BASE + "x", body, headers)[0] == 200
    assert TARGET.calls[before:] == [duration_pb2.Duration(seconds=1)]


# --- over real HTTP -------------------------------------------------------


@pytest.fixture(scope="module", params=["starlette", "flask"])
def real_server(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "starlette":
        from starlette.applications import Starlette

        app: Any = Starlette()
        TARGET.dispatcher.install_routes(app)
        server = serve_asgi(app)
    else:
        import flask

        app = flask.Flask(__name__)
        TARGET.dispatcher.install_routes(app)
        server = serve_wsgi(app)
    with server as url:
        yield url


def _http(url: str) -> Post:
    def post(
        method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        status, out, _ = http_post(url + path, body, headers, method=method)
        return status, out

    return post


def _assert_alive(url: str) -> None:
    body = b'{"type":"google.protobuf.Empty","body":{}}'
    path = BASE + "alive"
    headers = {SIGNATURE_HEADER: Signer(KEY).sign(path, body)}
    assert http_post(url + path, body, headers)[0] == 200


@settings(FUZZ, max_examples=max(10, EXAMPLES // 8))
@given(path=paths, body=small_bodies, headers=headers_st, signed=st.booleans())
def test_real_http(
    real_server: str, path: str, body: bytes, headers: dict[str, str], signed: bool
) -> None:
    """Over real HTTP (oversize bodies: see the 413 tests below; a server that
    answers 413 early may reset a client still sending)."""
    post = _http(real_server)
    headers.pop("x-tq-web-signature", None)
    if signed:
        _check_authenticated(post, path, body, headers)
    else:
        _check_unauthenticated(post, "POST", path, body, headers)


def _raw_request(url: str, head: bytes, body: bytes = b"") -> int | None:
    """Send raw bytes; the status, or None if the server closed the connection."""
    host, port = url.split("://", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.sendall(head + body)
        resp = http.client.HTTPResponse(conn.sock, method="POST")
        resp.begin()
        resp.read()
        return resp.status
    except (ConnectionError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@pytest.mark.parametrize(
    "extra",
    [
        b"X-Big: " + b"a" * 70_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(300)),
        b"Authorization: Bearer " + b"a" * 60_000 + b"\r\n",
        b"X-TQ-Web-Signature: " + b"1" * 60_000 + b"\r\n",
    ],
    ids=["one-huge-header", "many-headers", "huge-token", "huge-signature"],
)
def test_huge_headers_never_5xx(real_server: str, extra: bytes) -> None:
    before = len(TARGET.calls)
    body = b'{"type":"google.protobuf.Empty","body":{}}'
    head = (
        b"POST /internal/tasks/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: %d\r\n" % len(body) + extra + b"Connection: close\r\n\r\n"
    )
    status = _raw_request(real_server, head, body)
    assert status is None or 400 <= status < 500
    assert TARGET.calls[before:] == []
    _assert_alive(real_server)


def test_declared_length_over_the_limit_is_413_before_the_body(
    real_server: str,
) -> None:
    head = (
        b"POST /internal/tasks/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (LIMIT + 1)
    )
    assert _raw_request(real_server, head) == 413  # no body sent at all
    _assert_alive(real_server)


def test_chunked_body_over_the_limit_is_413(real_server: str) -> None:
    host, port = real_server.split("://", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b"x" * 65536 for _ in range(LIMIT // 65536 + 2))
    conn.request("POST", BASE + "x", body=chunks, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    _assert_alive(real_server)


# --- logs -----------------------------------------------------------------


@pytest.mark.parametrize("client", ["starlette", "flask"])
def test_no_secrets_in_logs(client: str, caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("tq_web").setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    target = make_target(log_task_bodies=True)
    post = starlette_client(target) if client == "starlette" else flask_client(target)
    path = BASE + "google.protobuf.Duration/t"
    body = b'{"type":"google.protobuf.Duration","body":"3s"}'
    real = Signer(KEY).sign(path, body)
    secrets = [KEY]
    attempts: list[dict[str, str]] = []
    for sig in (
        real,  # valid, but replayed onto another body below
        Signer(KEY).sign(path + "x", body),
        Signer("wrong-key-123456").sign(path, body),
        real.split(".")[0] + ".Zm9yZ2VkLXNpZ25hdHVyZS0xMjM0NQ",
    ):
        attempts.append({SIGNATURE_HEADER: sig})
        secrets.append(sig)
        secrets.extend(part for part in sig.split(".") if len(part) > 8)
    for token in (
        id_token(aud="https://elsewhere.example.com"),
        id_token(email="intruder@evil.example.com"),
        id_token(exp=1, iat=0),
        id_token()[:-10] + "AAAAAAAAAA",
    ):
        attempts.append({"Authorization": "Bearer " + token})
        secrets.append(token)
        secrets.extend(token.split("."))
    for headers in attempts:
        status, _ = post("POST", path, body + b" ", headers)
        assert status == 403
    assert target.calls == []
    text = caplog.text + "".join(
        repr(r.args) + (r.exc_text or "") for r in caplog.records
    )
    assert "rejected push" in text  # the rejections are logged, but not secrets
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize("client", ["starlette", "flask"])
@pytest.mark.parametrize("log_bodies", [False, True])
def test_task_bodies_logged_only_when_configured(
    client: str, log_bodies: bool, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("tq_web").setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    target = make_target(log_task_bodies=log_bodies)
    post = starlette_client(target) if client == "starlette" else flask_client(target)
    marker = "card-4111-1111-1111-1111"
    path = BASE + "google.protobuf.StringValue"
    body = json.dumps({"type": "google.protobuf.StringValue", "body": marker}).encode()
    signed = {SIGNATURE_HEADER: Signer(KEY).sign(path, body)}
    assert post("POST", path, body, signed)[0] == 200
    assert post("POST", path, body, {})[0] == 403
    assert target.calls == [wrappers_pb2.StringValue(value=marker)]
    assert (marker in caplog.text) is log_bodies


def test_malformed_body_values_not_logged_by_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logging.getLogger("tq_web").setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    target = make_target()
    post = starlette_client(target)
    marker = "card-4111-1111-1111-1111"
    path = BASE + "google.protobuf.Duration"
    body = json.dumps({"type": "google.protobuf.Duration", "body": marker}).encode()
    assert (
        post("POST", path, body, {SIGNATURE_HEADER: Signer(KEY).sign(path, body)})[0]
        == 202
    )
    assert marker not in caplog.text


# --- server adapters driven directly --------------------------------------


def test_asgi_content_length_that_is_not_ascii_digits() -> None:
    import asyncio

    app = TARGET.dispatcher.asgi_app()
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        scope = {
            "type": "http",
            "method": "POST",
            "path": BASE + "x",
            "root_path": "",
            "headers": [(b"content-length", "²".encode("latin-1"))],
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 403


def test_wsgi_negative_content_length_reads_at_most_the_limit() -> None:
    import io

    class CountingStream(io.BytesIO):
        read_total = 0

        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            self.read_total += len(data)
            return data

    stream = CountingStream(b"x" * (LIMIT * 4))
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": BASE + "x",
        "SCRIPT_NAME": "",
        "CONTENT_LENGTH": "-1",
        "wsgi.input": stream,
    }
    statuses: list[str] = []
    TARGET.dispatcher.wsgi_app()(environ, lambda s, h: statuses.append(s))
    assert statuses[0].startswith(("403", "413"))
    assert stream.read_total <= LIMIT + 1


# --- replayed and expired signatures, key rotation ------------------------


def _signed_task(d: tq_web.Dispatcher, seconds: int) -> Any:
    d.add_task(tq_web.Task(duration_pb2.Duration(seconds=seconds), title="rot"))
    tasks = d.backend.list_tasks("default")
    d.backend.purge("default")
    return tasks[-1]


def _serving(keys: Any, **options: Any) -> tuple[Target, Post]:
    target = make_target(secret_key=keys, **options)
    return target, starlette_client(target)


def test_replayed_signature_only_fits_its_own_push() -> None:
    target, post = _serving(KEY)
    t = _signed_task(target.dispatcher, 4)
    assert post("POST", t.path, t.payload, dict(t.headers))[0] == 200
    # the same push again is accepted (delivery is at least once: handlers are
    # idempotent); moved to another path or body it is not
    assert post("POST", t.path, t.payload, dict(t.headers))[0] == 200
    other = b'{"type":"google.protobuf.Duration","body":"999s"}'
    assert post("POST", t.path, other, dict(t.headers))[0] == 403
    assert post("POST", t.path + "x", t.payload, dict(t.headers))[0] == 403
    assert (
        post("POST", BASE + "google.protobuf.Empty", t.payload, dict(t.headers))[0]
        == 403
    )
    assert len(target.calls) == 2


def test_expired_signature_is_403_with_signature_max_age(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, post = _serving(KEY, signature_max_age=60)
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: 1_000_000.0)  # signed long ago
        t = _signed_task(target.dispatcher, 5)
    assert post("POST", t.path, t.payload, dict(t.headers))[0] == 403
    fresh = _signed_task(target.dispatcher, 6)
    assert post("POST", fresh.path, fresh.payload, dict(fresh.headers))[0] == 200
    assert target.calls == [duration_pb2.Duration(seconds=6)]
    # without signature_max_age old signatures stay valid (tasks wait and retry)
    _, lenient = _serving(KEY)
    assert lenient("POST", t.path, t.payload, dict(t.headers))[0] == 200


def test_key_rotation_in_three_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """old -> "new,old" (verify both, sign old) -> "old,new" (sign new) -> "new".

    Tasks queued at every step run at the next one; nothing gets a 403 until
    the old key is dropped.
    """
    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    steps = [["old"], ["new", "old"], ["old", "new"], ["new"]]
    apps = [_serving(keys) for keys in steps]
    queued = [_signed_task(target.dispatcher, i) for i, (target, _) in enumerate(apps)]

    def status(app: int, task: int) -> int:
        t = queued[task]
        return apps[app][1]("POST", t.path, t.payload, dict(t.headers))[0]

    # which step's app accepts which step's task: during each step the
    # instances of that step and of the steps next to it all agree
    expected = [
        [200, 200, 403, 403],  # "old" never sees step 2 or 3 tasks
        [200, 200, 200, 200],
        [200, 200, 200, 200],
        [403, 403, 200, 200],  # old key dropped: old tasks must be gone
    ]
    got = [[status(app, task) for task in range(4)] for app in range(4)]
    assert got == expected
    # the same through the environment (comma-separated, oldest first)
    monkeypatch.setenv("TQ_WEB_SECRET_KEY", "old,new")
    env = make_target(secret_key=None)
    signed_by_env = _signed_task(env.dispatcher, 9)
    assert (
        Signer("new").verify(
            signed_by_env.path,
            signed_by_env.payload,
            signed_by_env.headers[SIGNATURE_HEADER],
        )
        is None
    )
    post = starlette_client(env)
    assert (
        post("POST", queued[0].path, queued[0].payload, dict(queued[0].headers))[0]
        == 200
    )
