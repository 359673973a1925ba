"""The push endpoint as a pure ASGI app (no framework needed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from .push import rejected
from .request import PushRequest, PushResult, full_path

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

__all__ = ["PushASGIApp", "serve_push"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _send(send: Send, result: PushResult) -> None:
    body = result.body
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in result.headers]
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    await send(
        {"type": "http.response.start", "status": result.status, "headers": headers}
    )
    await send({"type": "http.response.body", "body": body})


async def serve_push(
    dispatcher: Dispatcher, scope: Scope, receive: Receive, send: Send
) -> None:
    """Serve one push request (``scope`` is an HTTP scope under ``base_url``)."""
    limit = dispatcher.core.max_body_size
    headers: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        headers[k.decode("latin-1").lower()] = v.decode("latin-1")
    method = scope.get("method", "GET")
    path = full_path(scope.get("path", ""), scope.get("root_path", ""))
    if method != "POST":
        await _send(send, rejected(405, "Method Not Allowed"))
        return
    declared = headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        await _send(send, rejected(413, "Request body too large"))
        return
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                await _send(send, rejected(413, "Request body too large"))
                return
            chunks.append(chunk)
        more = message.get("more_body", False)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    result = await dispatcher.core.call_async(PushRequest(path, body, headers, method))
    await _send(send, result)


class PushASGIApp:
    """Serves ``POST <base_url>...`` for any ASGI server or framework."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            return
        path = full_path(scope.get("path", ""), scope.get("root_path", ""))
        if not path.startswith(self.dispatcher.base_url):
            await _send(send, PushResult(404, "rejected", "Not Found\n"))
            return
        await serve_push(self.dispatcher, scope, receive, send)
