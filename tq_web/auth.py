"""Authenticating pushes: signatures (any backend), and the explicit opt-out.

With a key, ``add_task`` signs each task when it creates it: the header
``X-TQ-Web-Signature`` holds ``<timestamp>.<signature>`` of an itsdangerous
``TimestampSigner(keys, salt="tq_web.push.v1", digest_method=sha256)`` over
``POST\\n<task path>\\n<hex sha256(body)>``. Runners forward stored headers
unchanged, so no runner needs the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner

from ._time import Duration, to_timedelta
from .exceptions import ConfigurationError
from .request import PushRequest

__all__ = [
    "SIGNATURE_HEADER",
    "AllowUnauthenticated",
    "Authenticator",
    "SignatureAuthenticator",
    "Signer",
    "keys_from_env",
]

log = logging.getLogger("tq_web")

SIGNATURE_HEADER = "X-TQ-Web-Signature"
SALT = "tq_web.push.v1"
ENV_SECRET_KEY = "TQ_WEB_SECRET_KEY"

Keys = str | bytes | Sequence[str | bytes]


@runtime_checkable
class Authenticator(Protocol):
    """Decides whether a push may run a handler.

    ``authenticate`` returns ``None`` to accept, or a short reason (never a
    secret) to reject. Several authenticators may be combined: a push is
    accepted when any one accepts it.
    """

    def authenticate(self, request: PushRequest) -> str | None:
        """Return None to accept the request, else why it is rejected."""
        ...


def _key_list(keys: Keys) -> list[bytes]:
    if isinstance(keys, str | bytes):
        items: list[str | bytes] = [keys]
    else:
        items = list(keys)
    out = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in items]
    out = [k for k in out if k]
    if not out:
        raise ConfigurationError("secret_key is empty")
    return out


def keys_from_env() -> list[str] | None:
    """Keys from ``TQ_WEB_SECRET_KEY`` (comma-separated, oldest first), or None."""
    raw = os.environ.get(ENV_SECRET_KEY, "")
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    return keys or None


def _signing_input(path: str, body: bytes) -> bytes:
    return (
        b"POST\n"
        + path.encode("utf-8")
        + b"\n"
        + hashlib.sha256(body).hexdigest().encode()
    )


class Signer:
    """Signs and verifies pushes.

    Args:
        keys: one key, or several ordered oldest to newest: the newest (last)
            signs, all verify (for rotation).
        max_age: reject signatures older than this (default: no expiry, since
            tasks may wait and retry for days).
    """

    def __init__(self, keys: Keys, max_age: Duration | None = None) -> None:
        self._signer = TimestampSigner(
            _key_list(keys), salt=SALT, digest_method=hashlib.sha256
        )
        age = to_timedelta(max_age, "signature_max_age")
        self.max_age: int | None = (
            None if age is None else max(1, int(age.total_seconds()))
        )
        # Verification re-implements itsdangerous' check with the derived keys
        # computed once (the format is itsdangerous'; a test pins them equal).
        self._verify_keys = [
            hashlib.sha256(SALT.encode() + b"signer" + k).digest()
            for k in reversed(_key_list(keys))
        ]
        self._ts_cache: tuple[int, bytes] = (-1, b"")

    def __repr__(self) -> str:  # never show keys
        return f"Signer(max_age={self.max_age!r})"

    def sign(self, path: str, body: bytes) -> str:
        """The ``X-TQ-Web-Signature`` value for a POST of ``body`` to ``path``."""
        # itsdangerous' TimestampSigner format, with the derived key computed
        # once: "<b64(timestamp)>.<b64(hmac(key, value + '.' + b64(timestamp)))>".
        ts = int(time.time())
        cached = self._ts_cache
        if cached[0] != ts:
            raw = ts.to_bytes((ts.bit_length() + 7) // 8 or 1, "big")
            cached = self._ts_cache = (ts, base64.urlsafe_b64encode(raw).rstrip(b"="))
        ts_b64 = cached[1]
        mac = hmac.digest(
            self._verify_keys[0], _signing_input(path, body) + b"." + ts_b64, "sha256"
        )
        sig = base64.urlsafe_b64encode(mac).rstrip(b"=")
        return (ts_b64 + b"." + sig).decode("ascii")

    def verify(self, path: str, body: bytes, signature: str) -> str | None:
        """None if ``signature`` is valid for this path and body, else a reason."""
        if not signature:
            return "missing signature"
        try:
            token = signature.encode("ascii")
        except UnicodeEncodeError:
            return "malformed signature"
        ts_b64, sep, sig_b64 = token.partition(b".")
        if not sep or not ts_b64 or not sig_b64:
            return "malformed signature"
        try:
            sig = base64.urlsafe_b64decode(sig_b64 + b"=" * (-len(sig_b64) % 4))
            ts = int.from_bytes(
                base64.urlsafe_b64decode(ts_b64 + b"=" * (-len(ts_b64) % 4)), "big"
            )
        except (binascii.Error, ValueError):
            return "malformed signature"
        message = _signing_input(path, body) + b"." + ts_b64
        for key in self._verify_keys:
            if hmac.compare_digest(hmac.digest(key, message, "sha256"), sig):
                break
        else:
            return "bad signature"
        if self.max_age is not None and time.time() - ts > self.max_age:
            return "expired signature"
        return None

    def verify_with_itsdangerous(self, path: str, body: bytes, signature: str) -> bool:
        """Check ``signature`` with itsdangerous itself (used by the tests)."""
        try:
            self._signer.unsign(
                _signing_input(path, body) + b"." + signature.encode("ascii"),
                max_age=self.max_age,
            )
        except (BadSignature, SignatureExpired, UnicodeEncodeError):
            return False
        return True


class SignatureAuthenticator:
    """Accepts pushes that carry a valid ``X-TQ-Web-Signature``."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def authenticate(self, request: PushRequest) -> str | None:
        """Verify the signature over the request's full path and body."""
        sig = request.headers.get(SIGNATURE_HEADER.lower(), "")
        return self.signer.verify(request.path, request.body, sig)


class AllowUnauthenticated:
    """Accepts every push (``Dispatcher(allow_unauthenticated=True)``)."""

    def authenticate(self, request: PushRequest) -> str | None:
        """Accept."""
        return None
