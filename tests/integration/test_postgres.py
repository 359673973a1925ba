"""The PostgreSQL backend against a real server: what the contract suite cannot show.

Transactional enqueue, several processes sharing a queue, LISTEN/NOTIFY wake-ups
and recovery after the server kills the backend's connections. Each test uses its
own schema and drops it. Skipped without a server unless
``TQ_WEB_REQUIRE_POSTGRES=1`` (then a missing server fails the run).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import tq_web
from tests.contract.conftest import postgres_url, require_postgres
from tq_web import taskqueue as tq

pytestmark = pytest.mark.postgres


def _schema() -> str:
    return "tq_it_" + uuid.uuid4().hex[:10]


@pytest.fixture
def schema() -> Iterator[str]:
    require_postgres()
    name = _schema()
    yield name
    import psycopg

    with psycopg.connect(postgres_url(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def backend(schema: str) -> Iterator[Any]:
    b = tq_web.connect(postgres_url(), schema=schema)
    yield b
    b.close()


def push(name: str = "", **kw: Any) -> tq.Task:
    return tq.Task(path="/w", payload=b"x", name=name, **kw)


# --- options, URL, schema ---


def test_url_options_are_taken_out_and_schema_is_versioned(schema: str) -> None:
    import psycopg

    url = f"{postgres_url()}?schema={schema}&listen=0&tombstone_ttl=600&pool_size=2"
    b = tq_web.connect(url)
    try:
        assert b.schema == schema and b.listen is False and b.pool_size == 2
        assert b.tombstone_ttl == timedelta(seconds=600)
        assert b.signing_key() is None
        with psycopg.connect(postgres_url()) as conn:
            row = conn.execute(f'SELECT version FROM "{schema}".tq_web_meta').fetchone()
        assert row is not None and row[0] >= 1
        assert b.migrate() == row[0]  # idempotent
    finally:
        b.close()


def test_bad_schema_name_rejected() -> None:
    require_postgres()
    with pytest.raises(ValueError):
        tq_web.connect(postgres_url(), schema='x"; DROP TABLE y; --')


def test_concurrent_migrations(schema: str) -> None:
    errors: list[BaseException] = []
    made: list[Any] = []

    def open_one() -> None:
        try:
            made.append(tq_web.connect(postgres_url(), schema=schema))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for b in made:
        b.close()
    assert errors == [] and len(made) == 4


def test_custom_clock_is_used(schema: str) -> None:
    fake = datetime(2030, 1, 1, tzinfo=UTC)
    b = tq_web.connect(postgres_url(), schema=schema, clock=lambda: fake)
    try:
        out = b.add(push(delay=10))
        assert out.eta == fake + timedelta(seconds=10)
        assert b.lease_push(1, 30) == []  # not due on the fake clock
    finally:
        b.close()


def test_lease_token_roundtrips_exactly(backend: Any) -> None:
    backend.add(tq.Task(payload=b"p", method="PULL", name="tok"), "pq")
    [t] = backend.lease(1, "pq", 30)
    assert t.eta.tzinfo is not None and t.eta.utcoffset() == timedelta(0)
    backend.modify_lease(t, "pq", 60)
    backend.modify_lease(t, "pq", 60)  # the updated token is accepted again


def test_lease_by_earliest_tag_skips_tasks_over_their_lease_limit(backend: Any) -> None:
    once = tq.RetryOptions(retry_limit=0)
    backend.add(tq.Task(method="PULL", name="a", tag="x", retry_options=once), "pq")
    assert [t.name for t in backend.lease(1, "pq", 0)] == ["a"]  # its only lease
    later = datetime.now(UTC)  # after a's (zero) lease expiry: a stays earliest
    for name, tag, ms in (("b", "y", 1), ("c", "x", 2)):
        eta = later + timedelta(milliseconds=ms)
        backend.add(tq.Task(method="PULL", name=name, tag=tag, eta=eta), "pq")
    time.sleep(0.01)
    # a fails (over its limit) but still decides the tag: c, not b
    assert [t.name for t in backend.lease_by_tag(1, "pq", 30, "")] == ["c"]
    assert [t.name for t in backend.list_tasks("pq", "failed")] == ["a"]


def test_housekeeping_deletes_expired_rows(schema: str) -> None:
    b = tq_web.connect(postgres_url(), schema=schema, tombstone_ttl=0, failed_ttl=0)
    try:
        b.add_multi([push(f"h{i}") for i in range(5)])
        b.delete_multi([push(f"h{i}") for i in range(5)])
        time.sleep(0.01)
        assert b.delete_expired(10) == 5
        assert b.queue_names() == []
    finally:
        b.close()


def test_add_multi_large_batch_and_names(backend: Any) -> None:
    tasks = [push() for _ in range(1500)] + [push("named-1"), push("named-2")]
    out = backend.add_multi(tasks, "big")
    assert len(out) == 1502 and len({t.name for t in out}) == 1502
    assert backend.queue_stats(["big"])[0].tasks == 1502
    with pytest.raises(tq.MultiError) as info:
        backend.add_multi([push("named-1"), push()], "big")
    assert isinstance(info.value.errors[0], tq.TaskAlreadyAdded)
    assert info.value.errors[1] is None


# --- (1) transactional enqueue ---


def test_transactional_add_rollback_and_commit(backend: Any) -> None:
    import psycopg

    with psycopg.connect(postgres_url()) as conn:  # autocommit off: a transaction
        backend.add(push("rolled-back"), "tx", conn=conn)
        backend.add_multi([push("rb-2"), push()], "tx", conn=conn)
        # not visible outside the open transaction, and not leasable
        assert backend.lease_push(10, 30, ["tx"]) == []
        assert backend.queue_stats(["tx"])[0].tasks == 0
        conn.rollback()
    assert backend.queue_stats(["tx"])[0].tasks == 0
    assert backend.lease_push(10, 30, ["tx"]) == []
    # the name was never taken
    backend.add(push("rolled-back"), "tx2")

    with psycopg.connect(postgres_url()) as conn:
        with conn.transaction():
            added = backend.add(push("committed"), "tx", conn=conn)
            assert backend.lease_push(10, 30, ["tx"]) == []
        [leased] = backend.lease_push(10, 30, ["tx"])
        assert leased.name == "committed" and added.name == "committed"


def test_transactional_add_taken_name_keeps_transaction_usable(backend: Any) -> None:
    import psycopg

    backend.add(push("taken"), "tx")
    with psycopg.connect(postgres_url()) as conn:
        with pytest.raises(tq.TaskAlreadyAdded):
            backend.add(push("taken"), "tx", conn=conn)
        with pytest.raises(tq.MultiError):
            backend.add_multi([push("taken"), push("fresh")], "tx", conn=conn)
        # no unique violation: the transaction still works and commits
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.commit()
    assert {t.name for t in backend.list_tasks("tx")} == {"taken", "fresh"}


def test_transactional_add_in_autocommit_connection(backend: Any) -> None:
    import psycopg

    with psycopg.connect(postgres_url(), autocommit=True) as conn:
        backend.add(push("ac"), "tx", conn=conn)
    assert [t.name for t in backend.list_tasks("tx")] == ["ac"]


def test_transactional_add_rejects_other_objects(backend: Any) -> None:
    with pytest.raises(TypeError):
        backend.add(push(), "tx", conn=object())


def test_sqlalchemy_session_and_connection(backend: Any) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    url = postgres_url().replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sqlalchemy.create_engine(url)
    try:
        with Session(engine) as session:
            backend.add(push("sa-rolled-back"), "sa", conn=session)
            session.rollback()
        with Session(engine) as session, session.begin():
            backend.add(push("sa-session"), "sa", conn=session)
        with engine.begin() as connection:
            backend.add(push("sa-connection"), "sa", conn=connection)
    finally:
        engine.dispose()
    assert {t.name for t in backend.list_tasks("sa")} == {"sa-session", "sa-connection"}


# --- (2) several processes share one queue ---


def _lease_worker(url: str, schema: str, out: Any) -> None:
    b = tq_web.connect(url, schema=schema, listen=False)
    got: list[tuple[str, int]] = []
    try:
        while True:
            batch = b.lease_push(7, 120, ["shared"])
            if not batch:
                break
            got.extend((t.name, t.retry_count) for t in batch)
            for t in batch[::2]:  # complete some while others are still leased
                b.complete(t, "shared")
    finally:
        b.close()
    out.put(got)


def test_four_processes_lease_each_task_exactly_once(backend: Any, schema: str) -> None:
    names = [f"mp-{i}" for i in range(2000)]
    for i in range(0, 2000, 500):
        backend.add_multi([push(n) for n in names[i : i + 500]], "shared")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_lease_worker, args=(postgres_url(), schema, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    leased = [name for r in results for name, _ in r]
    assert sorted(leased) == sorted(names)  # every task, exactly once
    assert all(count == 1 for r in results for _, count in r)
    assert sum(1 for r in results if r) >= 2  # the work really was shared


# --- (3) wake-ups ---


def test_wait_for_tasks_wakes_on_add_from_another_connection(backend: Any) -> None:
    backend.wait_for_tasks(5)  # the first call starts listening and returns
    other = tq_web.connect(postgres_url(), schema=backend.schema)
    try:
        timer = threading.Timer(0.3, lambda: other.add(push("wake"), "wq"))
        timer.start()
        t0 = time.monotonic()
        backend.wait_for_tasks(10)
        waited = time.monotonic() - t0
        timer.join()
        assert 0.2 < waited < 0.3 + 0.5
        [t] = backend.lease_push(1, 30)
        assert t.name == "wake"
        # nothing added: waits for the timeout
        t0 = time.monotonic()
        backend.wait_for_tasks(0.3)
        assert time.monotonic() - t0 >= 0.25
        # pull tasks do not wake push runners
        other.add(tq.Task(payload=b"p", method="PULL"), "pull-q")
        t0 = time.monotonic()
        backend.wait_for_tasks(0.3)
        assert time.monotonic() - t0 >= 0.25
    finally:
        other.close()


def test_lease_push_reads_pending_notifications(backend: Any) -> None:
    backend.wait_for_tasks(1)
    backend.add_multi([push() for _ in range(3)], "wq")
    time.sleep(0.2)  # the notification reaches the listening connection
    assert len(backend.lease_push(10, 30)) == 3  # and is read here
    t0 = time.monotonic()
    backend.wait_for_tasks(0.3)  # so no stale wake-up
    assert time.monotonic() - t0 >= 0.25


def test_wait_for_tasks_wakes_on_transactional_add_only_at_commit(backend: Any) -> None:
    import psycopg

    backend.wait_for_tasks(1)
    with psycopg.connect(postgres_url()) as conn:
        backend.add(push("tx-wake"), "wq", conn=conn)
        t0 = time.monotonic()
        backend.wait_for_tasks(0.3)  # not committed: no wake-up
        assert time.monotonic() - t0 >= 0.25
        conn.commit()
    t0 = time.monotonic()
    backend.wait_for_tasks(5)
    assert time.monotonic() - t0 < 0.5


def test_polling_mode(schema: str) -> None:
    b = tq_web.connect(postgres_url(), schema=schema, listen=False)
    try:
        t0 = time.monotonic()
        b.wait_for_tasks(0.3)
        assert 0.25 <= time.monotonic() - t0 < 1.0
        b.add(push("polled"))
        [t] = b.lease_push(1, 30)
        assert t.name == "polled"
    finally:
        b.close()


def test_close_wakes_a_waiting_thread(schema: str) -> None:
    b = tq_web.connect(postgres_url(), schema=schema)
    b.wait_for_tasks(1)
    th = threading.Thread(target=b.wait_for_tasks, args=(30,))
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    b.close()
    th.join(10)
    assert not th.is_alive() and time.monotonic() - t0 < 5


# --- (4) recovery ---


def test_recovers_after_its_connections_are_killed(schema: str) -> None:
    import psycopg

    app = "tq_it_" + uuid.uuid4().hex[:8]
    b = tq_web.connect(f"{postgres_url()}?application_name={app}", schema=schema)
    try:
        b.add(push("before"))
        b.wait_for_tasks(1)  # open the LISTEN connection too
        with psycopg.connect(postgres_url(), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (app,),
            ).fetchone()
        assert killed is not None and killed[0] >= 2
        time.sleep(0.2)
        # idle pooled connections that died are replaced without an error
        b.add(push("after"))
        assert {t.name for t in b.lease_push(10, 30)} == {"before", "after"}
        # the listener reconnects (that call returns at once), then works again
        b.wait_for_tasks(1)
        other = tq_web.connect(postgres_url(), schema=schema)
        try:
            threading.Timer(0.2, lambda: other.add(push("wake-again"))).start()
            t0 = time.monotonic()
            b.wait_for_tasks(10)
            assert time.monotonic() - t0 < 0.2 + 0.5
        finally:
            time.sleep(0.3)
            other.close()
    finally:
        b.close()


def test_unreachable_server_raises_transient() -> None:
    with pytest.raises(tq_web.Transient):
        tq_web.connect(
            "postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=1",
            schema=_schema(),
            pool_timeout=1,
        )
