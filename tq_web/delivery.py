"""What a push runner sends and decides: shared by the runner and the Scheduler.

Headers follow Cloud Tasks: ``X-CloudTasks-*`` and the ``X-AppEngine-*``
equivalents (queue short name, task name, retry count, execution count, ETA,
and on retries the previous response and retry reason), plus the stored task
headers (Content-Type, the signature).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

from .queues import QueueConfig
from .taskqueue import (
    DEFAULT_RETRY_OPTIONS,
    RetryOptions,
    Task,
    backoff,
    retries_exhausted,
)

__all__ = ["Decision", "decide", "delivery_headers", "effective_retry_options"]

_NAMES = (
    "QueueName",
    "TaskName",
    "TaskRetryCount",
    "TaskExecutionCount",
    "TaskETA",
    "TaskPreviousResponse",
    "TaskRetryReason",
)


def delivery_headers(task: Task, queue_name: str | None = None) -> dict[str, str]:
    """The headers for one delivery attempt of a leased task."""
    queue = queue_name or task.queue_name
    eta = task.scheduled_eta or task.eta
    values = {
        "QueueName": queue,
        "TaskName": task.name,
        "TaskRetryCount": str(max(0, task.retry_count - 1)),
        "TaskExecutionCount": str(task.execution_count),
        "TaskETA": f"{eta.timestamp():.6f}" if eta is not None else "0",
    }
    if task.retry_count > 1:
        values["TaskPreviousResponse"] = str(task.previous_response)
        values["TaskRetryReason"] = task.retry_reason
    out = dict(task.headers)
    for name in _NAMES:
        if name in values:
            out["X-CloudTasks-" + name] = values[name]
            out["X-AppEngine-" + name] = values[name]
    return out


def effective_retry_options(task: Task, queue: QueueConfig | None) -> RetryOptions:
    """The task's options, else the queue's, else the defaults, field by field."""
    return _effective(
        task.retry_options, None if queue is None else queue.retry_options
    )


@functools.lru_cache(maxsize=1024)
def _effective(own: RetryOptions | None, queue: RetryOptions | None) -> RetryOptions:
    return (own or RetryOptions()).merged(queue).merged(DEFAULT_RETRY_OPTIONS)


@dataclass(frozen=True)
class Decision:
    """What to do with a task after an attempt.

    Attributes:
        action: ``done``, ``retry`` or ``fail``.
        eta: when to retry (for ``retry``).
        reason: the retry reason sent on the next attempt, or why it failed.
    """

    action: str
    eta: datetime | None = None
    reason: str = ""
    executed: bool = True


def decide(
    task: Task,
    status: int,
    outcome: str,
    now: datetime,
    options: RetryOptions,
    *,
    response_ok: bool = True,
) -> Decision:
    """Apply the status table to an attempt.

    2xx is done, except a 202 marked ``X-TQ-Web-Outcome: dropped``, which fails
    the task for good (kept in the failed state). Anything else (or no response:
    ``response_ok=False``) is retried with backoff until every set limit is
    exceeded.
    """
    if response_ok and 200 <= status < 300:
        if outcome == "dropped":
            return Decision("fail", None, "dropped by the handler")
        return Decision("done")
    retries_done = max(0, task.retry_count - 1)
    age = now - (task.first_attempt or now)
    if retries_exhausted(options, retries_done, age):
        return Decision("fail", None, "retries exhausted")
    delay: timedelta = backoff(options, retries_done + 1)
    reason = "task handler failed" if response_ok else "request failed or timed out"
    # Like Cloud Tasks' execution count: responses received, 5xx excluded.
    executed = response_ok and not 500 <= status < 600
    return Decision("retry", now + delay, reason, executed)
