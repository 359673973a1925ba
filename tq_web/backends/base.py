"""The backend protocol: the seed-000 task queue API plus what a runner needs.

A backend stores tasks in named queues. Push tasks (any method but ``PULL``)
are delivered by a runner (tq_web's own, for memory/SQLite/PostgreSQL) or by
Google Cloud Tasks. Pull tasks are leased by the application.

State model shared by every backend:

* ``pending``: waiting; available when ``eta <= now``. A leased task is pending
  with ``eta`` moved to its lease expiry, so an expired lease makes it
  available again (a crashed leaseholder loses nothing). The lease expiry is
  also the lease token: ``modify_lease`` and the runner's ``retry_later``/``fail``
  act only if the stored ``eta`` still equals the caller's ``task.eta``.
* ``done`` (a tombstone): the task ran or was deleted; its name stays taken
  for ``tombstone_ttl`` (default one hour), then it is forgotten.
* ``failed``: retries exhausted or dropped by the handler (202); kept with its
  last status and response text for ``failed_ttl`` (default seven days); its
  name stays taken; ``requeue_failed`` makes it pending again.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

from .._time import Duration, to_timedelta, utcnow
from ..queues import QueueConfig
from ..taskqueue import (
    DEFAULT_RETRY_OPTIONS,
    QueueStatistics,
    RetryOptions,
    Task,
    validate_for_add,
    validate_queue_name,
)

__all__ = ["Backend", "BackendBase", "Clock"]

Clock = Callable[[], datetime]
P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_TOMBSTONE_TTL = timedelta(hours=1)
DEFAULT_FAILED_TTL = timedelta(days=7)


@runtime_checkable
class Backend(Protocol):
    """What every backend implements (``tq_web.connect()`` returns one)."""

    url: str

    # --- seed 000 ---
    def add(self, task: Task, queue_name: str = "") -> Task:
        """Add a task; return a new Task with name and eta filled in.

        Raises:
            TaskAlreadyAdded: the name is taken (or tombstoned).
            ValueError: the task is malformed.
        """
        ...

    def add_multi(self, tasks: Sequence[Task], queue_name: str = "") -> list[Task]:
        """Add several tasks, each independently (not atomic).

        Raises:
            MultiError: one entry per task, ``None`` where it worked.
        """
        ...

    def delete(self, task: Task, queue_name: str = "") -> None:
        """Delete a task by name, leaving a tombstone.

        Raises:
            TaskNotFound: unknown or already tombstoned.
        """
        ...

    def delete_multi(self, tasks: Sequence[Task], queue_name: str = "") -> None:
        """Delete several tasks. Raises MultiError if any failed."""
        ...

    def lease(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration
    ) -> list[Task]:
        """Lease up to ``max_tasks`` due pull tasks (earliest ETA first)."""
        ...

    def lease_by_tag(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration, tag: str = ""
    ) -> list[Task]:
        """Lease due pull tasks with ``tag`` (``""``: the earliest task's tag)."""
        ...

    def modify_lease(
        self, task: Task, queue_name: str, lease_seconds: Duration
    ) -> None:
        """Extend or give back (``0``) a lease; moves ``task.eta`` to the new expiry.

        Raises:
            TaskNotFound: no such task.
            LeaseExpired: the caller's lease has expired or was taken over.
        """
        ...

    def purge(self, queue_name: str) -> None:
        """Remove every pending task of a queue (tombstones and failed stay)."""
        ...

    def queue_stats(self, queue_names: Sequence[str]) -> list[QueueStatistics]:
        """Statistics for each named queue, in order."""
        ...

    # --- runner and tooling ---
    def lease_push(
        self,
        max_tasks: int,
        lease_seconds: Duration,
        queue_names: Sequence[str] | None = None,
    ) -> list[Task]:
        """Lease due push tasks of the given queues (all when None), earliest first.

        Each returned task has ``queue_name``, ``eta`` = the lease expiry (the
        lease token), ``scheduled_eta`` = when it was due, ``retry_count`` = leases
        so far including this one (as for pull tasks; the retry-count header is one
        less), ``execution_count``, ``previous_response``, ``retry_reason`` and
        ``first_attempt`` (set to now on the first lease).
        """
        ...

    def complete(self, task: Task, queue_name: str) -> None:
        """Mark a leased task done (a tombstone), whoever holds the lease now."""
        ...

    def complete_many(self, tasks: Sequence[Task]) -> None:
        """:meth:`complete` for several tasks (each names its ``queue_name``)."""
        ...

    def retry_later(
        self,
        task: Task,
        queue_name: str,
        eta: datetime,
        status: int,
        reason: str,
        *,
        executed: bool = True,
    ) -> bool:
        """Give a leased task back for a retry at ``eta``.

        Records ``status`` as the previous response and ``reason`` as the retry
        reason, and increments the execution count when ``executed`` (the handler
        answered rather than the request failing; the retry count was counted by
        ``lease_push``). Returns False, doing nothing, when the caller's lease was
        lost (``task.eta`` is no longer the stored lease expiry).
        """
        ...

    def fail(self, task: Task, queue_name: str, status: int, response: str) -> bool:
        """Move a leased task to the failed state. False if the lease was lost."""
        ...

    def list_tasks(
        self, queue_name: str | None = None, state: str = "pending", limit: int = 100
    ) -> list[Task]:
        """Tasks in a state (``pending``, ``failed``, ``done``), earliest ETA first."""
        ...

    def requeue_failed(
        self, queue_name: str | None = None, names: Sequence[str] | None = None
    ) -> int:
        """Make failed tasks pending again, due now; return how many."""
        ...

    def next_eta(self, queue_names: Sequence[str] | None = None) -> datetime | None:
        """The earliest ETA of pending push tasks (leased ones included)."""
        ...

    def queue_names(self) -> list[str]:
        """Every queue that holds or held tasks, sorted."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


class BackendBase:
    """Shared behaviour: option handling, validation, names, async wrappers."""

    url: str = ""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        tombstone_ttl: Duration = DEFAULT_TOMBSTONE_TTL,
        failed_ttl: Duration = DEFAULT_FAILED_TTL,
        queues: dict[str, QueueConfig] | None = None,
    ) -> None:
        self.clock: Clock = clock or utcnow
        self.tombstone_ttl: timedelta = (
            to_timedelta(tombstone_ttl, "tombstone_ttl") or timedelta()
        )
        self.failed_ttl: timedelta = (
            to_timedelta(failed_ttl, "failed_ttl") or timedelta()
        )
        self.queues: dict[str, QueueConfig] = dict(queues or {})

    # --- helpers for implementations ---
    def now(self) -> datetime:
        """The backend's current time."""
        return self.clock()

    def configure_queue(self, config: QueueConfig) -> None:
        """Record a queue's configuration (its rate and retry parameters)."""
        self.queues[config.name] = config

    def queue_config(self, queue_name: str) -> QueueConfig:
        """The queue's configuration, or the defaults."""
        return self.queues.get(queue_name) or QueueConfig(name=queue_name)

    def new_name(self) -> str:
        """A unique task name for an unnamed task."""
        return uuid.uuid4().hex

    @staticmethod
    def queue(queue_name: str) -> str:
        """Normalise and check a queue name."""
        return validate_queue_name(queue_name)

    def prepare(self, task: Task, queue_name: str, now: datetime) -> Task:
        """Validate ``task`` and return the copy to store (name, eta filled)."""
        validate_for_add(task)
        eta = task.eta
        if eta is None:
            eta = now + task.delay if task.delay is not None else now
        return Task(
            path=task.path,
            payload=bytes(task.payload),
            headers=dict(task.headers),
            method=(task.method or "POST").upper(),
            name=task.name or self.new_name(),
            delay=None,
            eta=eta,
            retry_count=0,
            tag=task.tag,
            retry_options=task.retry_options,
            queue_name=queue_name,
            scheduled_eta=eta,
            state="pending",
        )

    def pull_retry_limit(
        self, task_options: RetryOptions | None, queue_name: str
    ) -> int | None:
        """The lease limit of a pull task, or None for no limit."""
        opts = (task_options or RetryOptions()).merged(
            self.queue_config(queue_name).retry_options
        )
        return opts.merged(DEFAULT_RETRY_OPTIONS).retry_limit

    # --- pull leases: shared argument handling, backends implement _lease ---
    def lease(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration
    ) -> list[Task]:
        """Lease up to ``max_tasks`` due pull tasks (earliest ETA first).

        Each lease increments ``retry_count``; a task over its retry limit
        moves to the failed state instead.
        """
        return self._checked_lease(max_tasks, queue_name, lease_seconds, None)

    def lease_by_tag(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration, tag: str = ""
    ) -> list[Task]:
        """Lease due pull tasks with ``tag`` (``""``: the earliest task's tag)."""
        return self._checked_lease(max_tasks, queue_name, lease_seconds, tag)

    def _checked_lease(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration, tag: str | None
    ) -> list[Task]:
        if max_tasks < 1:
            raise ValueError("max_tasks must be >= 1")
        return self._lease(max_tasks, queue_name, lease_seconds, tag)

    def _lease(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration, tag: str | None
    ) -> list[Task]:
        """Lease pull tasks; ``tag`` None means any tag."""
        raise NotImplementedError

    @staticmethod
    def lease_duration(lease_seconds: Duration) -> timedelta:
        """A lease length as a timedelta (``0`` gives the task back)."""
        return to_timedelta(lease_seconds, "lease_seconds") or timedelta()

    def complete_many(self, tasks: Sequence[Task]) -> None:
        """Mark several leased tasks done (each names its ``queue_name``).

        Backends override this to use one transaction for the batch.
        """
        complete = getattr(self, "complete")  # noqa: B009 - defined by subclasses
        for task in tasks:
            complete(task, task.queue_name)

    def signing_key(self) -> str | None:
        """A key shared by every process on this store, or None (see SQLite)."""
        return None

    @staticmethod
    def generate_key() -> str:
        """A fresh random signing key."""
        return secrets.token_urlsafe(32)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release resources (nothing by default)."""


async def run_sync(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run a blocking backend call in a worker thread (never blocks the loop)."""
    return await asyncio.to_thread(functools.partial(func, *args, **kwargs))
