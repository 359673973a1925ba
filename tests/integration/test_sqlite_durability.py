"""The SQLite backend on real files: processes, kill -9, URLs, the stored key."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import tq_web
from tq_web import taskqueue as tq
from tq_web.backends.sqlite import SCHEMA_VERSION, SQLiteBackend
from tq_web.exceptions import ConfigurationError, InvalidBackendURL, Transient

ROOT = Path(__file__).resolve().parents[2]


def push(name: str = "") -> tq.Task:
    return tq.Task(path="/w", payload=b"x" * 50, name=name)


def pull(name: str = "") -> tq.Task:
    return tq.Task(payload=b"p", method="PULL", name=name)


def connect(url: str, **options: Any) -> SQLiteBackend:
    b = tq_web.connect(url, **options)
    assert isinstance(b, SQLiteBackend)
    return b


def names_in(url: str, queue: str, state: str = "pending") -> list[str]:
    b = connect(url)
    try:
        return [t.name for t in b.list_tasks(queue, state, limit=1 << 30)]
    finally:
        b.close()


# --- (1) several processes on one file -------------------------------------------


def _mp_worker(
    url: str, wid: int, n: int, barrier: Any, results: Any
) -> None:  # runs in a spawned process
    b = connect(url)
    rng = random.Random(wid)
    mine = [f"w{wid}-{i}" for i in range(n)]
    got_push: list[str] = []
    got_pull: list[str] = []

    def take() -> int:
        batch = b.lease_push(rng.randint(1, 8), 300, ["mp"])
        for t in batch:
            b.complete(t, "mp")
        got_push.extend(t.name for t in batch)
        pulled = b.lease(rng.randint(1, 8), "pq", 300)
        for t in pulled:
            b.delete(t, "pq")
        got_pull.extend(t.name for t in pulled)
        return len(batch) + len(pulled)

    barrier.wait()
    i = 0
    while i < n:
        size = rng.choice([1, 1, 5, 20])
        chunk = mine[i : i + size]
        i += len(chunk)
        if len(chunk) == 1:
            b.add(push(chunk[0]), "mp")
            b.add(pull(chunk[0]), "pq")
        else:
            b.add_multi([push(x) for x in chunk], "mp")
            b.add_multi([pull(x) for x in chunk], "pq")
        take()
    barrier.wait()  # every task is added: drain until both queues are empty
    while take():
        pass
    results.put((wid, got_push, got_pull))
    b.close()


def test_processes_share_one_file_without_loss_or_double_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/mp.db"
    connect(url).close()  # create the schema once, up front
    ctx = multiprocessing.get_context("spawn")
    workers, n = 3, 300
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_mp_worker, args=(url, w, n, barrier, results))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    leased_push = [name for _, got, _ in out for name in got]
    leased_pull = [name for _, _, got in out for name in got]
    expected = sorted(f"w{w}-{i}" for w in range(workers) for i in range(n))
    assert sorted(leased_push) == expected  # every push task once, none twice
    assert sorted(leased_pull) == expected  # every pull task once, none twice
    assert names_in(url, "mp") == [] and names_in(url, "pq") == []
    assert len(names_in(url, "mp", "done")) == len(expected)


# --- (2) kill -9 while adding --------------------------------------------------

_ADDER = """
import sys
import tq_web
from tq_web import taskqueue as tq

b = tq_web.connect(sys.argv[1])
run = sys.argv[2]
i = 0
while True:
    if i % 3 == 2:
        names = [f"{run}-{i + k}" for k in range(10)]
        b.add_multi([tq.Task(path="/w", payload=b"y" * 200, name=n) for n in names])
        i += 10
    else:
        names = [f"{run}-{i}"]
        b.add(tq.Task(path="/w", payload=b"y" * 200, name=names[0]))
        i += 1
    sys.stdout.write("".join(n + "\\n" for n in names))
    sys.stdout.flush()
