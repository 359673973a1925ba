"""Testing helper (seed: ``tqtesting``): run tasks in-process on a fake clock.

::

    with tq_web.testing.Scheduler(dispatcher) as sched:
        dispatcher.add_task(tq_web.Task(Duration(seconds=1), delay=30))
        executed = sched.run()
        assert [i.status for i in executed] == [200]

The Scheduler swaps in an in-memory queue, runs tasks in ETA order (then by
name) through the real push path and status table, retries retriable outcomes
with backoff on the fake clock, and keeps dedup and tombstones as production
does. It is trusted: it needs no key and no ``allow_unauthenticated``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from . import taskqueue as tq
from .backends.memory import MemoryBackend
from .codec import DecodeError, decode
from .delivery import decide, delivery_headers, effective_retry_options
from .exceptions import TqWebError
from .request import PushRequest, PushResult

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

__all__ = ["ScheduledTask", "Scheduler", "SchedulerError"]

log = logging.getLogger("tq_web")

_LEASE = timedelta(days=365 * 100)


class SchedulerError(TqWebError):
    """The Scheduler cannot run a task (no handler, not a tq_web task)."""

    def __init__(self, message: str, item: ScheduledTask | None = None) -> None:
        super().__init__(message)
        self.item = item


@dataclass
class ScheduledTask:
    """A task in the Scheduler's queue, or one attempt that ran.

    Attributes:
        task: the stored :class:`tq_web.taskqueue.Task` (path, payload bytes, name,
            eta, headers).
        payload: the decoded message, or None when it is not a tq_web task or
            has no handler.
        queue: the queue name.
        status: the HTTP status of the attempt (items returned by ``run``).
        result: the push result of the attempt.
    """

    task: tq.Task
    payload: Message | None
    queue: str
    status: int | None = None
    result: PushResult | None = field(default=None, repr=False)

    @property
    def eta(self) -> datetime | None:
        """When the task is due."""
        return self.task.scheduled_eta or self.task.eta

    @property
    def name(self) -> str:
        """The task name."""
        return self.task.name


class Scheduler:
    """Runs a dispatcher's tasks in-process on a fake clock (a context manager).

    Args:
        dispatcher: the dispatcher whose backend is swapped for an in-memory one.
        now: the fake clock's start (default: the real time now).
        unknown_task_handler: called with the ``tq.Task`` of tasks that have no
            handler (else ``run`` raises :class:`SchedulerError`).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        now: datetime | None = None,
        unknown_task_handler: Callable[[tq.Task], Any] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        start = now or datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        self._now = start.astimezone(UTC)
        self._clock_lock = threading.Lock()
        self.unknown_task_handler = unknown_task_handler
        self.backend = MemoryBackend(clock=lambda: self._now)
        self._previous: Any = None
        self._entered = False

    # --- context manager ---
    def __enter__(self) -> Scheduler:
        self._previous = self.dispatcher._swap_backend(self.backend)
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.dispatcher._swap_backend(self._previous)
        self._entered = False

    # --- clock ---
    @property
    def now(self) -> datetime:
        """The fake clock's time (it only moves forward)."""
        return self._now

    def _advance(self, to: datetime) -> None:
        with self._clock_lock:
            if to > self._now:
                self._now = to

    # --- inspection ---
    def _item(self, task: tq.Task) -> ScheduledTask:
        payload: Message | None = None
        if task.path.startswith(self.dispatcher.base_url):
            try:
                payload = decode(task.payload, self._lookup)[1]
            except DecodeError:
                payload = None
        return ScheduledTask(task=task, payload=payload, queue=task.queue_name)

    def _lookup(self, type_name: str) -> type[Message] | None:
        reg = self.dispatcher.registration(type_name)
        return None if reg is None else reg.prototype

    def tasks(self) -> list[ScheduledTask]:
        """Scheduled push tasks, sorted by ETA then name."""
        raw = [
            t
            for t in self.backend.list_tasks(None, "pending", 1 << 30)
            if not t.is_pull
        ]
        raw.sort(key=lambda t: (t.scheduled_eta or t.eta, t.name))
        return [self._item(t) for t in raw]

    # --- running ---
    def run(
        self,
        stop_when_drained: bool = True,
        stop_before: Callable[[ScheduledTask], bool] | None = None,
        stop_after: Callable[[ScheduledTask], bool] | None = None,
        until: datetime | None = None,
        *,
        raise_on_error: bool = True,
        max_attempts: int = 20,
    ) -> list[ScheduledTask]:
        """Execute tasks in ETA order, advancing the fake clock.

        Args:
            stop_when_drained: return when no task is left (else wait for tasks
                added by other threads).
            stop_before: called with the next item; True stops before running it.
            stop_after: called with each executed item; True stops after it.
            until: tasks due after this fake-clock time stay pending.
            raise_on_error: an untagged handler exception stops the run and is
                raised, with the item attached as ``exc.tq_web_item``; False
                applies the status table (202, dropped).
            max_attempts: give up on a task after this many attempts (it is
                dropped into the failed state).

        Returns:
            One item per attempt, each with ``.status``.

        Raises:
            SchedulerError: a task has no handler and no ``unknown_task_handler``.
        """
        if not self._entered:
            raise SchedulerError(
                "use the Scheduler as a context manager: with Scheduler(d) as s"
            )
        if until is not None and until.tzinfo is None:
            raise ValueError("until must be timezone-aware")
        executed: list[ScheduledTask] = []
        while True:
            pending = self.tasks()
            if not pending:
                if stop_when_drained:
                    return executed
                with self.backend.changed:
                    self.backend.changed.wait(0.05)
                continue
            nxt = pending[0]
            due = nxt.eta or self._now
            if until is not None and due > until:
                return executed
            if stop_before is not None and stop_before(nxt):
                return executed
            self._advance(due)
            leased = self.backend.lease_push(1, _LEASE)
            if not leased:  # pragma: no cover - the clock made it due
                continue
            task = leased[0]
            item = self._item(task)
            if item.payload is None:
                if self.unknown_task_handler is None:
                    self.backend.retry_later(
                        task, task.queue_name, due, 0, "", executed=False
                    )
                    raise SchedulerError(
                        f"unrecognized TQ task for handler at {task.path}", item
                    )
                self.unknown_task_handler(task)
                self.backend.complete(task, task.queue_name)
                item.status = 200
                executed.append(item)
            else:
                self._attempt(item, max_attempts)
                executed.append(item)
                result = item.result
                if (
                    raise_on_error
                    and result is not None
                    and result.outcome == "dropped"
                    and result.error is not None
                ):
                    err = result.error
                    err.tq_web_item = item  # type: ignore[attr-defined]
                    raise err
            if stop_after is not None and stop_after(item):
                return executed

    def _attempt(self, item: ScheduledTask, max_attempts: int) -> None:
        task = item.task
        request = PushRequest(
            task.path,
            task.payload,
            {k.lower(): v for k, v in delivery_headers(task).items()},
        )
        result = self.dispatcher.core.call_sync(request, trusted=True)
        item.status, item.result = result.status, result
        options = effective_retry_options(
            task, self.dispatcher.queue_configs.get(task.queue_name)
        )
        decision = decide(task, result.status, result.outcome, self._now, options)
        if decision.action == "retry" and task.retry_count >= max_attempts > 0:
            log.warning(
                "tq_web.testing: task %s gave up after %d attempts",
                task.name,
                task.retry_count,
            )
            self.backend.fail(task, task.queue_name, result.status, result.text)
        elif decision.action == "retry":
            assert decision.eta is not None
            self.backend.retry_later(
                task,
                task.queue_name,
                decision.eta,
                result.status,
                decision.reason,
                executed=decision.executed,
            )
        elif decision.action == "fail":
            self.backend.fail(task, task.queue_name, result.status, result.text)
        else:
            self.backend.complete(task, task.queue_name)

    def failed(self) -> list[ScheduledTask]:
        """Tasks that failed for good (dropped, or out of retries)."""
        return [self._item(t) for t in self.backend.list_tasks(None, "failed", 1 << 30)]
