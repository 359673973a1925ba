"""Cloud Tasks OIDC verification (SPEC 3), offline.

Tokens are signed here with a locally generated RSA key and
``google.auth.jwt.encode`` (the recipe of reference/cloudtasks.md §1.9); the
authenticator gets the matching certificate either directly (``certs=``) or from
a small HTTP server on 127.0.0.1 standing in for Google's certificates URL.
Pushes go over real HTTP to Starlette (uvicorn) and Flask (werkzeug) apps.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt
from google.protobuf.duration_pb2 import Duration

import tq_web
from tests.conftest import http_post, serve_asgi, serve_wsgi
from tq_web.auth import SIGNATURE_HEADER, Signer
from tq_web.exceptions import ConfigurationError
from tq_web.oidc import OIDCAuthenticator, _CertCache
from tq_web.request import PushRequest

AUD = "https://tasks.example.com"
SA = "tasks@my-project.iam.gserviceaccount.com"
ISS = "https://accounts.google.com"
PATH = "/internal/tasks/google.protobuf.Duration/t1"
BODY = b'{"type":"google.protobuf.Duration","body":"5s"}'


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _self_signed_cert(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tq-web-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Keys:
    """Google's signing key (``k1``, published as a certificate) and a stranger's."""

    def __init__(self) -> None:
        self.google = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = _self_signed_cert(self.google)
        self.certs = {"k1": self.cert}
        self._signers: dict[tuple[int, str | None], crypt.RSASigner] = {}

    def token(
        self,
        *,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = "k1",
        drop: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        """A signed ID token; ``claims`` override the defaults (None removes)."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISS,
            "aud": AUD,
            "azp": "1234567890",
            "sub": "1234567890",
            "email": SA,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        payload.update(claims)
        for name in drop:
            payload.pop(name, None)
        key = key or self.google
        signer = self._signers.get((id(key), kid))
        if signer is None:
            signer = crypt.RSASigner.from_string(_private_pem(key), key_id=kid)
            self._signers[(id(key), kid)] = signer
        return jwt.encode(signer, payload).decode("ascii")


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def _auth(keys: Keys, **options: Any) -> OIDCAuthenticator:
    options.setdefault("audience", AUD)
    options.setdefault("service_accounts", [SA])
    if "certs_url" not in options:
        options.setdefault("certs", keys.certs)
    return OIDCAuthenticator(**options)


def _request(token: str | None, **headers: str) -> PushRequest:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return PushRequest(PATH, BODY, h)


# --- over real HTTP -------------------------------------------------------


class Served:
    def __init__(self, d: tq_web.Dispatcher, url: str, calls: list[Duration]):
        self.d, self.url, self.calls = d, url, calls

    def post(self, headers: dict[str, str], body: bytes = BODY) -> int:
        return http_post(self.url + PATH, body, headers)[0]


@contextmanager
def _serve(kind: str, authenticators: list[Any], **options: Any) -> Iterator[Served]:
    calls: list[Duration] = []
    d = tq_web.Dispatcher("memory://", authenticators=authenticators, **options)
    d.register_task(Duration, calls.append)
    if kind == "starlette":
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
        yield Served(d, url, calls)


@pytest.fixture(scope="module", params=["starlette", "flask"])
def served(request: pytest.FixtureRequest, keys: Keys) -> Iterator[Served]:
    mp = pytest.MonkeyPatch()
    mp.delenv("TQ_WEB_SECRET_KEY", raising=False)
    try:
        with _serve(request.param, [_auth(keys)]) as s:
            yield s
    finally:
        mp.undo()


@pytest.fixture
def fresh(served: Served) -> Served:
    served.calls.clear()
    return served


def test_valid_token_runs_the_handler(fresh: Served, keys: Keys) -> None:
    status = fresh.post({"Authorization": f"Bearer {keys.token()}"})
    assert status == 200
    assert fresh.calls == [Duration(seconds=5)]


def test_bearer_scheme_is_case_insensitive(fresh: Served, keys: Keys) -> None:
    assert fresh.post({"Authorization": f"bearer  {keys.token()} "}) == 200
    assert len(fresh.calls) == 1


