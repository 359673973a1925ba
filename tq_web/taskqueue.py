"""The App Engine task queue API (seed 000) in Python: values and errors.

Backends (:mod:`tq_web.backends`) implement the operations on these values::

    from tq_web import taskqueue as tq

    backend = tq_web.connect("sqlite:///tasks.db")
    added = backend.add(tq.new_post_task("/worker", {"key": "k"}), "default")
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from urllib.parse import urlencode

from ._time import Duration, require_aware, to_timedelta
from .exceptions import InvalidTask, TqWebError

__all__ = [
    "DEFAULT_QUEUE",
    "LeaseExpired",
    "MultiError",
    "PullQueuesNotSupported",
    "QueueStatistics",
    "RetryOptions",
    "Task",
    "TaskAlreadyAdded",
    "TaskNotFound",
    "backoff",
    "new_post_task",
    "retries_exhausted",
]

DEFAULT_QUEUE = "default"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9-]{1,100}$")
METHODS = frozenset({"POST", "GET", "HEAD", "PUT", "DELETE", "PATCH", "PULL"})


class TaskAlreadyAdded(TqWebError):
    """A task with this name exists, or existed recently (a tombstone)."""

    def __init__(self, name: str = "", queue_name: str = "") -> None:
        self.name = name
        self.queue_name = queue_name
        super().__init__(
            f"taskqueue: task {name!r} has already been added to queue {queue_name!r}"
        )


class TaskNotFound(TqWebError, LookupError):
    """``delete`` or ``modify_lease`` named a task that is unknown or tombstoned."""

    def __init__(self, name: str = "", queue_name: str = "") -> None:
        self.name = name
        self.queue_name = queue_name
        super().__init__(f"taskqueue: no task {name!r} in queue {queue_name!r}")


class LeaseExpired(TqWebError):
    """``modify_lease`` was called by a caller whose lease has expired or was lost."""

    def __init__(self, name: str = "", queue_name: str = "") -> None:
        self.name = name
        self.queue_name = queue_name
        super().__init__(
            f"taskqueue: the lease on task {name!r} in queue {queue_name!r} "
            "has expired or belongs to someone else"
        )


class PullQueuesNotSupported(TqWebError, NotImplementedError):
    """The backend (Cloud Tasks) has no pull queues."""


class MultiError(TqWebError):
    """Some operations of a ``*_multi`` call failed.

    Attributes:
        errors: one entry per input task: the exception, or ``None`` where it worked.
        results: for ``add_multi``, the added tasks (``None`` where it failed).
    """

    def __init__(
        self,
        errors: Sequence[BaseException | None],
        results: Sequence[Task | None] | None = None,
    ) -> None:
        self.errors: list[BaseException | None] = list(errors)
        self.results: list[Task | None] = list(results) if results is not None else []
        failed = [e for e in self.errors if e is not None]
        first = f": {failed[0]}" if failed else ""
        more = f" (and {len(failed) - 1} other errors)" if len(failed) > 1 else ""
        super().__init__(f"{len(failed)} of {len(self.errors)} failed{first}{more}")


@dataclass(frozen=True, init=False)
class RetryOptions:
    """How a push task is retried, and when a task fails for good.

    Every field may be ``None``: it then falls back to the task's options, the
    options given to ``register_task``, the queue's, and finally the defaults
    (App Engine's queue.yaml defaults: ``min_backoff`` 0.1 s, ``max_backoff``
    3600 s, ``max_doublings`` 16, no retry or age limit).

    Attributes:
        retry_limit: retries allowed (``0`` never retries; ``None`` no limit).
            For pull tasks it counts leases.
        age_limit: time allowed since the first attempt.
        min_backoff: the first retry delay.
        max_backoff: the largest retry delay.
        max_doublings: how often the delay doubles before it grows linearly.
        apply_zero_max_doublings: kept for parity with the seed; ``max_doublings=0``
            already means zero.
    """

    retry_limit: int | None
    age_limit: timedelta | None
    min_backoff: timedelta | None
    max_backoff: timedelta | None
    max_doublings: int | None
    apply_zero_max_doublings: bool

    def __init__(
        self,
        retry_limit: int | None = None,
        age_limit: Duration | None = None,
        min_backoff: Duration | None = None,
        max_backoff: Duration | None = None,
        max_doublings: int | None = None,
        apply_zero_max_doublings: bool = False,
    ) -> None:
        for fname, ival in (
            ("retry_limit", retry_limit),
            ("max_doublings", max_doublings),
        ):
            if ival is not None and (
                isinstance(ival, bool) or not isinstance(ival, int) or ival < 0
            ):
                raise ValueError(
                    f"{fname} must be a non-negative int or None, got {ival!r}"
                )
        set_ = object.__setattr__
        set_(self, "retry_limit", retry_limit)
        set_(self, "age_limit", to_timedelta(age_limit, "age_limit"))
        set_(self, "min_backoff", to_timedelta(min_backoff, "min_backoff"))
        set_(self, "max_backoff", to_timedelta(max_backoff, "max_backoff"))
        set_(self, "max_doublings", max_doublings)
        set_(self, "apply_zero_max_doublings", bool(apply_zero_max_doublings))
        if (
            self.min_backoff is not None
            and self.max_backoff is not None
            and self.min_backoff > self.max_backoff
        ):
            raise ValueError("min_backoff must not exceed max_backoff")

    def merged(self, fallback: RetryOptions | None) -> RetryOptions:
        """Fill this object's ``None`` fields from ``fallback``, field by field."""
        if fallback is None:
            return self
        return RetryOptions(
            retry_limit=self.retry_limit
            if self.retry_limit is not None
            else fallback.retry_limit,
            age_limit=self.age_limit
            if self.age_limit is not None
            else fallback.age_limit,
            min_backoff=self.min_backoff
            if self.min_backoff is not None
            else fallback.min_backoff,
            max_backoff=self.max_backoff
            if self.max_backoff is not None
            else fallback.max_backoff,
            max_doublings=(
                self.max_doublings
                if self.max_doublings is not None
                else fallback.max_doublings
            ),
            apply_zero_max_doublings=self.apply_zero_max_doublings
            or fallback.apply_zero_max_doublings,
        )

    def to_dict(self) -> dict[str, float | int | None]:
        """A JSON-able form (durations in seconds), for storage."""

        def secs(td: timedelta | None) -> float | None:
            return None if td is None else td.total_seconds()

        out: dict[str, float | int | None] = {
            "retry_limit": self.retry_limit,
            "age_limit": secs(self.age_limit),
            "min_backoff": secs(self.min_backoff),
            "max_backoff": secs(self.max_backoff),
            "max_doublings": self.max_doublings,
        }
        if self.apply_zero_max_doublings:
            out["apply_zero_max_doublings"] = True
        return out

    def to_json(self) -> str:
        """Compact JSON of :meth:`to_dict` (how backends store options)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    @functools.lru_cache(maxsize=256)
    def from_json(cls, text: str) -> RetryOptions | None:
        """Inverse of :meth:`to_json` (cached: stored options repeat a lot)."""
        data = json.loads(text)
        return cls.from_dict(data if isinstance(data, dict) else None)

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> RetryOptions | None:
        """Inverse of :meth:`to_dict` (``None`` stays ``None``)."""
        if data is None:
            return None

        def get(key: str) -> float | int | None:
            v = data.get(key)
            return v if isinstance(v, int | float) and not isinstance(v, bool) else None

        def get_int(key: str) -> int | None:
            v = get(key)
            return None if v is None else int(v)

        return cls(
            retry_limit=get_int("retry_limit"),
            age_limit=get("age_limit"),
            min_backoff=get("min_backoff"),
            max_backoff=get("max_backoff"),
            max_doublings=get_int("max_doublings"),
            apply_zero_max_doublings=data.get("apply_zero_max_doublings") is True,
        )


DEFAULT_RETRY_OPTIONS = RetryOptions(
    retry_limit=None,
    age_limit=None,
    min_backoff=0.1,
    max_backoff=3600,
    max_doublings=16,
)


def backoff(options: RetryOptions | None, retry_count: int) -> timedelta:
    """The delay before retry number ``retry_count`` (1 = the first retry).

    App Engine's rule (Google's SDK stub): the delay doubles from ``min_backoff``
    for ``max_doublings`` retries, then grows linearly by
    ``2**max_doublings * min_backoff`` per retry, capped at ``max_backoff``.
    """
    opts = (options or DEFAULT_RETRY_OPTIONS).merged(DEFAULT_RETRY_OPTIONS)
    assert opts.min_backoff is not None and opts.max_backoff is not None
    doublings = opts.max_doublings if opts.max_doublings is not None else 16
    n = max(1, retry_count)
    exponent = min(n - 1, doublings)
    linear = n - exponent
    seconds = (
        opts.min_backoff.total_seconds() * (2**exponent) * (linear if linear > 1 else 1)
    )
    return min(opts.max_backoff, timedelta(seconds=min(seconds, 10**9)))


def retries_exhausted(
    options: RetryOptions | None, retries_done: int, age: timedelta
) -> bool:
    """Whether a task that failed may not be retried again.

    Args:
        options: the effective options (``None`` fields mean "no limit").
        retries_done: retries already made, not counting the first attempt; the
            question is whether retry number ``retries_done + 1`` may happen.
        age: time since the first attempt.

    A task fails for good only when every limit that is set is exceeded.
    """
    if options is None:
        return False
    exceeded: list[bool] = []
    if options.retry_limit is not None:
        exceeded.append(retries_done + 1 > options.retry_limit)
    if options.age_limit is not None:
        exceeded.append(age > options.age_limit)
    return bool(exceeded) and all(exceeded)


@dataclass(frozen=True)
class QueueStatistics:
    """Statistics about one queue (seed 000 ``QueueStatistics``).

    Attributes:
        tasks: pending and leased tasks (not tombstones or failed tasks).
        oldest_eta: the earliest ETA of those tasks, or ``None``.
        executed_1_minute: tasks completed in the last minute.
        in_flight: tasks leased right now.
        enforced_rate: the queue's rate in tasks per second.
        failed: tasks in the failed state (an addition to the seed).
    """

    tasks: int
    oldest_eta: datetime | None
    executed_1_minute: int
    in_flight: int
    enforced_rate: float
    failed: int = 0


@dataclass
class Task:
    """A task in a queue (seed 000 ``Task``).

    ``method`` is ``"PULL"`` for pull-queue tasks. ``delay`` and ``eta`` may
    not both be set. Backends return new ``Task`` objects with ``name`` and
    ``eta`` filled in and never change the one they are given (except
    ``modify_lease``, which moves ``eta`` to the new lease expiry, as the seed does).

    The fields after ``retry_options`` are filled by backends when they return a
    stored task; they are ignored by ``add``.
    """

    path: str = ""
    payload: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    name: str = ""
    delay: timedelta | None = None
    eta: datetime | None = None
    retry_count: int = 0
    tag: str = ""
    retry_options: RetryOptions | None = None
    # Filled in by backends on stored tasks:
    queue_name: str = ""
    scheduled_eta: datetime | None = None
    """When the task was due (``eta`` is the lease expiry on a leased task)."""
    execution_count: int = 0
    previous_response: int = 0
    retry_reason: str = ""
    first_attempt: datetime | None = None
    state: str = ""
    """``pending``, ``leased``, ``failed`` (see ``tq-web failed``)."""
    last_status: int = 0
    last_response: str = ""

    def __post_init__(self) -> None:
        if self.delay is not None:
            self.delay = to_timedelta(self.delay, "delay")
        if self.eta is not None:
            self.eta = require_aware(self.eta, "eta")

    @property
    def is_pull(self) -> bool:
        """Whether this is a pull-queue task."""
        return self.method.upper() == "PULL"

    def copy(self, **changes: object) -> Task:
        """A shallow copy with ``changes`` applied (headers are copied too)."""
        changes.setdefault("headers", dict(self.headers))
        return replace(self, **changes)  # type: ignore[arg-type]


def validate_queue_name(queue_name: str) -> str:
    """Normalise a queue name (``""`` → ``"default"``) and check its form.

    Raises:
        ValueError: the name is not 1-100 characters of ``[A-Za-z0-9-]``.
    """
    name = queue_name or DEFAULT_QUEUE
    if not isinstance(name, str) or not QUEUE_NAME_RE.match(name):
        raise ValueError(
            f"invalid queue name {queue_name!r}: use 1-100 characters of [A-Za-z0-9-]"
        )
    return name


def validate_for_add(task: Task) -> None:
    """Check a task before it is stored.

    Raises:
        InvalidTask: bad name or method, both delay and ETA, bad types.
    """
    if not isinstance(task, Task):
        raise InvalidTask(
            f"expected a tq_web.taskqueue.Task, got {type(task).__name__}"
        )
    if task.name and not NAME_RE.match(task.name):
        raise InvalidTask(
            f"invalid task name {task.name!r}: use 1-500 characters of [A-Za-z0-9_-]"
        )
    if task.method.upper() not in METHODS:
        raise InvalidTask(f"invalid task method {task.method!r}")
    if task.delay is not None and task.eta is not None:
        raise InvalidTask("taskqueue: both delay and eta are set")
    if not isinstance(task.payload, bytes | bytearray):
        raise InvalidTask("task payload must be bytes")
    for key, value in task.headers.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise InvalidTask("task header names and values must be strings")
        if (
            not key
            or any(c in key for c in "\r\n\x00: ")
            or any(c in value for c in "\r\n\x00")
        ):
            raise InvalidTask(f"invalid task header {key!r}: no CR, LF or NUL allowed")
    if task.eta is not None:
        require_aware(task.eta, "eta")


def new_post_task(
    path: str, params: Mapping[str, object] | Sequence[tuple[str, object]]
) -> Task:
    """A POST task whose body is ``params`` form-encoded (seed ``NewPOSTTask``)."""
    return Task(
        path=path,
        payload=urlencode(params, doseq=True).encode("ascii"),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
