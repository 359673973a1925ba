"""The testing Scheduler reproduces LUCI's RunSimulation cases (luci_tq.md §2.2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty

import tq_web
from tq_web import taskqueue as tq
from tq_web.testing import Scheduler, SchedulerError

EPOCH = datetime.fromtimestamp(1500000000, UTC)


class TaskFailure(Exception):
    pass


def graph(error_on: int = -1) -> tuple[tq_web.Dispatcher, Scheduler, list[int]]:
    d = tq_web.Dispatcher("memory://")
    sched = Scheduler(d, now=EPOCH)
    ran: list[int] = []

    def add(idx: int, delay: float, dedup: str = "") -> None:
        d.add_task(
            tq_web.Task(
                Duration(seconds=idx),
                eta=sched.now + timedelta(seconds=delay),
                deduplication_key=dedup,
            )
        )

    def handler(p: Duration) -> None:
        idx = p.seconds
        ran.append(idx)
        if idx == error_on:
            raise TaskFailure("task failure")
        if idx == 1:
            add(2, 1)
        elif idx == 2:
            add(3, 1)
            add(4, 1)
        elif idx in (3, 4):
            add(5, 0, "dedup")
        elif idx == 5:
            add(6, 1)

    d.register_task(Duration, handler, "")
    return d, sched, ran


def idx(items: list[Any]) -> list[int]:
    return [i.payload.seconds for i in items]


def test_happy_path():
    d, sched, _ran = graph()
    with sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        executed = sched.run()
        assert sorted(idx(executed)) == [1, 2, 3, 4, 5, 6]
        assert idx(executed)[:2] == [1, 2] and idx(executed)[-1] == 6
        assert len(idx(executed)) == 6  # the deduplicated 5 ran once
        assert all(i.status == 200 for i in executed)
        assert sched.tasks() == []
        assert sched.now - EPOCH == timedelta(seconds=3)


def test_deadline():
    d, sched, _ = graph()
    with sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        executed = sched.run(until=EPOCH + timedelta(milliseconds=2500))
        assert sorted(idx(executed)) == [1, 2, 3, 4, 5]
        assert idx(sched.tasks()) == [6]
        assert sched.now - EPOCH == timedelta(seconds=2)


def test_stop_before():
    d, sched, _ = graph()
    with sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        seen: list[int] = []

        def stop(item: Any) -> bool:
            seen.append(item.payload.seconds)
            return item.payload.seconds == 5

        executed = sched.run(stop_before=stop)
        # 5 and 4 share an ETA; 5 may come before 4 (names decide)
        assert set(idx(executed)) <= {1, 2, 3, 4} and {1, 2, 3} <= set(idx(executed))
        assert 5 in idx(sched.tasks())
        assert 6 not in idx(sched.tasks())
        assert sched.now - EPOCH == timedelta(seconds=2)


def test_stop_after():
    d, sched, _ = graph()
    with sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        executed = sched.run(stop_after=lambda item: item.payload.seconds == 5)
        assert idx(executed)[-1] == 5
        assert 6 in idx(sched.tasks())
        assert sched.now - EPOCH == timedelta(seconds=2)


def test_failing_task_raises_with_task_attached():
    d, sched, _ = graph(error_on=3)
    with sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        with pytest.raises(TaskFailure, match="task failure") as info:
            sched.run()
        assert info.value.tq_web_item.payload == Duration(seconds=3)
        assert info.value.tq_web_item.status == 202
        assert idx(sched.tasks()) == [4]
        assert sched.now - EPOCH == timedelta(seconds=2)


def test_failing_task_without_raise_follows_status_table():
    d, sched, _ = graph(error_on=3)
    with sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        executed = sched.run(raise_on_error=False)
        statuses = {i.payload.seconds: i.status for i in executed}
        assert statuses[3] == 202
        assert sorted(statuses) == [1, 2, 3, 4, 5, 6]  # 4 still adds 5
        assert [i.payload.seconds for i in sched.failed()] == [3]


def test_unknown_task_raises():
    d, sched, _ = graph()
    with sched:
        d.add_task(tq_web.Task(Duration(seconds=6)))
        d.backend.add(
            tq.Task(path="/unknown", payload=b"x", eta=EPOCH + timedelta(seconds=5))
        )
        with pytest.raises(
            SchedulerError, match="unrecognized TQ task for handler at /unknown"
        ):
            sched.run()
        assert len(sched.tasks()) == 1


def test_unknown_task_handler():
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, lambda p: None)
    raw: list[tq.Task] = []
    with Scheduler(d, now=EPOCH, unknown_task_handler=raw.append) as sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        d.backend.add(tq.Task(path="/unknown", payload=b"x"))
        executed = sched.run()
        assert len(executed) == 2 and sched.tasks() == []
        assert [t.path for t in raw] == ["/unknown"]


def test_tasks_sorted_by_eta_then_name():
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, lambda p: None, "q1")
    d.register_task(Empty, lambda p: None, "q2")
    with Scheduler(d, now=EPOCH) as sched:
        d.add_task(tq_web.Task(Duration(seconds=1), delay=30))
        d.add_task(tq_web.Task(Duration(seconds=2), delay=10))
        d.add_task(tq_web.Task(Duration(seconds=3), name_prefix="b"))
        d.add_task(tq_web.Task(Duration(seconds=4), name_prefix="a"))
        items = sched.tasks()
        assert [i.payload.seconds for i in items] == [4, 3, 2, 1]
        assert all(i.queue == "q1" for i in items)
        assert items[0].task.path == "/internal/tasks/google.protobuf.Duration"


def test_retries_with_backoff_on_fake_clock():
    d = tq_web.Dispatcher("memory://")
    attempts: list[tq_web.RequestHeaders] = []

    def flaky(p: Duration) -> None:
        attempts.append(tq_web.request_headers())
        if len(attempts) < 4:
            raise tq_web.Transient("not yet")

    opts = tq_web.RetryOptions(min_backoff=10, max_backoff=300, max_doublings=3)
    d.register_task(Duration, flaky, retry_options=opts)
    with Scheduler(d, now=EPOCH) as sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        executed = sched.run()
        assert [i.status for i in executed] == [500, 500, 500, 200]
        # retries at +10, +20, +40 seconds
        assert sched.now - EPOCH == timedelta(seconds=70)
    assert [h.task_retry_count for h in attempts] == [0, 1, 2, 3]
    assert [h.task_execution_count for h in attempts] == [0, 0, 0, 0]  # 5xx not counted
    assert [h.task_previous_response for h in attempts] == [0, 500, 500, 500]
    assert attempts[0].queue_name == "default"
    assert attempts[1].task_retry_reason == "task handler failed"


def test_retry_limit_stops_and_task_options_win():
    d = tq_web.Dispatcher("memory://")
    d.register_task(
        Duration,
        lambda p: (_ for _ in ()).throw(tq_web.Retry("again")),
        retry_options=tq_web.RetryOptions(retry_limit=5, min_backoff=1),
    )
    with Scheduler(d, now=EPOCH) as sched:
        d.add_task(
            tq_web.Task(
                Duration(seconds=1), retry_options=tq_web.RetryOptions(retry_limit=2)
            )
        )
        executed = sched.run()
        assert [i.status for i in executed] == [409, 409, 409]
        assert sched.tasks() == []
        assert len(sched.failed()) == 1


def test_max_attempts_caps_endless_retries():
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, lambda p: (_ for _ in ()).throw(tq_web.Transient("x")))
    with Scheduler(d, now=EPOCH) as sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        assert len(sched.run(max_attempts=5)) == 5


def test_dedup_and_tombstones_hold():
    d = tq_web.Dispatcher("memory://")
    calls: list[Duration] = []
    d.register_task(Duration, calls.append)
    with Scheduler(d, now=EPOCH) as sched:
        t = tq_web.Task(Duration(seconds=1), deduplication_key="k")
        d.add_task(t)
        d.add_task(t)
        assert len(sched.run()) == 1
        d.add_task(t)  # tombstoned: not added again
        assert sched.run() == []
    assert calls == [Duration(seconds=1)]


async def _async_handler(p: Duration) -> None:
    assert tq_web.request_headers().queue_name == "default"


def test_async_handlers_run():
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, _async_handler)
    with Scheduler(d, now=EPOCH) as sched:
        d.add_task(tq_web.Task(Duration(seconds=1)))
        assert [i.status for i in sched.run()] == [200]


def test_scheduler_restores_backend():
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, lambda p: None)
    real = d.backend
    with Scheduler(d):
        assert d.backend is not real
    assert d.backend is real