"""


def test_acknowledged_adds_survive_sigkill(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/kill.db"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    acknowledged: list[str] = []
    for run in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", _ADDER, url, f"r{run}"],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ) as child:
            assert child.stdout is not None
            first = child.stdout.readline()  # adding has started
            assert first.endswith(b"\n"), f"child failed to start (seed {seed})"
            time.sleep(rng.uniform(0.05, 0.6))  # then kill -9 at a random moment
            os.kill(child.pid, signal.SIGKILL)
            rest = child.stdout.read()
        assert child.returncode == -signal.SIGKILL
        lines = (first + rest).split(b"\n")
        acknowledged += [x.decode() for x in lines[:-1]]  # complete lines only
    stored = set(names_in(url, "default"))
    lost = [n for n in acknowledged if n not in stored]
    assert not lost, f"{len(lost)} acknowledged tasks lost (seed {seed}): {lost[:5]}"
    assert len(acknowledged) > 30
    with closing(sqlite3.connect(tmp_path / "kill.db")) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# --- (3) URLs and options -----------------------------------------------------


def test_relative_and_absolute_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rel = connect("sqlite:///rel.db")
    assert isinstance(rel, SQLiteBackend)
    assert rel.path == str(tmp_path / "rel.db") and (tmp_path / "rel.db").exists()
    rel.add(push("r1"))
    monkeypatch.chdir(ROOT)  # the file was resolved when connecting
    rel.add(push("r2"))
    rel.close()
    assert names_in(f"sqlite:///{tmp_path}/rel.db", "default") == ["r1", "r2"]
    (tmp_path / "sub dir").mkdir()
    absolute = f"sqlite:///{tmp_path}/sub%20dir/abs.db"
    assert absolute.startswith("sqlite:////")
    b = connect(absolute)
    assert b.path == str(tmp_path / "sub dir" / "abs.db")
    b.close()
    assert (tmp_path / "sub dir" / "abs.db").exists()


def test_url_query_options(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/opts.db?synchronous=full&tombstone_ttl=600&busy_timeout=2.5"
    b = connect(url)
    assert isinstance(b, SQLiteBackend)
    assert b.url == url
    assert b.synchronous == "FULL" and b.busy_timeout == 2.5
    assert b.tombstone_ttl == timedelta(seconds=600)
    conn = b._conn()
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (2500,)
    b.close()
    # keyword arguments win over the query string
    b = connect(f"sqlite:///{tmp_path}/opts.db?tombstone_ttl=600", tombstone_ttl=5.0)
    assert b.tombstone_ttl == timedelta(seconds=5) and b.synchronous == "NORMAL"
    b.close()


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("sqlite:///{tmp}/x.db?bogus=1", InvalidBackendURL),
        ("sqlite://host/{tmp}/x.db", InvalidBackendURL),
        ("sqlite:///:memory:", InvalidBackendURL),
        ("sqlite:///", InvalidBackendURL),
        ("sqlite:///{tmp}/x.db?synchronous=OFF", ConfigurationError),
        ("sqlite:///{tmp}/missing/x.db", ConfigurationError),
        ("sqlite:///{tmp}/x.db?tombstone_ttl=-1", ValueError),
    ],
)
def test_bad_urls(tmp_path: Path, url: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        connect(url.format(tmp=tmp_path))


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigurationError, match=r"junk\.db"):
        connect(f"sqlite:///{tmp_path}/junk.db")


# --- (4) the signing key --------------------------------------------------------


def _print_key(url: str, out: Any) -> None:  # runs in a spawned process
    out.put(connect(url).signing_key())


def test_signing_key_is_stored_and_stable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/key.db"
    a = connect(url)
    key = a.signing_key()
    assert isinstance(key, str) and len(key) >= 32
    assert a.signing_key() == key
    a.close()
    b = connect(url)
    assert b.signing_key() == key
    b.close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_print_key, args=(url, out))
    p.start()
    assert out.get(timeout=30) == key
    p.join(timeout=30)
    other = connect(f"sqlite:///{tmp_path}/other.db")
    assert other.signing_key() != key
    other.close()


def test_signing_key_race_between_threads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/race.db"
    backends = [connect(url) for _ in range(6)]
    keys: list[str] = []
    barrier = threading.Barrier(len(backends))

    def get(b: Any) -> None:
        barrier.wait()
        keys.append(b.signing_key())

    threads = [threading.Thread(target=get, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == len(backends) and len(set(keys)) == 1
    for b in backends:
        b.close()


# --- more real-file behaviour -------------------------------------------------


def test_schema_version_and_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    b = connect(url)
    assert isinstance(b, SQLiteBackend)
    b.add(push("keep"))
    b.migrate()
    b.migrate()
    assert b._conn().execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    b.close()
    assert names_in(url, "default") == ["keep"]
    with closing(sqlite3.connect(tmp_path / "m.db")) as con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigurationError, match="upgrade tq_web"):
        connect(url)


def test_locked_database_raises_transient(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/lock.db?busy_timeout=0.2"
    b = connect(url)
    holder = sqlite3.connect(tmp_path / "lock.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Transient) as info:
            b.add(push("blocked"))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(Transient):
            b.add_multi([push("b1"), push("b2")])
        with pytest.raises(Transient):
            b.lease_push(1, 30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    b.add(push("blocked"))  # the failed attempts left nothing behind
    assert [t.name for t in b.list_tasks("default")] == ["blocked"]
    b.close()


def test_threads_share_a_backend(tmp_path: Path) -> None:
    b = connect(f"sqlite:///{tmp_path}/threads.db")
    leased: list[str] = []
    lock = threading.Lock()
    done_adding = threading.Event()

    def adder(k: int) -> None:
        for i in range(100):
            b.add(push(f"t{k}-{i}"), "th")

    def leaser() -> None:
        while True:
            batch = b.lease_push(5, 300, ["th"])
            for t in batch:
                b.complete(t, "th")
            with lock:
                leased.extend(t.name for t in batch)
            if not batch and done_adding.is_set():
                return

    adders = [threading.Thread(target=adder, args=(k,)) for k in range(4)]
    leasers = [threading.Thread(target=leaser) for _ in range(3)]
    for t in adders + leasers:
        t.start()
    for t in adders:
        t.join()
    done_adding.set()
    for t in leasers:
        t.join()
    assert sorted(leased) == sorted(f"t{k}-{i}" for k in range(4) for i in range(100))
    gc.collect()
    assert len(b._conns) <= 2  # the ended threads' connections are closed
    b.close()
    assert b._conns == []
    assert b.queue_stats(["th"])[0].tasks == 0  # reopens after close


def test_connections_of_ended_threads_are_closed(tmp_path: Path) -> None:
    b = connect(f"sqlite:///{tmp_path}/short.db")
    b.add(push("main"))

    def one_add(i: int) -> None:
        b.add(push(f"short-{i}"))

    for i in range(20):  # a thread per request, as in a threaded dev server
        t = threading.Thread(target=one_add, args=(i,))
        t.start()
        t.join()
    gc.collect()
    assert len(b._conns) <= 2  # the main thread's, and perhaps the last thread's
    assert len(b.list_tasks("default")) == 21
    b.close()


def test_expired_rows_are_swept(tmp_path: Path) -> None:
    b = connect(f"sqlite:///{tmp_path}/sweep.db", tombstone_ttl=0.1)
    assert isinstance(b, SQLiteBackend)
    b.add_multi([push(f"s{i}") for i in range(50)])
    for t in b.lease_push(50, 30):
        b.complete(t, "default")
    count = "SELECT count(*) FROM tq_tasks"
    assert b._conn().execute(count).fetchone() == (50,)
    time.sleep(0.15)
    b._next_sweep = 0.0
    assert b.lease_push(10, 30) == []
    assert b._conn().execute(count).fetchone() == (0,)
    b.close()


def test_fork_child_opens_its_own_connection(tmp_path: Path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork() here")
    b = connect(f"sqlite:///{tmp_path}/fork.db")
    b.add(push("parent"))
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=b.add, args=(push("child"),))
    p.start()
    p.join(timeout=30)
    assert p.exitcode == 0
    assert sorted(t.name for t in b.list_tasks("default")) == ["child", "parent"]
    b.close()
