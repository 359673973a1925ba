"""The in-memory backend (``memory://``): the whole seed-000 API, for tests.

Each ``connect("memory://")`` is its own store. Thread-safe; nothing survives
the process. The testing Scheduler runs on it with a fake clock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .._time import Duration
from ..taskqueue import (
    LeaseExpired,
    MultiError,
    QueueStatistics,
    Task,
    TaskAlreadyAdded,
    TaskNotFound,
)
from .base import BackendBase

__all__ = ["MemoryBackend"]


@dataclass
class _Rec:
    task: Task  # the stored copy; its eta is the lease expiry while leased
    state: str = "pending"  # pending | done | failed
    leased: bool = False
    expires: datetime | None = None  # for done/failed: when the name is freed


class MemoryBackend(BackendBase):
    """A backend that keeps its queues in a dict."""

    def __init__(self, url: str = "memory://", **options: Any) -> None:
        super().__init__(**options)
        self.url = url
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self._q: dict[str, dict[str, _Rec]] = {}
        self._executed: dict[str, deque[datetime]] = {}
        self._seq = 0

    def new_name(self) -> str:
        """Names for unnamed tasks increase with each add (a stable order in tests)."""
        self._seq += 1
        return f"task-{self._seq:012d}"

    # --- internals ---
    def _queue(self, queue_name: str) -> dict[str, _Rec]:
        return self._q.setdefault(self.queue(queue_name), {})

    def _expire(self, now: datetime) -> None:
        for recs in self._q.values():
            dead = [
                n for n, r in recs.items() if r.expires is not None and r.expires <= now
            ]
            for n in dead:
                del recs[n]

    @staticmethod
    def _out(rec: _Rec) -> Task:
        t = rec.task.copy()
        t.state = rec.state if rec.state != "pending" or not rec.leased else "leased"
        return t

    def _add_locked(self, task: Task, queue_name: str, now: datetime) -> Task:
        q = self.queue(queue_name)
        stored = self.prepare(task, q, now)
        recs = self._queue(q)
        old = recs.get(stored.name)
        if old is not None and (old.expires is None or old.expires > now):
            raise TaskAlreadyAdded(stored.name, q)
        recs[stored.name] = _Rec(task=stored)
        return stored.copy()

    # --- seed 000 ---
    def add(self, task: Task, queue_name: str = "") -> Task:
        with self._lock:
            out = self._add_locked(task, queue_name, self.now())
            self.changed.notify_all()
            return out

    def add_multi(self, tasks: Sequence[Task], queue_name: str = "") -> list[Task]:
        results: list[Task | None] = []
        errors: list[BaseException | None] = []
        with self._lock:
            now = self.now()
            for t in tasks:
                try:
                    results.append(self._add_locked(t, queue_name, now))
                    errors.append(None)
                except (TaskAlreadyAdded, ValueError) as err:
                    results.append(None)
                    errors.append(err)
            self.changed.notify_all()
        if any(e is not None for e in errors):
            raise MultiError(errors, results)
        return [r for r in results if r is not None]

    def _delete_locked(self, task: Task, queue_name: str, now: datetime) -> None:
        q = self.queue(queue_name)
        rec = self._queue(q).get(task.name) if task.name else None
        if (
            rec is None
            or rec.state == "done"
            or (rec.expires is not None and rec.expires <= now)
        ):
            raise TaskNotFound(task.name, q)
        rec.state, rec.leased, rec.expires = "done", False, now + self.tombstone_ttl

    def delete(self, task: Task, queue_name: str = "") -> None:
        with self._lock:
            self._delete_locked(task, queue_name, self.now())

    def delete_multi(self, tasks: Sequence[Task], queue_name: str = "") -> None:
        errors: list[BaseException | None] = []
        with self._lock:
            now = self.now()
            for t in tasks:
                try:
                    self._delete_locked(t, queue_name, now)
                    errors.append(None)
                except TaskNotFound as err:
                    errors.append(err)
        if any(e is not None for e in errors):
            raise MultiError(errors)

    def _lease(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration, tag: str | None
    ) -> list[Task]:
        lease = self.lease_duration(lease_seconds)
        q = self.queue(queue_name)
        limit = None
        with self._lock:
            now = self.now()
            recs = self._queue(q)
            due = sorted(
                (
                    r
                    for r in recs.values()
                    if r.state == "pending"
                    and r.task.is_pull
                    and r.task.eta is not None
                    and r.task.eta <= now
                ),
                key=lambda r: (r.task.eta, r.task.name),
            )
            if tag == "" and due:
                tag = due[0].task.tag
            out: list[Task] = []
            for r in due:
                if len(out) >= max_tasks:
                    break
                if tag is not None and r.task.tag != tag:
                    continue
                limit = self.pull_retry_limit(r.task.retry_options, q)
                if limit is not None and r.task.retry_count >= limit + 1:
                    r.state, r.leased, r.expires = (
                        "failed",
                        False,
                        now + self.failed_ttl,
                    )
                    r.task.last_response = "lease limit exceeded"
                    continue
                r.task.retry_count += 1
                r.task.eta = now + lease
                r.leased = True
                out.append(self._out(r))
            return out

    def modify_lease(
        self, task: Task, queue_name: str, lease_seconds: Duration
    ) -> None:
        lease = self.lease_duration(lease_seconds)
        q = self.queue(queue_name)
        with self._lock:
            now = self.now()
            rec = self._queue(q).get(task.name)
            if rec is None or rec.state != "pending":
                raise TaskNotFound(task.name, q)
            if (
                not rec.leased
                or rec.task.eta != task.eta
                or rec.task.eta is None
                or rec.task.eta <= now
            ):
                raise LeaseExpired(task.name, q)
            rec.task.eta = now + lease
            rec.leased = lease > timedelta(0)
            task.eta = rec.task.eta
            self.changed.notify_all()

    def purge(self, queue_name: str) -> None:
        q = self.queue(queue_name)
        with self._lock:
            recs = self._queue(q)
            for n in [n for n, r in recs.items() if r.state == "pending"]:
                del recs[n]

    def queue_stats(self, queue_names: Sequence[str]) -> list[QueueStatistics]:
        out = []
        with self._lock:
            now = self.now()
            for name in queue_names:
                q = self.queue(name)
                recs = self._q.get(q, {})
                pending = [r for r in recs.values() if r.state == "pending"]
                etas = [r.task.scheduled_eta or r.task.eta for r in pending]
                executed = self._executed.get(q, deque())
                while executed and executed[0] <= now - timedelta(minutes=1):
                    executed.popleft()
                out.append(
                    QueueStatistics(
                        tasks=len(pending),
                        oldest_eta=min(
                            (e for e in etas if e is not None), default=None
                        ),
                        executed_1_minute=len(executed),
                        in_flight=sum(
                            1
                            for r in pending
                            if r.leased and r.task.eta is not None and r.task.eta > now
                        ),
                        enforced_rate=self.queue_config(q).rate,
                        failed=sum(1 for r in recs.values() if r.state == "failed"),
                    )
                )
        return out

    # --- runner and tooling ---
    def lease_push(
        self,
        max_tasks: int,
        lease_seconds: Duration,
        queue_names: Sequence[str] | None = None,
    ) -> list[Task]:
        lease = self.lease_duration(lease_seconds)
        wanted = None if queue_names is None else {self.queue(q) for q in queue_names}
        with self._lock:
            now = self.now()
            self._expire(now)
            due = sorted(
                (
                    r
                    for q, recs in self._q.items()
                    if wanted is None or q in wanted
                    for r in recs.values()
                    if r.state == "pending"
                    and not r.task.is_pull
                    and r.task.eta is not None
                    and r.task.eta <= now
                ),
                key=lambda r: (r.task.eta, r.task.name),
            )[:max_tasks]
            out = []
            for r in due:
                r.task.retry_count += 1
                if r.task.first_attempt is None:
                    r.task.first_attempt = now
                r.task.eta = now + lease
                r.leased = True
                out.append(self._out(r))
            return out

    def _owned(self, task: Task, queue_name: str) -> _Rec | None:
        rec = self._q.get(self.queue(queue_name), {}).get(task.name)
        if rec is None or rec.state != "pending" or rec.task.eta != task.eta:
            return None
        return rec

    def complete(self, task: Task, queue_name: str) -> None:
        q = self.queue(queue_name)
        with self._lock:
            now = self.now()
            rec = self._q.get(q, {}).get(task.name)
            if rec is not None and rec.state == "pending":
                rec.state, rec.leased, rec.expires = (
                    "done",
                    False,
                    now + self.tombstone_ttl,
                )
                self._executed.setdefault(q, deque()).append(now)
                self.changed.notify_all()

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
        with self._lock:
            rec = self._owned(task, queue_name)
            if rec is None:
                return False
            rec.task.eta = rec.task.scheduled_eta = eta
            rec.task.previous_response = status
            rec.task.retry_reason = reason
            rec.task.execution_count += 1 if executed else 0
            rec.leased = False
            self.changed.notify_all()
            return True

    def fail(self, task: Task, queue_name: str, status: int, response: str) -> bool:
        with self._lock:
            rec = self._owned(task, queue_name)
            if rec is None:
                return False
            now = self.now()
            rec.state, rec.leased, rec.expires = "failed", False, now + self.failed_ttl
            rec.task.last_status, rec.task.last_response = status, response
            rec.task.previous_response = status
            self.changed.notify_all()
            return True

    def list_tasks(
        self, queue_name: str | None = None, state: str = "pending", limit: int = 100
    ) -> list[Task]:
        if state not in ("pending", "failed", "done"):
            raise ValueError(f"unknown state {state!r}: use pending, failed or done")
        with self._lock:
            self._expire(self.now())
            qs = [self.queue(queue_name)] if queue_name is not None else sorted(self._q)
            recs = [
                r for q in qs for r in self._q.get(q, {}).values() if r.state == state
            ]
            recs.sort(key=lambda r: (r.task.scheduled_eta or r.task.eta, r.task.name))
            return [self._out(r) for r in recs[:limit]]

    def requeue_failed(
        self, queue_name: str | None = None, names: Sequence[str] | None = None
    ) -> int:
        wanted = None if names is None else set(names)
        n = 0
        with self._lock:
            now = self.now()
            qs = [self.queue(queue_name)] if queue_name is not None else list(self._q)
            for q in qs:
                for r in self._q.get(q, {}).values():
                    if r.state == "failed" and (
                        wanted is None or r.task.name in wanted
                    ):
                        r.state, r.expires, r.leased = "pending", None, False
                        r.task.eta = r.task.scheduled_eta = now
                        r.task.retry_count = r.task.execution_count = 0
                        r.task.first_attempt = None
                        n += 1
            self.changed.notify_all()
        return n

    def next_eta(self, queue_names: Sequence[str] | None = None) -> datetime | None:
        wanted = None if queue_names is None else {self.queue(q) for q in queue_names}
        with self._lock:
            etas = [
                r.task.eta
                for q, recs in self._q.items()
                if wanted is None or q in wanted
                for r in recs.values()
                if r.state == "pending"
                and not r.task.is_pull
                and r.task.eta is not None
            ]
        return min(etas, default=None)

    def queue_names(self) -> list[str]:
        with self._lock:
            return sorted(self._q)
