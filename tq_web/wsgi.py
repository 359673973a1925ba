"""The push endpoint as a WSGI app (no framework needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .push import rejected
from .request import PushRequest, PushResult

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

__all__ = ["PushWSGIApp", "push_request_from_environ"]

StartResponse = Callable[..., Any]
_STATUS = {
    200: "200 OK",
    202: "202 Accepted",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    413: "413 Content Too Large",
    500: "500 Internal Server Error",
}


def environ_path(environ: dict[str, Any]) -> str:
    """The full request path (``SCRIPT_NAME`` + ``PATH_INFO``), as sent."""
    raw = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    try:
        return str(raw.encode("latin-1").decode("utf-8"))
    except UnicodeError:
        return str(raw)


def push_request_from_environ(
    environ: dict[str, Any], limit: int
) -> PushRequest | PushResult:
    """Read a push from a WSGI environ; a 405/413 result if it cannot be read."""
    method = environ.get("REQUEST_METHOD", "GET")
    if method != "POST":
        return rejected(405, "Method Not Allowed")
    raw_length = str(environ.get("CONTENT_LENGTH") or "").strip()
    if raw_length and not (raw_length.isascii() and raw_length.isdigit()):
        return rejected(413, "Request body too large")
    length = int(raw_length or 0)
    if length > limit:
        return rejected(413, "Request body too large")
    stream = environ["wsgi.input"]
    if length:
        body = stream.read(length)
    elif environ.get("wsgi.input_terminated"):
        body = stream.read(limit + 1)
    else:
        body = b""
    if len(body) > limit:
        return rejected(413, "Request body too large")
    headers = {
        k[5:].replace("_", "-").lower(): v
        for k, v in environ.items()
        if k.startswith("HTTP_")
    }
    if "CONTENT_TYPE" in environ:
        headers["content-type"] = environ["CONTENT_TYPE"]
    return PushRequest(environ_path(environ), body, headers, method)


class PushWSGIApp:
    """Serves ``POST <base_url>...`` for any WSGI server or framework."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def __call__(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        if not environ_path(environ).startswith(self.dispatcher.base_url):
            result = PushResult(404, "rejected", "Not Found\n")
        else:
            req = push_request_from_environ(environ, self.dispatcher.core.max_body_size)
            result = (
                req
                if isinstance(req, PushResult)
                else self.dispatcher.core.call_sync(req)
            )
        body = result.body
        headers = [*result.headers, ("content-length", str(len(body)))]
        start_response(_STATUS.get(result.status, f"{result.status} Status"), headers)
        return [body]