BAD_TOKENS: dict[str, Callable[[Keys], str | None]] = {
    "wrong audience": lambda k: k.token(aud="https://other.example.com"),
    "audience list without ours": lambda k: k.token(aud=["https://x", "https://y"]),
    "wrong issuer": lambda k: k.token(iss="https://evil.example.com"),
    "no issuer": lambda k: k.token(drop=("iss",)),
    "expired": lambda k: k.token(
        iat=int(time.time()) - 7200, exp=int(time.time()) - 3600
    ),
    "issued in the future": lambda k: k.token(iat=int(time.time()) + 600),
    "not yet valid (nbf)": lambda k: k.token(nbf=int(time.time()) + 600),
    "no exp": lambda k: k.token(drop=("exp",)),
    "signed by another key": lambda k: k.token(key=k.other),
    "unknown key id": lambda k: k.token(kid="k9"),
    "email not on the list": lambda k: k.token(email="intruder@evil.example.com"),
    "no email": lambda k: k.token(drop=("email",)),
    "email not verified": lambda k: k.token(email_verified=False),
    "email_verified missing": lambda k: k.token(drop=("email_verified",)),
    "no token": lambda k: None,
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens_are_403(fresh: Served, keys: Keys, case: str) -> None:
    token = BAD_TOKENS[case](keys)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    assert fresh.post(headers) == 403
    assert fresh.calls == []


@pytest.mark.parametrize(
    "value",
    [
        "Bearer",
        "Bearer ",
        "Bearer abc",
        "Bearer a.b.c",
        "Bearer ....",
        "Basic dXNlcjpwYXNz",
        "Bearer " + "A" * 20000,
        "Bearer eyJhbGciOiJub25lIn0.eyJlbWFpbCI6ImEifQ.",
    ],
)
def test_malformed_authorization_is_403(fresh: Served, value: str) -> None:
    assert fresh.post({"Authorization": value}) == 403
    assert fresh.calls == []


def test_alg_none_and_hs256_are_refused(keys: Keys) -> None:
    """A token whose header claims another algorithm is malformed, whatever
    its claims (no algorithm confusion)."""
    good = keys.token()
    _, payload, _ = good.split(".")

    def seg(obj: object) -> str:
        raw = json.dumps(obj).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    auth = _auth(keys)
    for alg in ("none", "HS256", "ES256", None):
        forged = f"{seg({'alg': alg, 'kid': 'k1'})}.{payload}.c2ln"
        assert auth.authenticate(_request(forged)) == "malformed token"


# --- reasons and claims, without HTTP -------------------------------------


def test_reasons_are_short_and_never_contain_the_token(keys: Keys) -> None:
    auth = _auth(keys)
    cases = {
        "wrong token audience": keys.token(aud="https://other"),
        "wrong token issuer": keys.token(iss="evil"),
        "expired token": keys.token(iat=1, exp=2),
        "bad token signature": keys.token(key=keys.other),
        "token signed by an unknown key": keys.token(kid="zz"),
        "service account not allowed": keys.token(email="x@y.z"),
        "token e-mail not verified": keys.token(email_verified="false"),
        "token not yet valid": keys.token(nbf=int(time.time()) + 3600),
    }
    for expected, token in cases.items():
        reason = auth.authenticate(_request(token))
        assert reason == expected
        for part in token.split("."):
            assert part not in reason
    assert auth.authenticate(_request(None)) == "no bearer token"
    assert auth.authenticate(_request(keys.token())) is None


def test_clock_skew_tolerates_a_just_expired_token(keys: Keys) -> None:
    now = int(time.time())
    token = keys.token(iat=now - 3600, exp=now - 5)
    assert _auth(keys, clock_skew=30).authenticate(_request(token)) is None
    assert _auth(keys, clock_skew=0).authenticate(_request(token)) == "expired token"


def test_several_audiences_and_accounts(keys: Keys) -> None:
    auth = _auth(
        keys,
        audience=["https://a.example.com", AUD],
        service_accounts=["other@p.iam.gserviceaccount.com", SA.upper()],
    )
    assert auth.authenticate(_request(keys.token())) is None
    assert auth.authenticate(_request(keys.token(aud="https://a.example.com"))) is None
    token = keys.token(email="other@p.iam.gserviceaccount.com")
    assert auth.authenticate(_request(token)) is None


def test_issuer_without_scheme_is_google_too(keys: Keys) -> None:
    token = keys.token(iss="accounts.google.com")
    assert _auth(keys).authenticate(_request(token)) is None


def test_public_key_instead_of_certificate(keys: Keys) -> None:
    pem = (
        keys.google.public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode()
    )
    auth = _auth(keys, certs={"k1": pem})
    assert auth.authenticate(_request(keys.token())) is None
    assert auth.authenticate(_request(keys.token(key=keys.other))) is not None


def test_audience_from_request(keys: Keys) -> None:
    auth = _auth(keys, audience=None, audience_from_request=True)
    run_app = "https://svc-abc-uc.a.run.app"
    host = {"host": "svc-abc-uc.a.run.app", "x_forwarded_proto": "https"}
    for aud in (run_app, run_app + "/", run_app + PATH):
        assert auth.authenticate(_request(keys.token(aud=aud), **host)) is None
    assert (
        auth.authenticate(_request(keys.token(aud="https://other.a.run.app"), **host))
        == "wrong token audience"
    )
    # scheme from X-Forwarded-Proto, https when absent
    token = keys.token(aud="http://svc-abc-uc.a.run.app")
    assert auth.authenticate(_request(token, host="svc-abc-uc.a.run.app")) is not None
    assert (
        auth.authenticate(
            _request(token, host="svc-abc-uc.a.run.app", x_forwarded_proto="http")
        )
        is None
    )
    # no Host: nothing to derive
    assert auth.authenticate(_request(keys.token(aud=run_app))) is not None
    # a fixed audience still works alongside
    both = _auth(keys, audience_from_request=True)
    assert both.authenticate(_request(keys.token())) is None


def test_configuration_errors(keys: Keys) -> None:
    with pytest.raises(ConfigurationError, match="service_accounts"):
        OIDCAuthenticator(audience=AUD, certs=keys.certs)
    with pytest.raises(ConfigurationError, match="audience"):
        OIDCAuthenticator(service_accounts=[SA], certs=keys.certs)
    with pytest.raises(ConfigurationError):
        OIDCAuthenticator(audience=AUD, service_accounts=[""], certs=keys.certs)
    with pytest.raises(ConfigurationError):
        OIDCAuthenticator(audience=AUD, service_accounts=[SA], certs={})
    # a single string is one account, not a sequence of characters
    auth = OIDCAuthenticator(audience=AUD, service_accounts=SA, certs=keys.certs)
    assert auth.service_accounts == {SA}
    assert "k1" not in repr(auth) and SA in repr(auth)


def test_implements_the_authenticator_protocol(keys: Keys) -> None:
    assert isinstance(_auth(keys), tq_web.Authenticator)


# --- fetching Google's certificates ---------------------------------------


class CertServer:
    """Serves a certificates document on 127.0.0.1 and counts the fetches."""

    def __init__(self, document: bytes, status: int = 200) -> None:
        self.document = document
        self.status = status
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.document)))
                self.end_headers()
                self.wfile.write(outer.document)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/oauth2/v1/certs"
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.02,), daemon=True
        )

    def __enter__(self) -> CertServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.mark.parametrize("kind", ["starlette", "flask"])
