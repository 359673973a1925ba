"""Authenticating pushes from Google: Cloud Tasks OIDC tokens, App Engine headers.

:class:`OIDCAuthenticator` verifies the Google-signed ID token that Cloud Tasks
sends on HTTP targets (``Authorization: Bearer <jwt>``) with ``google-auth``:
the RS256 signature against Google's certificates (fetched and cached), the
expiry, the issuer, the audience and the service account's e-mail.

:class:`AppEngineAuthenticator` trusts ``X-AppEngine-QueueName`` only when the
app really runs on App Engine standard, where Google strips those headers from
outside requests. Anywhere else (Cloud Run, GKE, a VM, a laptop) anyone can send
them, so they authenticate nothing.

Both implement :class:`tq_web.auth.Authenticator`; pass them to
``Dispatcher(authenticators=[...])``. Rejection reasons are short fixed strings:
they never contain the token or any part of it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .exceptions import ConfigurationError, missing
from .request import PushRequest

__all__ = [
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "AppEngineAuthenticator",
    "OIDCAuthenticator",
    "running_on_app_engine_standard",
]

log = logging.getLogger("tq_web")

#: Google's OAuth2 signing certificates (PEM, by key id) for ID tokens.
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
#: The ``iss`` values of Google-signed ID tokens.
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")

#: The longest bearer token considered (Google ID tokens are about 1 KiB).
MAX_TOKEN_LENGTH = 8192
#: The largest certificate document accepted from the certificates URL.
MAX_CERTS_SIZE = 1 << 20
#: Seconds between two fetch attempts after a failure, or for an unknown key id.
REFETCH_INTERVAL = 30.0
#: Seconds an HTTP fetch of the certificates may take.
FETCH_TIMEOUT = 10.0

_JWT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")

# Fixed rejection reasons (never derived from the token or an exception text).
NO_TOKEN = "no bearer token"
MALFORMED = "malformed token"
CERTS_UNAVAILABLE = "cannot fetch Google certificates"
UNKNOWN_KEY = "token signed by an unknown key"
BAD_SIGNATURE = "bad token signature"
EXPIRED = "expired token"
NOT_YET_VALID = "token not yet valid"
INVALID = "invalid token"
WRONG_ISSUER = "wrong token issuer"
WRONG_AUDIENCE = "wrong token audience"
EMAIL_NOT_VERIFIED = "token e-mail not verified"
WRONG_ACCOUNT = "service account not allowed"


def _strings(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigurationError(f"{what} must be non-empty strings, got {item!r}")
    return items


def _b64json(segment: str) -> Any:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return json.loads(raw)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


Fetcher = Callable[[str, float], bytes]


def _urlopen_fetch(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data: bytes = resp.read(MAX_CERTS_SIZE + 1)
    if len(data) > MAX_CERTS_SIZE:
        raise ValueError("certificate document too large")
    return data


def _parse_certs(data: bytes) -> dict[str, str]:
    doc = json.loads(data)
    if not isinstance(doc, dict) or not doc:
        raise ValueError("certificate document is not a non-empty JSON object")
    out: dict[str, str] = {}
    for kid, pem in doc.items():
        if not isinstance(pem, str) or "-----BEGIN" not in pem:
            raise ValueError("certificate document has a non-PEM entry")
        out[str(kid)] = pem
    return out


class _CertCache:
    """Google's certificates by key id, fetched over HTTP and cached (thread-safe).

    A failed fetch keeps the previous certificates (Google publishes keys well
    before it signs with them and keeps them after) and is not retried for
    :data:`REFETCH_INTERVAL` seconds, so a broken network costs no more than one
    blocked request per interval.
    """

    def __init__(
        self,
        url: str,
        cache_seconds: float,
        fetch: Fetcher = _urlopen_fetch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.cache_seconds = cache_seconds
        self.fetch_count = 0
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._certs: dict[str, str] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None

    def _fresh(self, now: float) -> bool:
        return (
            self._fetched_at is not None and now - self._fetched_at < self.cache_seconds
        )

    def _may_try(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= min(
            REFETCH_INTERVAL, self.cache_seconds
        )

    def get(self, kid: str | None) -> dict[str, str]:
        """The current certificates; refetched when stale, or once per
        interval when ``kid`` is not among them (Google rotated its keys)."""
        now = self._clock()
        certs = self._certs
        if self._fresh(now) and (kid is None or kid in certs):
            return certs
        with self._lock:
            now = self._clock()
            stale = not self._fresh(now)
            unknown = kid is not None and kid not in self._certs
            if (stale or unknown) and self._may_try(now):
                self._refresh(now)
            return self._certs

    def refresh(self) -> None:
        """Fetch now (e.g. at startup), whatever the cache holds."""
        with self._lock:
            self._refresh(self._clock())

    def _refresh(self, now: float) -> None:
        self._last_attempt = now
        self.fetch_count += 1
        try:
            certs = _parse_certs(self._fetch(self.url, FETCH_TIMEOUT))
        except Exception as err:  # network, HTTP status, bad JSON: never crash
            log.warning(
                "tq_web: cannot fetch Google certificates from %s (%s)%s",
                self.url,
                type(err).__name__,
                "; keeping the cached ones" if self._certs else "",
            )
            return
        self._certs = certs
        self._fetched_at = now
        log.debug("tq_web: fetched %d Google certificates", len(certs))


class OIDCAuthenticator:
    """Accepts pushes carrying a valid Google-signed OIDC ID token.

    Cloud Tasks sends ``Authorization: Bearer <id token>`` on HTTP targets whose
    task has an ``oidc_token`` (service account e-mail, audience). This checks,
    with ``google-auth``: the RS256 signature against Google's certificates, the
    expiry and issue time (with ``clock_skew``), ``nbf`` if present, the issuer,
    the audience, that ``email`` is one of ``service_accounts`` and that
    ``email_verified`` is true.

    Args:
        audience: the expected ``aud`` claim(s). Cloud Tasks' default audience is
            each task's full URL, so set the same fixed audience on the task's
            ``oidc_token`` (e.g. the service's base URL); Cloud Run custom
            domains and load balancers need one.
        service_accounts: the allowed service-account e-mails (required).
        issuers: the accepted ``iss`` values.
        certs_url: where Google publishes its certificates (PEM by key id).
        certs: fixed certificates or public keys (PEM by key id) instead of
            fetching them: for tests and offline use.
        cache_seconds: how long fetched certificates are reused.
        clock_skew: seconds of tolerance on ``exp``, ``iat`` and ``nbf``.
        audience_from_request: also accept, as audience, the request's own
            origin (``<scheme>://<host>``, with or without a trailing slash) or
            full URL (origin + path), built from the ``Host`` header and
            ``X-Forwarded-Proto`` (default ``https``). Only where the front end
            routes on ``Host`` (Cloud Run's own URL); prefer ``audience``.

    Raises:
        ConfigurationError: no service account, or neither ``audience`` nor
            ``audience_from_request``.
    """

    def __init__(
        self,
        *,
        audience: str | Sequence[str] | None = None,
        service_accounts: Sequence[str] = (),
        issuers: str | Sequence[str] = GOOGLE_ISSUERS,
        certs_url: str = GOOGLE_CERTS_URL,
        certs: Mapping[str, str] | None = None,
        cache_seconds: float = 3600,
        clock_skew: float = 10,
        audience_from_request: bool = False,
    ) -> None:
        self.audiences = frozenset(_strings(audience, "audience"))
        self.audience_from_request = bool(audience_from_request)
        if not self.audiences and not self.audience_from_request:
            raise ConfigurationError(
                "OIDCAuthenticator needs an audience (the oidc_token audience of "
                "your tasks), or audience_from_request=True"
            )
        accounts = _strings(service_accounts, "service_accounts")
        if not accounts:
            raise ConfigurationError(
                "OIDCAuthenticator needs service_accounts: the e-mails of the "
                "service accounts Cloud Tasks signs tokens for"
            )
        self.service_accounts = frozenset(a.strip().lower() for a in accounts)
        self.issuers = frozenset(_strings(issuers, "issuers"))
        if not self.issuers:
            raise ConfigurationError("OIDCAuthenticator needs at least one issuer")
        if cache_seconds < 0 or clock_skew < 0:
            raise ConfigurationError("cache_seconds and clock_skew must be >= 0")
        self.clock_skew = float(clock_skew)
        self._static: dict[str, str] | None = None
        if certs is not None:
            self._static = {str(k): str(v) for k, v in certs.items()}
            if not self._static:
                raise ConfigurationError("certs is empty")
        self._cache = _CertCache(certs_url, float(cache_seconds))
        _google_jwt_decode()  # fail now, not at the first push, without google-auth

    def __repr__(self) -> str:
        return (
            f"OIDCAuthenticator(audience={sorted(self.audiences)!r}, "
            f"service_accounts={sorted(self.service_accounts)!r})"
        )

    @property
    def fetch_count(self) -> int:
        """How many times the certificates were fetched (for tests and metrics)."""
        return self._cache.fetch_count

    def refresh_certs(self) -> None:
        """Fetch Google's certificates now, e.g. at startup, so that no push
        waits for the fetch. Never raises; a failure is logged."""
        if self._static is None:
            self._cache.refresh()

    def authenticate(self, request: PushRequest) -> str | None:
        """Verify the request's bearer token.

        Returns:
            None if the token is valid, else a short reason (never the token).
        """
        token = _bearer(request.headers.get("authorization", ""))
        if token is None:
            return NO_TOKEN
        if len(token) > MAX_TOKEN_LENGTH or not _JWT_RE.match(token):
            return MALFORMED
        try:
            header = _b64json(token.split(".", 1)[0])
        except (ValueError, binascii.Error, RecursionError):
            return MALFORMED
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            return MALFORMED
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return MALFORMED
        certs = self._static if self._static is not None else self._cache.get(kid)
        if not certs:
            return CERTS_UNAVAILABLE
        if kid is not None:
            if kid not in certs:
                return UNKNOWN_KEY
            certs = {kid: certs[kid]}
        claims = self._verify(token, certs)
        if isinstance(claims, str):
            return claims
        return self._check_claims(claims, request)

    def _verify(self, token: str, certs: Mapping[str, str]) -> dict[str, Any] | str:
        """Signature, ``iat`` and ``exp`` by google-auth; claims or a reason."""
        decode = _google_jwt_decode()
        try:
            claims = decode(
                token,
                certs=dict(certs),
                verify=True,
                audience=None,  # checked below, with the request's candidates
                clock_skew_in_seconds=int(self.clock_skew),
            )
        except Exception as err:  # never echo: google-auth quotes the token
            text = str(err).lower()
            if "signature" in text:
                return BAD_SIGNATURE
            if "expired" in text:
                return EXPIRED
            if "too early" in text:
                return NOT_YET_VALID
            return INVALID
        if not isinstance(claims, dict):
            return INVALID
        return claims

    def _check_claims(
        self, claims: Mapping[str, Any], request: PushRequest
    ) -> str | None:
        now = time.time()
        exp, iat = _number(claims.get("exp")), _number(claims.get("iat"))
        if exp is None or iat is None:
            return INVALID
        if "nbf" in claims:
            nbf = _number(claims["nbf"])
            if nbf is None:
                return INVALID
            if now + self.clock_skew < nbf:
                return NOT_YET_VALID
        if claims.get("iss") not in self.issuers:
            return WRONG_ISSUER
        if not self._audience_ok(claims.get("aud"), request):
            return WRONG_AUDIENCE
        email = claims.get("email")
        if not isinstance(email, str) or email.lower() not in self.service_accounts:
            return WRONG_ACCOUNT
        verified = claims.get("email_verified")
        if verified is not True and verified != "true":
            return EMAIL_NOT_VERIFIED
        return None

    def _audience_ok(self, aud: Any, request: PushRequest) -> bool:
        if isinstance(aud, str):
            got = {aud}
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            got = set(aud)
        else:
            return False
        if got & self.audiences:
            return True
        return self.audience_from_request and bool(got & _request_audiences(request))


def _google_jwt_decode() -> Callable[..., Any]:
    try:
        from google.auth import jwt as google_jwt
    except ImportError as err:  # pragma: no cover - exercised without it
        raise missing("google-auth", "oidc", "OIDC verification") from err
    decode: Callable[..., Any] = google_jwt.decode
    return decode


def _bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def _request_audiences(request: PushRequest) -> set[str]:
    """The audiences a request could have been minted for: origin and URL."""
    host = request.headers.get("host", "").strip().lower()
    if not host or any(c in host for c in "/?#@ \t\\"):
        return set()
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0]
    proto = proto.strip().lower()
    scheme = proto if proto in ("http", "https") else "https"
    origin = f"{scheme}://{host}"
    return {origin, origin + "/", origin + request.path}


def running_on_app_engine_standard(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs on App Engine standard.

    The App Engine standard runtime sets ``GAE_ENV=standard``; nothing else
    does. Cloud Run (and Cloud Functions) set ``K_SERVICE`` and never
    ``GAE_ENV``: a process with ``K_SERVICE`` is never considered App Engine,
    even if someone set ``GAE_ENV`` by hand. The local dev server sets
    ``GAE_ENV=localdev``, which does not count.

    Args:
        environ: the environment to inspect (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    return env.get("GAE_ENV") == "standard" and not env.get("K_SERVICE")


class AppEngineAuthenticator:
    """Accepts pushes with an ``X-AppEngine-QueueName`` header, on App Engine only.

    On App Engine standard, Google removes ``X-AppEngine-*`` headers from outside
    requests (except those of the app's logged-in administrators), so a push
    carrying ``X-AppEngine-QueueName`` comes from the app's task queue.
    Anywhere else the header is just text any client can send: off App Engine
    this authenticator accepts nothing and logs once, at WARNING, that App Engine
    headers are ignored. ``X-CloudTasks-*`` headers never authenticate.

    Args:
        environ: the environment used to detect App Engine standard (default
            ``os.environ``, read when the authenticator is created); see
            :func:`running_on_app_engine_standard`.
        force: override the detection (``True``: trust the headers, e.g. behind
            a proxy that strips them from outside requests; ``False``: never).
    """

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        force: bool | None = None,
    ) -> None:
        self.on_app_engine = (
            running_on_app_engine_standard(environ) if force is None else bool(force)
        )
        self._warned = False

    def __repr__(self) -> str:
        return f"AppEngineAuthenticator(on_app_engine={self.on_app_engine!r})"

    def authenticate(self, request: PushRequest) -> str | None:
        """Accept when on App Engine standard and the queue header is present."""
        if not self.on_app_engine:
            if not self._warned:
                self._warned = True
                log.warning(
                    "tq_web: not running on App Engine standard (GAE_ENV is not "
                    "'standard'): X-AppEngine-* headers are ignored for "
                    "authentication"
                )
            return "not on App Engine: X-AppEngine headers ignored"
        if not request.headers.get("x-appengine-queuename", "").strip():
            return "no X-AppEngine-QueueName header"
        return None
