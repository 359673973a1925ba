"""One suite, every backend: the seed-000 API and the runner's extensions."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

import tq_web
from tq_web import taskqueue as tq


def push(name: str = "", **kw: object) -> tq.Task:
    return tq.Task(path="/w", payload=b"x", name=name, **kw)  # type: ignore[arg-type]


def pull(name: str = "", **kw: object) -> tq.Task:
    return tq.Task(payload=b"p-" + name.encode(), method="PULL", name=name, **kw)  # type: ignore[arg-type]


def test_add_fills_name_and_eta_without_mutating(backend):
    t = push(delay=timedelta(seconds=30))
    before = datetime.now(UTC)
    out = backend.add(t, "")
    assert out is not t
    assert out.name and tq.NAME_RE.match(out.name)
    assert t.name == "" and t.eta is None and t.delay == timedelta(seconds=30)
    assert (
        before + timedelta(seconds=29)
        < out.eta
        < datetime.now(UTC) + timedelta(seconds=31)
    )
    assert out.path == "/w" and out.payload == b"x" and out.method == "POST"
    assert backend.queue_stats(["default"])[0].tasks == 1


def test_unnamed_tasks_get_distinct_names(backend):
    names = {backend.add(push()).name for _ in range(20)}
    assert len(names) == 20


def test_explicit_eta_is_kept(backend):
    eta = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    out = backend.add(push("e1", eta=eta), "q1")
    assert out.eta == eta
    [listed] = backend.list_tasks("q1")
    assert listed.scheduled_eta == eta and listed.name == "e1"


def test_named_task_dedup_and_tombstone(backend):
    backend.add(push("job-1"), "q1")
    with pytest.raises(tq.TaskAlreadyAdded):
        backend.add(push("job-1"), "q1")
    # same name in another queue is fine
    backend.add(push("job-1"), "q2")
    backend.delete(push("job-1"), "q1")
    with pytest.raises(tq.TaskAlreadyAdded):
        backend.add(push("job-1"), "q1")
    with pytest.raises(tq.TaskNotFound):
        backend.delete(push("job-1"), "q1")


def test_tombstone_expires(make_backend):
    b = make_backend(tombstone_ttl=0.3)
    b.add(push("t1"))
    b.delete(push("t1"))
    with pytest.raises(tq.TaskAlreadyAdded):
        b.add(push("t1"))
    time.sleep(0.5)
    assert b.add(push("t1")).name == "t1"


def test_completed_task_leaves_tombstone(backend):
    backend.add(push("c1"))
    [leased] = backend.lease_push(10, 30)
    backend.complete(leased, "default")
    with pytest.raises(tq.TaskAlreadyAdded):
        backend.add(push("c1"))
    assert backend.queue_stats(["default"])[0].tasks == 0
    assert backend.queue_stats(["default"])[0].executed_1_minute == 1


@pytest.mark.parametrize("name", ["has space", "a/b", "x" * 501, "é"])
def test_bad_names_rejected(backend, name):
    with pytest.raises(ValueError):
        backend.add(push(name))


def test_delay_and_eta_rejected(backend):
    with pytest.raises(ValueError):
        backend.add(push(delay=1, eta=datetime.now(UTC)))
    with pytest.raises(ValueError):
        tq.Task(eta=datetime(2030, 1, 1))


def test_bad_queue_name_rejected(backend):
    with pytest.raises(ValueError):
        backend.add(push(), "bad queue!")


def test_add_multi_is_not_atomic(backend):
    backend.add(push("dup"))
    with pytest.raises(tq.MultiError) as info:
        backend.add_multi([push("a1"), push("dup"), push("a2"), push("bad name")])
    errs = info.value.errors
    assert errs[0] is None and errs[2] is None
    assert isinstance(errs[1], tq.TaskAlreadyAdded)
    assert isinstance(errs[3], ValueError)
    assert backend.queue_stats(["default"])[0].tasks == 3
    assert [r.name if r else None for r in info.value.results] == [
        "a1",
        None,
        "a2",
        None,
    ]


def test_add_multi_returns_filled_tasks(backend):
    out = backend.add_multi([push(), push("n2"), push(delay=5)], "q")
    assert len(out) == 3 and out[1].name == "n2" and all(t.eta for t in out)
    assert len({t.name for t in out}) == 3


def test_add_multi_duplicate_within_batch(backend):
    with pytest.raises(tq.MultiError) as info:
        backend.add_multi([push("same"), push("same")])
    assert info.value.errors[0] is None
    assert isinstance(info.value.errors[1], tq.TaskAlreadyAdded)


def test_delete_unknown_and_multi(backend):
    with pytest.raises(tq.TaskNotFound):
        backend.delete(push("nope"))
    with pytest.raises(LookupError):
        backend.delete(push("nope"))
    backend.add(push("d1"))
    with pytest.raises(tq.MultiError) as info:
        backend.delete_multi([push("d1"), push("nope")])
    assert info.value.errors[0] is None
    assert isinstance(info.value.errors[1], tq.TaskNotFound)
    backend.add(push("d2"))
    backend.delete_multi([push("d2")])
    assert backend.queue_stats(["default"])[0].tasks == 0


def test_lease_only_returns_due_pull_tasks(backend):
    backend.add(push("push1"), "pq")
    backend.add(pull("later", delay=60), "pq")
    backend.add(pull("now1"), "pq")
    leased = backend.lease(10, "pq", 30)
    assert [t.name for t in leased] == ["now1"]
    assert leased[0].payload == b"p-now1" and leased[0].retry_count == 1
    assert backend.lease(10, "pq", 30) == []  # hidden while leased


def test_lease_hides_until_expiry_and_counts(backend):
    backend.add(pull("l1"), "pq")
    [t] = backend.lease(5, "pq", 0.3)
    assert t.retry_count == 1
    assert t.eta > datetime.now(UTC)
    assert backend.lease(5, "pq", 0.3) == []
    stats = backend.queue_stats(["pq"])[0]
    assert stats.tasks == 1 and stats.in_flight == 1
    time.sleep(0.45)
    [again] = backend.lease(5, "pq", 30)
    assert again.name == "l1" and again.retry_count == 2


def test_lease_respects_max_and_eta_order(backend):
    base = datetime.now(UTC) - timedelta(seconds=10)
    for i in (3, 1, 2, 0):
        backend.add(pull(f"o{i}", eta=base + timedelta(seconds=i)), "pq")
    got = backend.lease(3, "pq", 30)
    assert [t.name for t in got] == ["o0", "o1", "o2"]


def test_lease_by_tag(backend):
    base = datetime.now(UTC) - timedelta(seconds=10)
    backend.add(pull("a", tag="red", eta=base), "pq")
    backend.add(pull("b", tag="blue", eta=base + timedelta(seconds=1)), "pq")
    backend.add(pull("c", tag="red", eta=base + timedelta(seconds=2)), "pq")
    backend.add(pull("d", tag="blue", eta=base + timedelta(seconds=3)), "pq")
    assert [t.name for t in backend.lease_by_tag(10, "pq", 30, "blue")] == ["b", "d"]
    # empty tag: the tag of the earliest task ("red")
    assert [t.name for t in backend.lease_by_tag(10, "pq", 30, "")] == ["a", "c"]


def test_modify_lease(backend):
    backend.add(pull("m1"), "pq")
    [t] = backend.lease(1, "pq", 0.3)
    old = t.eta
    backend.modify_lease(t, "pq", 60)
    assert t.eta > old + timedelta(seconds=30)
    time.sleep(0.4)
    assert backend.lease(1, "pq", 30) == []  # still leased thanks to the extension
    backend.modify_lease(t, "pq", 0)  # give it back now
    [again] = backend.lease(1, "pq", 30)
    assert again.name == "m1"
    with pytest.raises(tq.LeaseExpired):
        backend.modify_lease(t, "pq", 30)  # t's lease token is stale
    with pytest.raises(tq.TaskNotFound):
        backend.modify_lease(pull("ghost"), "pq", 30)


def test_modify_lease_after_expiry_raises(backend):
    backend.add(pull("x1"), "pq")
    [t] = backend.lease(1, "pq", 0.2)
    time.sleep(0.35)
    with pytest.raises(tq.LeaseExpired):
        backend.modify_lease(t, "pq", 30)


def test_pull_retry_limit_counts_leases(backend):
    backend.add(pull("r1", retry_options=tq.RetryOptions(retry_limit=1)), "pq")
    for expected in (1, 2):
        [t] = backend.lease(1, "pq", 0)
        assert t.retry_count == expected
    assert backend.lease(1, "pq", 30) == []
    assert [t.name for t in backend.list_tasks("pq", "failed")] == ["r1"]


def test_delete_leased_pull_task(backend):
    backend.add(pull("dl"), "pq")
    [t] = backend.lease(1, "pq", 30)
    backend.delete(t, "pq")
    assert backend.queue_stats(["pq"])[0].tasks == 0


def test_purge(backend):
    for i in range(5):
        backend.add(push(f"p{i}"), "pg")
    backend.add(push("other"), "keep")
    backend.purge("pg")
    assert backend.queue_stats(["pg", "keep"])[0].tasks == 0
    assert backend.queue_stats(["pg", "keep"])[1].tasks == 1


def test_queue_stats(backend):
    now = datetime.now(UTC)
    backend.add(push("s1", eta=now - timedelta(seconds=5)), "st")
    backend.add(push("s2", eta=now + timedelta(seconds=50)), "st")
    s, empty = backend.queue_stats(["st", "empty"])
    assert s.tasks == 2 and s.in_flight == 0
    assert abs((s.oldest_eta - (now - timedelta(seconds=5))).total_seconds()) < 0.01
    assert s.enforced_rate == 500.0
    assert empty.tasks == 0 and empty.oldest_eta is None
    backend.lease_push(10, 30, ["st"])
    assert backend.queue_stats(["st"])[0].in_flight == 1


def test_lease_push_due_push_tasks_only(backend):
    backend.add(push("due"), "a")
    backend.add(push("future", delay=60), "a")
    backend.add(pull("pulled"), "a")
    backend.add(push("elsewhere"), "b")
    got = backend.lease_push(10, 30, ["a"])
    assert [t.name for t in got] == ["due"]
    t = got[0]
    assert t.queue_name == "a" and t.retry_count == 1 and t.first_attempt is not None
    assert t.scheduled_eta is not None and t.eta > t.scheduled_eta
    assert backend.lease_push(10, 30, ["a"]) == []
    assert {x.name for x in backend.lease_push(10, 30)} == {"elsewhere"}


def test_retry_later_and_headers_state(backend):
    backend.add(push("rt"))
    [t] = backend.lease_push(1, 30)
    eta = datetime.now(UTC) - timedelta(milliseconds=1)
    assert backend.retry_later(t, "default", eta, 500, "handler failed")
    [t2] = backend.lease_push(1, 30)
    assert t2.retry_count == 2 and t2.execution_count == 1
    assert t2.previous_response == 500 and t2.retry_reason == "handler failed"
    assert t2.first_attempt == t.first_attempt
    # stale token: the first lease is gone
    assert not backend.retry_later(t, "default", eta, 500, "x")
    assert backend.retry_later(t2, "default", eta, 0, "timeout", executed=False)
    [t3] = backend.lease_push(1, 30)
    assert t3.execution_count == 1 and t3.retry_count == 3


def test_expired_push_lease_comes_back(backend):
    backend.add(push("crash"))
    [_t] = backend.lease_push(1, 0.2)
    assert backend.lease_push(1, 30) == []
    time.sleep(0.35)
    [again] = backend.lease_push(1, 30)
    assert again.name == "crash" and again.retry_count == 2


def test_fail_and_requeue(backend):
    backend.add(push("f1"), "fq")
    [t] = backend.lease_push(1, 30)
    assert backend.fail(t, "fq", 202, "Fatal error: boom")
    [failed] = backend.list_tasks("fq", "failed")
    assert failed.name == "f1" and failed.last_status == 202
    assert failed.last_response == "Fatal error: boom"
    s = backend.queue_stats(["fq"])[0]
    assert s.tasks == 0 and s.failed == 1
    with pytest.raises(tq.TaskAlreadyAdded):
        backend.add(push("f1"), "fq")
    assert backend.requeue_failed("fq", ["f1"]) == 1
    [back] = backend.lease_push(1, 30)
    assert back.name == "f1" and back.retry_count == 1
    assert backend.list_tasks("fq", "failed") == []


def test_list_tasks_and_queue_names(backend):
    backend.add(push("x2", delay=2), "lq")
    backend.add(push("x1", delay=1), "lq")
    backend.add(push("y"), "other")
    assert [t.name for t in backend.list_tasks("lq")] == ["x1", "x2"]
    assert [t.name for t in backend.list_tasks("lq", limit=1)] == ["x1"]
    assert {"lq", "other"} <= set(backend.queue_names())
    with pytest.raises(ValueError):
        backend.list_tasks("lq", "bogus")


def test_next_eta(backend):
    assert backend.next_eta() is None
    out = backend.add(push("n", delay=20), "ne")
    backend.add(pull("pp"), "ne")
    assert backend.next_eta(["ne"]) == out.eta


def test_concurrent_leasers_never_share(backend):
    backend.add_multi([push(f"c{i}") for i in range(200)], "cc")
    got: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            batch = backend.lease_push(7, 60, ["cc"])
            if not batch:
                return
            with lock:
                got.extend(t.name for t in batch)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(got) == sorted(f"c{i}" for i in range(200))


def test_headers_and_retry_options_roundtrip(backend):
    opts = tq.RetryOptions(retry_limit=3, min_backoff=0.5, max_doublings=2)
    backend.add(
        push(
            "h",
            headers={"Content-Type": "application/json", "X-A": "1"},
            retry_options=opts,
        ),
        "hq",
    )
    [t] = backend.lease_push(1, 30, ["hq"])
    assert t.headers == {"Content-Type": "application/json", "X-A": "1"}
    assert t.retry_options == opts


def test_memory_stores_are_separate():
    a, b = tq_web.connect("memory://"), tq_web.connect("memory://")
    a.add(push("only-a"))
    assert b.queue_stats(["default"])[0].tasks == 0


def test_complete_many(backend):
    backend.add_multi([push(f"cm{i}") for i in range(5)], "cm1")
    backend.add(push("other"), "cm2")
    leased = backend.lease_push(10, 30)
    assert len(leased) == 6
    backend.complete_many(leased[:4])
    s1, s2 = backend.queue_stats(["cm1", "cm2"])
    assert s1.tasks + s2.tasks == 2
    backend.complete_many(leased)  # already done ones are ignored
    assert backend.queue_stats(["cm1", "cm2"])[0].tasks == 0
    with pytest.raises(tq.TaskAlreadyAdded):
        backend.add(push("cm0"), "cm1")


def test_lease_rejects_bad_max_tasks(backend):
    for call in (
        lambda: backend.lease(0, "pq", 30),
        lambda: backend.lease_by_tag(0, "pq", 30, "t"),
    ):
        with pytest.raises(ValueError, match="max_tasks"):
            call()
