"""IO-free request and response values for the push endpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["PushRequest", "PushResult", "full_path"]


@dataclass(frozen=True)
class PushRequest:
    """A push as the core sees it, whatever server received it.

    Attributes:
        path: the full request path (``root_path``/``SCRIPT_NAME`` included).
        body: the raw body.
        headers: header names in lower case (the last value wins).
        method: the HTTP method.
    """

    path: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    method: str = "POST"

    @classmethod
    def from_pairs(
        cls,
        path: str,
        body: bytes,
        pairs: Iterable[tuple[str, str]],
        method: str = "POST",
    ) -> PushRequest:
        """Build a request from ``(name, value)`` pairs in any case."""
        return cls(path, body, {k.lower(): v for k, v in pairs}, method)


@dataclass
class PushResult:
    """What the push endpoint answers, and why.

    Attributes:
        status: the HTTP status (see the status table in docs/handlers.md).
        outcome: ``ok``, ``retry``, ``transient``, ``dropped`` or ``rejected``
            (also sent as the ``X-TQ-Web-Outcome`` header).
        text: the response body text.
        error: the handler's exception, if any.
        type_name: the task's protobuf type, when it was decoded.
    """

    status: int
    outcome: str
    text: str
    error: BaseException | None = None
    type_name: str = ""

    @property
    def body(self) -> bytes:
        """The response body."""
        return self.text.encode("utf-8", "replace")

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Response headers (Content-Type, nosniff, the outcome)."""
        return [
            ("content-type", "text/plain; charset=utf-8"),
            ("x-content-type-options", "nosniff"),
            ("x-tq-web-outcome", self.outcome),
        ]


def full_path(path: str, root_path: str) -> str:
    """The request's full path from an ASGI ``path`` and ``root_path``.

    Starlette and uvicorn put the full path in ``path``; older servers gave it
    relative to ``root_path``. Both are handled.
    """
    if not root_path or path.startswith(root_path):
        return path
    return root_path + path
