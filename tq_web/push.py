"""The push endpoint's core: bytes and headers in, a status out.

Every adapter (ASGI, WSGI, Flask, Starlette), the runner's loopback path and
the testing Scheduler call this one place, and :func:`result_for` is the one
function that maps outcomes to statuses:

=====================================================  ======  ==================
outcome                                                status  the queue will
=====================================================  ======  ==================
handler returned                                       200     drop the task (done)
raised ``Retry`` (or tagged; wins over Transient)      409     retry
raised ``Transient`` (or tagged)                       500     retry
raised any other ``Exception``                         202     drop it (logged)
bad body / unknown type / no handler                   202     drop it (logged)
not authenticated                                      403     retry
body larger than the limit                             413     retry
=====================================================  ======  ==================
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from .codec import DecodeError, decode
from .exceptions import Retry, Transient
from .headers import RequestHeaders, headers_context, parse_request_headers
from .request import PushRequest, PushResult
from .taskqueue import RetryOptions

__all__ = ["DEFAULT_MAX_BODY_SIZE", "PushCore", "Registration", "result_for"]

log = logging.getLogger("tq_web")

DEFAULT_MAX_BODY_SIZE = 1 << 20

Handler = Callable[[Any], Any]


@dataclass(frozen=True)
class Registration:
    """A registered task type."""

    type_name: str
    prototype: type[Message]
    handler: Handler
    queue: str
    retry_options: RetryOptions | None
    is_async: bool


OK = PushResult(200, "ok", "OK\n")


def describe(error: BaseException) -> str:
    """``str(error)``, or the type name when the exception cannot be shown."""
    try:
        return str(error)
    except Exception:
        return f"<{type(error).__name__}: unprintable>"


def loggable_path(path: str) -> str:
    """A request path safe to log: escaped (no forged lines) and bounded."""
    shown = path[:200].encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown + ("…" if len(path) > 200 else "")


def result_for(
    error: BaseException | None, *, retry_untagged: bool = False, type_name: str = ""
) -> PushResult:
    """Map a handler's outcome to the status table (the only such mapping)."""
    if error is None:
        return PushResult(200, "ok", "OK\n", None, type_name)
    if Retry.is_tagged(error):
        return PushResult(
            409,
            "retry",
            f"The handler asked for retry: {describe(error)}\n",
            error,
            type_name,
        )
    if Transient.is_tagged(error):
        return PushResult(
            500, "transient", f"Transient error: {describe(error)}\n", error, type_name
        )
    if retry_untagged:
        return PushResult(
            500, "transient", f"Error: {describe(error)}\n", error, type_name
        )
    return PushResult(
        202, "dropped", f"Fatal error: {describe(error)}\n", error, type_name
    )


def rejected(status: int, text: str) -> PushResult:
    """A request refused before any handler ran (403, 405, 413)."""
    return PushResult(status, "rejected", text + "\n")