def test_certificates_are_fetched_once_and_cached(
    keys: Keys, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    with CertServer(json.dumps(keys.certs).encode()) as certs:
        auth = _auth(keys, certs_url=certs.url)
        with _serve(kind, [auth]) as s:
            for _ in range(3):
                assert s.post({"Authorization": f"Bearer {keys.token()}"}) == 200
            assert s.post({"Authorization": f"Bearer {keys.token(aud='x')}"}) == 403
        assert certs.hits == 1
        assert auth.fetch_count == 1


def test_cache_seconds_zero_refetches(keys: Keys) -> None:
    with CertServer(json.dumps(keys.certs).encode()) as certs:
        auth = _auth(keys, certs_url=certs.url, cache_seconds=0)
        for _ in range(2):
            assert auth.authenticate(_request(keys.token())) is None
        assert certs.hits == 2


@pytest.mark.parametrize(
    ("document", "status"),
    [
        (b"{}", 200),
        (b"not json", 200),
        (b'{"k1": 42}', 200),
        (b'["a"]', 200),
        (b'{"error": "boom"}', 500),
        (b'{"k1": "x"}', 404),
    ],
)
def test_bad_certificate_responses_reject_without_crashing(
    keys: Keys, document: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    with CertServer(document, status) as certs:
        auth = _auth(keys, certs_url=certs.url)
        token = keys.token()
        assert auth.authenticate(_request(token)) == "cannot fetch Google certificates"
        # a failed fetch is not retried on every request
        assert auth.authenticate(_request(token)) == "cannot fetch Google certificates"
        assert certs.hits == 1
    assert "cannot fetch Google certificates" in caplog.text
    assert token not in caplog.text


def test_unreachable_certificates_url_is_403_over_http(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    with CertServer(b"{}") as dead:
        url = dead.url
    auth = _auth(keys, certs_url=url)  # the port is closed now
    with _serve("starlette", [auth]) as s:
        assert s.post({"Authorization": f"Bearer {keys.token()}"}) == 403
        assert s.calls == []


def test_refresh_certs_prefetches(keys: Keys) -> None:
    with CertServer(json.dumps(keys.certs).encode()) as certs:
        auth = _auth(keys, certs_url=certs.url)
        auth.refresh_certs()
        assert certs.hits == 1
        assert auth.authenticate(_request(keys.token())) is None
        assert certs.hits == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_expiry_rotation_and_stale_fallback() -> None:
    clock = FakeClock()
    documents: list[dict[str, str] | Exception] = []
    fetched: list[str] = []

    def fetch(url: str, timeout: float) -> bytes:
        fetched.append(url)
        doc = documents.pop(0)
        if isinstance(doc, Exception):
            raise doc
        return json.dumps(doc).encode()

    pem = "-----BEGIN CERTIFICATE-----\n...\n"
    cache = _CertCache("https://certs", 3600, fetch=fetch, clock=clock)
    documents.append({"a": pem})
    assert cache.get("a") == {"a": pem}
    assert cache.get("a") == {"a": pem} and len(fetched) == 1
    # an unknown key id refetches (Google rotated), but at most once per interval
    documents.append({"a": pem, "b": pem})
    clock.now += 60
    assert set(cache.get("b")) == {"a", "b"} and len(fetched) == 2
    assert "c" not in cache.get("c") and len(fetched) == 2
    # stale after cache_seconds: refetched; a failure keeps the old certificates
    clock.now += 3600
    documents.append(OSError("network down"))
    assert set(cache.get("a")) == {"a", "b"} and len(fetched) == 3
    assert set(cache.get("a")) == {"a", "b"} and len(fetched) == 3  # backoff
    clock.now += 31
    documents.append({"b": pem})
    assert set(cache.get("a")) == {"b"} and len(fetched) == 4


def test_concurrent_requests_fetch_once(keys: Keys) -> None:
    with CertServer(json.dumps(keys.certs).encode()) as certs:
        auth = _auth(keys, certs_url=certs.url)
        token = keys.token()
        results: list[str | None] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(auth.authenticate(_request(token)))
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [None] * 8
        assert certs.hits == 1


# --- combined with signatures ---------------------------------------------


@pytest.mark.parametrize("kind", ["starlette", "flask"])
def test_signature_or_token_either_authenticates(
    keys: Keys, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    signature = Signer("sig-key").sign(PATH, BODY)
    with _serve(kind, [_auth(keys)], secret_key="sig-key") as s:
        token = keys.token()
        assert s.post({SIGNATURE_HEADER: signature}) == 200
        assert s.post({"Authorization": f"Bearer {token}"}) == 200
        assert (
            s.post({SIGNATURE_HEADER: "1.bad", "Authorization": f"Bearer {token}"})
            == 200
        )
        assert s.post({SIGNATURE_HEADER: signature, "Authorization": "Bearer x"}) == 200
        assert s.post({}) == 403
        assert s.post({SIGNATURE_HEADER: "1.bad", "Authorization": "Bearer x"}) == 403
        bad = keys.token(aud="https://elsewhere")
        assert s.post({"Authorization": f"Bearer {bad}"}) == 403
        assert len(s.calls) == 4


def test_audience_from_request_over_http(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cloud Tasks' default audience is the task's full URL."""
    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    auth = _auth(keys, audience=None, audience_from_request=True)
    with _serve("starlette", [auth]) as s:
        origin = "http://" + s.url.split("://", 1)[1]
        token = keys.token(aud=origin + PATH)
        headers = {"Authorization": f"Bearer {token}", "X-Forwarded-Proto": "http"}
        assert s.post(headers) == 200
        assert s.post({"Authorization": f"Bearer {token}"}) == 403  # https assumed
        assert len(s.calls) == 1
