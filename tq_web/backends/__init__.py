"""Backends and :func:`connect`.

Drivers load only when their backend is used: ``import tq_web`` imports none.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..exceptions import InvalidBackendURL
from .base import Backend, BackendBase

__all__ = [
    "DEFAULT_BACKEND_URL",
    "Backend",
    "BackendBase",
    "connect",
    "redact_url",
    "resolve_url",
]

_SECRET_QUERY_KEYS = {"password", "passfile", "sslpassword"}


def redact_url(url: str) -> str:
    """``url`` with passwords (in the user part or the query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            if ":" in user:
                netloc = f"{user.partition(':')[0]}:***@{host}"
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if netloc == parts.netloc and not any(
            k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs
        ):
            return url  # nothing secret (keeps sqlite:/// URLs exactly)
        query = "&".join(
            f"{k}=***" if k.lower() in _SECRET_QUERY_KEYS else f"{k}={v}"
            for k, v in pairs
        )
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return "<unparsable URL>"


DEFAULT_BACKEND_URL = "sqlite:///tq_web.sqlite3"
ENV_BACKEND = "TQ_WEB_BACKEND"

_SCHEMES = ("memory", "sqlite", "postgresql", "postgres", "cloudtasks")


def resolve_url(url: str | None) -> str:
    """The URL to use: ``url``, else ``$TQ_WEB_BACKEND``, else the SQLite default."""
    return url or os.environ.get(ENV_BACKEND) or DEFAULT_BACKEND_URL


def _options(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        try:
            out[key] = float(value) if "." in value else int(value)
        except ValueError:
            out[key] = value
    return out


def connect(url: str | None = None, **options: Any) -> Backend:
    """Open the backend named by ``url``.

    Schemes: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
    ``postgresql://user@host/db``, ``cloudtasks://projects/P/locations/L``.
    Backend options may be given as keyword arguments or in the query string
    (``sqlite:///q.db?tombstone_ttl=600``).

    Raises:
        InvalidBackendURL: the URL is not one of the above.
        MissingDependency: the backend's driver is not installed.
    """
    url = resolve_url(url)
    if not isinstance(url, str):
        raise InvalidBackendURL(f"backend URL must be a string, got {url!r}")
    scheme, sep, _rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        shown = f"scheme {scheme + '://'!r}" if sep else "URL without a scheme"
        raise InvalidBackendURL(
            f"unsupported backend {shown}: use memory://, sqlite:///path.db, "
            "postgresql://..., or cloudtasks://projects/P/locations/L"
        )
    parts = urlsplit(url)
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(url, **{**_options(parts.query), **options})
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend(url, **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresBackend

        backend: Backend = PostgresBackend(url, **options)
        return backend
    raise InvalidBackendURL(
        "the cloudtasks:// backend is not available in this version of tq_web; "
        "use sqlite:// or postgresql:// (see docs/backends.md)"
    )