def bad_payload(reason: str) -> PushResult:
    """A body that cannot run (202: dropped, not retried)."""
    return PushResult(202, "dropped", f"Bad payload, can't deserialize: {reason}\n")


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    """One event loop in a daemon thread, shared by every sync caller."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="tq_web-async-handlers", daemon=True
            )
            thread.start()
            _loop = loop
        return _loop


def run_coroutine_blocking(coro: Any) -> Any:
    """Run a coroutine to completion from sync code (Flask, the Scheduler).

    Coroutines run on one long-lived event loop in a background thread (so
    loop-bound resources such as connection pools survive between tasks),
    in a copy of the caller's context (request headers included).
    """
    ctx = contextvars.copy_context()

    async def in_context() -> Any:
        return await coro

    loop = _background_loop()
    future = ctx.run(asyncio.run_coroutine_threadsafe, in_context(), loop)
    return future.result()


class PushCore:
    """Authenticates, decodes and runs pushes; maps results to statuses."""

    def __init__(
        self,
        lookup: Callable[[str], Registration | None],
        authenticate: Callable[[PushRequest], str | None],
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        retry_untagged: bool = False,
        log_task_bodies: bool = False,
    ) -> None:
        self.lookup = lookup
        self.authenticate = authenticate
        self.max_body_size = max_body_size
        self.retry_untagged = retry_untagged
        self.log_task_bodies = log_task_bodies
        # Set when an authenticator may block (an OIDC certificate fetch): the
        # async path then runs the checks in a worker thread, off the event loop.
        self.auth_may_block: Callable[[], bool] = lambda: False

    def _proto_lookup(self, type_name: str) -> type[Message] | None:
        reg = self.lookup(type_name)
        return None if reg is None else reg.prototype

    def prepare(
        self, request: PushRequest, *, trusted: bool = False
    ) -> PushResult | tuple[Registration, Message, RequestHeaders]:
        """Run the checks, in order: method, size (413), auth (403), decode (202).

        Returns a final result, or what is needed to call the handler.
        """
        if request.method != "POST":
            return rejected(405, "Method Not Allowed")
        if len(request.body) > self.max_body_size:
            return rejected(413, "Request body too large")
        if not trusted:
            reason = self.authenticate(request)
            if reason is not None:
                return rejected(403, "Forbidden")
        try:
            type_name, message = decode(request.body, self._proto_lookup)
        except DecodeError as err:
            # Parse errors may quote body values: log them only when allowed.
            if self.log_task_bodies:
                log.error(
                    "tq_web: dropping push to %s: %s", loggable_path(request.path), err
                )
            else:
                log.error(
                    "tq_web: dropping push to %s: undecodable body",
                    loggable_path(request.path),
                )
            return bad_payload(str(err))
        reg = self.lookup(type_name)
        if reg is None:  # pragma: no cover - decode already checked
            return bad_payload(f"no handler for type {type_name!r}")
        headers = parse_request_headers(request.headers)
        if self.log_task_bodies:
            log.debug(
                "tq_web: task %s (exec count %d): %r",
                type_name,
                headers.task_execution_count,
                request.body,
            )
        return reg, message, headers

    def finish(self, reg: Registration, error: BaseException | None) -> PushResult:
        """The result for a handler outcome, logged."""
        result = result_for(
            error, retry_untagged=self.retry_untagged, type_name=reg.type_name
        )
        if result.outcome == "dropped":
            log.error(
                "tq_web: task %s failed for good (not retried)",
                reg.type_name,
                exc_info=error,
            )
        elif result.outcome != "ok":
            log.warning(
                "tq_web: task %s will be retried: %s",
                reg.type_name,
                result.text.strip(),
            )
        return result

    def call_sync(self, request: PushRequest, *, trusted: bool = False) -> PushResult:
        """Handle a push from sync code (WSGI, the Scheduler)."""
        prepared = self.prepare(request, trusted=trusted)
        if isinstance(prepared, PushResult):
            return prepared
        reg, message, headers = prepared
        error: BaseException | None = None
        with headers_context(headers):
            try:
                out = reg.handler(message)
                if inspect.isawaitable(out):
                    run_coroutine_blocking(out)
            except Exception as err:
                error = err
        return self.finish(reg, error)

    async def call_async(
        self, request: PushRequest, *, trusted: bool = False
    ) -> PushResult:
        """Handle a push from async code (ASGI); sync handlers run in a thread."""
        if not trusted and self.auth_may_block():
            prepared = await asyncio.to_thread(self.prepare, request)
        else:
            prepared = self.prepare(request, trusted=trusted)
        if isinstance(prepared, PushResult):
            return prepared
        reg, message, headers = prepared
        error: BaseException | None = None
        try:
            if reg.is_async:
                with headers_context(headers):
                    await reg.handler(message)
            else:
                await asyncio.to_thread(_call_in_context, reg.handler, message, headers)
        except Exception as err:
            error = err
        return self.finish(reg, error)


def _call_in_context(
    handler: Handler, message: Message, headers: RequestHeaders
) -> None:
    with headers_context(headers):
        out = handler(message)
        if inspect.isawaitable(out):
            run_coroutine_blocking(out)
