"""Task-queue request headers (seed: ``RequestHeaders``) on a context variable."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

from .exceptions import NotInTaskHandler

__all__ = ["RequestHeaders", "parse_request_headers", "request_headers"]


@dataclass(frozen=True)
class RequestHeaders:
    """The task-queue headers of the request a handler is serving.

    Parsed from ``X-AppEngine-<Name>``, else ``X-CloudTasks-<Name>``. Malformed
    values parse as zero or empty; parsing is not trust (see docs/security.md).
    """

    queue_name: str = ""
    task_name: str = ""
    task_retry_count: int = 0
    task_execution_count: int = 0
    task_eta: datetime | None = None
    task_previous_response: int = 0
    task_retry_reason: str = ""
    fail_fast: bool = False


_EMPTY = RequestHeaders()
_current: ContextVar[RequestHeaders] = ContextVar("tq_web.request_headers")


def request_headers() -> RequestHeaders:
    """The task-queue headers of the current task handler.

    Works in sync handlers (also under Starlette's thread pool), async
    handlers, and under Flask.

    Raises:
        NotInTaskHandler: called outside a task handler.
    """
    try:
        return _current.get()
    except LookupError:
        raise NotInTaskHandler(
            "request headers are only available inside a task handler"
        ) from None


@contextmanager
def headers_context(headers: RequestHeaders) -> Iterator[None]:
    """Make ``headers`` current for the duration of the block (token-based reset)."""
    token = _current.set(headers)
    try:
        yield
    finally:
        _current.reset(token)


def _get(h: Mapping[str, str], key: str) -> str:
    v = h.get("x-appengine-" + key)
    if not v:
        v = h.get("x-cloudtasks-" + key)
    return v or ""


def _int(value: str) -> int:
    if not value:
        return 0
    try:
        n = int(value.strip())
    except ValueError:
        return 0
    return n if -(2**63) <= n < 2**63 else 0


def _eta(value: str) -> datetime | None:
    if not value:
        return None
    try:
        secs = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(secs) or secs == 0:
        return None
    try:
        return datetime.fromtimestamp(secs, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def parse_request_headers(headers: Mapping[str, str]) -> RequestHeaders:
    """Parse task-queue headers; ``headers`` has lower-case names.

    Never raises: malformed values become zero, empty or ``None``.
    """
    if not any(k.startswith(("x-appengine-", "x-cloudtasks-")) for k in headers):
        return _EMPTY
    queue = _get(headers, "queuename")
    return RequestHeaders(
        queue_name=queue.rsplit("/", 1)[-1] if "/" in queue else queue,
        task_name=_get(headers, "taskname"),
        task_retry_count=_int(_get(headers, "taskretrycount")),
        task_execution_count=_int(_get(headers, "taskexecutioncount")),
        task_eta=_eta(_get(headers, "tasketa")),
        task_previous_response=_int(_get(headers, "taskpreviousresponse")),
        task_retry_reason=_get(headers, "taskretryreason"),
        fail_fast=bool(headers.get("x-appengine-failfast")),
    )
