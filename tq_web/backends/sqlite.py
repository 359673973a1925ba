"""The SQLite backend (``sqlite:///relative.db``, ``sqlite:////abs/path.db``).

The embedded default: the standard library's :mod:`sqlite3`, one file, safe
for many threads and many processes at once. The state model is the one in
:mod:`tq_web.backends.base`, and the behaviour is the memory backend's.

How it works:

* WAL journal mode; every connection uses ``isolation_level=None`` and each
  write transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock
  up front, so a transaction never has to upgrade a read lock, which WAL can
  refuse with ``SQLITE_BUSY`` whatever the busy timeout).
* One connection per thread; :meth:`SQLiteBackend.close` closes them all.
* Durability: a task is committed to the WAL before ``add`` returns, so it
  survives ``kill -9`` of any process. Power loss needs ``synchronous=FULL``.
* Times are INTEGER microseconds since the epoch (the backend's clock, never
  SQL time functions), so a lease expiry compares exactly as a lease token.
* Leasing is one index range scan whatever the table size; expired tombstones
  and failed tasks are deleted lazily (on ``add`` of the same name) and swept
  in small batches from ``lease_push``.

Options (keyword arguments or the URL's query string,
``sqlite:///q.db?synchronous=FULL&tombstone_ttl=600``): ``synchronous``
(``NORMAL`` by default, or ``FULL``/``EXTRA``), ``busy_timeout`` (seconds,
default 30), and :class:`~tq_web.backends.base.BackendBase`'s ``clock``,
``tombstone_ttl``, ``failed_ttl`` and ``queues``.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from json.encoder import encode_basestring_ascii as _jstr
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .._time import Duration, from_us, to_timedelta, to_us
from ..exceptions import ConfigurationError, InvalidBackendURL, Transient
from ..taskqueue import (
    LeaseExpired,
    MultiError,
    QueueStatistics,
    RetryOptions,
    Task,
    TaskAlreadyAdded,
    TaskNotFound,
)
from .base import BackendBase

__all__ = ["SCHEMA_VERSION", "SQLiteBackend"]

SCHEMA_VERSION = 1
"""The schema version stored in ``PRAGMA user_version``."""

PENDING, DONE, FAILED = 0, 1, 2
_STATE_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
_STATES = {"pending": PENDING, "done": DONE, "failed": FAILED}
_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_URL_OPTIONS = ("synchronous", "busy_timeout", "tombstone_ttl", "failed_ttl")

PAGE_SIZE = 2048
"""The page size of new database files (SQLite's default is 4096)."""
SWEEP_INTERVAL = 5.0
"""Seconds between sweeps of expired tombstones and failed tasks."""
SWEEP_BATCH = 1000
"""Rows deleted per sweep transaction (keeps the write lock short)."""

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS tq_tasks (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        name TEXT NOT NULL,
        state INTEGER NOT NULL DEFAULT 0,
        is_pull INTEGER NOT NULL,
        leased INTEGER NOT NULL DEFAULT 0,
        eta INTEGER NOT NULL,
        scheduled_eta INTEGER NOT NULL,
        expires INTEGER,
        done_at INTEGER,
        retry_count INTEGER NOT NULL DEFAULT 0,
        execution_count INTEGER NOT NULL DEFAULT 0,
        previous_response INTEGER NOT NULL DEFAULT 0,
        first_attempt INTEGER,
        last_status INTEGER NOT NULL DEFAULT 0,
        method TEXT NOT NULL,
        tag TEXT NOT NULL DEFAULT '',
        retry_reason TEXT NOT NULL DEFAULT '',
        retry_options TEXT,
        headers TEXT,
        path TEXT NOT NULL,
        last_response TEXT NOT NULL DEFAULT '',
        payload BLOB NOT NULL
    )
    """,
    # Names are unique per queue (tombstones and failed tasks keep theirs).
    "CREATE UNIQUE INDEX IF NOT EXISTS tq_tasks_name ON tq_tasks (queue, name)",
    # lease, lease_by_tag, lease_push: one range scan per queue in (eta, id)
    # order (equal ETAs in insertion order); counts per queue and state.
    # lease_push over every queue merges the queues' scans: a second,
    # queue-less index would slow every add.
    "CREATE INDEX IF NOT EXISTS tq_tasks_due ON tq_tasks (queue, state, is_pull, eta)",
    # The sweep of expired tombstones and failed tasks.
    "CREATE INDEX IF NOT EXISTS tq_tasks_expires ON tq_tasks (expires)"
    " WHERE expires IS NOT NULL",
    # executed_1_minute.
    "CREATE INDEX IF NOT EXISTS tq_tasks_done ON tq_tasks (queue, done_at)"
    " WHERE done_at IS NOT NULL",
    """
    CREATE TABLE IF NOT EXISTS tq_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID
    """,
)

# The columns a Task is built from (payload last: it may spill to overflow pages).
_COLS = (
    "queue, name, state, leased, eta, scheduled_eta, retry_count, execution_count,"
    " previous_response, first_attempt, last_status, method, tag, retry_reason,"
    " retry_options, headers, path, last_response, payload"
)

# Insert a task; an expired tombstone or failed task of the same name is replaced
# in the same statement. No row changes when the name is taken.
_INSERT = (
    "INSERT INTO tq_tasks (queue, name, is_pull, eta, scheduled_eta, method, tag,"
    " retry_options, headers, path, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (queue, name) DO UPDATE SET"
    " state = 0, is_pull = excluded.is_pull, leased = 0, eta = excluded.eta,"
    " scheduled_eta = excluded.scheduled_eta, expires = NULL, done_at = NULL,"
    " retry_count = 0, execution_count = 0, previous_response = 0,"
    " first_attempt = NULL, last_status = 0, method = excluded.method,"
    " tag = excluded.tag, retry_reason = '', retry_options = excluded.retry_options,"
    " headers = excluded.headers, path = excluded.path, last_response = '',"
    " payload = excluded.payload"
    " WHERE tq_tasks.expires IS NOT NULL AND tq_tasks.expires <= ?"
)

_TAKEN = (
    "SELECT name FROM tq_tasks WHERE queue = ?"
    " AND name IN (SELECT value FROM json_each(?))"
    " AND (expires IS NULL OR expires > ?)"
)

_SWEEP = (
    "DELETE FROM tq_tasks WHERE id IN (SELECT id FROM tq_tasks"
    " WHERE expires IS NOT NULL AND expires <= ? LIMIT ?)"
)

_QUEUES = (
    # A loose index scan: one index seek per distinct queue.
    "WITH RECURSIVE q(name) AS ("
    " SELECT min(queue) FROM tq_tasks"
    " UNION ALL"
    " SELECT (SELECT min(queue) FROM tq_tasks WHERE queue > q.name)"
    " FROM q WHERE q.name IS NOT NULL)"
    " SELECT name FROM q WHERE name IS NOT NULL"
)
_DUE = (
    "SELECT id, eta FROM tq_tasks INDEXED BY tq_tasks_due"
    " WHERE queue = ? AND state = 0 AND is_pull = 0 AND eta <= ?"
    " ORDER BY eta, id LIMIT ?"
)

_CLAIM = (
    "UPDATE tq_tasks SET retry_count = retry_count + 1,"
    " first_attempt = coalesce(first_attempt, ?), eta = ?, leased = 1"
    " WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, " + _COLS
)


class _Process:
    """Per-process state, renewed in a forked child.

    ``forks`` tells connections inherited over ``fork()`` (which must not be
    used) from the child's own; ``prefix`` and ``counter`` feed
    :meth:`SQLiteBackend.new_name`.
    """

    def __init__(self) -> None:
        self.forks = 0
        self.reset()

    def reset(self) -> None:
        self.forks += 1
        self.prefix = os.urandom(7).hex()
        self.counter = map((0xFFFFF).__and__, itertools.count())


_PROCESS = _Process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_PROCESS.reset)


class _Handle:
    """A thread's connection (held in a thread-local)."""

    __slots__ = ("__weakref__", "conn", "forks", "generation")

    def __init__(self, conn: sqlite3.Connection, generation: int, forks: int) -> None:
        self.conn = conn
        self.generation = generation
        self.forks = forks


def _release(
    conns: list[sqlite3.Connection], conn: sqlite3.Connection, forks: int
) -> None:
    """Forget and close a connection whose thread has ended."""
    try:
        conns.remove(conn)
    except ValueError:
        pass  # close() got there first
    if forks == _PROCESS.forks:  # never close a connection inherited over fork()
        conn.close()


def _is_transient(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


def _load_options(text: str | None) -> RetryOptions | None:
    return None if text is None else RetryOptions.from_json(text)


def _dump_headers(headers: dict[str, str]) -> str:
    try:  # the common case, str to str, twice as fast as json.dumps
        items = [_jstr(k) + ":" + _jstr(v) for k, v in headers.items()]
        return "{" + ",".join(items) + "}"
    except TypeError:
        return json.dumps(headers)


def _opt_us(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


def _row_task(row: Sequence[Any]) -> Task:
    """Build a Task from the ``_COLS`` columns of a row."""
    (
        queue,
        name,
        state,
        leased,
        eta,
        sched,
        rcount,
        ecount,
        prev,
        first,
        lstatus,
        method,
        tag,
        reason,
        ropts,
        headers,
        path,
        lresp,
        payload,
    ) = row
    return Task(
        path=path,
        payload=bytes(payload),
        headers=json.loads(headers) if headers else {},
        method=method,
        name=name,
        eta=from_us(eta),
        retry_count=rcount,
        tag=tag,
        retry_options=_load_options(ropts),
        queue_name=queue,
        scheduled_eta=from_us(sched),
        execution_count=ecount,
        previous_response=prev,
        retry_reason=reason,
        first_attempt=_opt_us(first),
        state="leased" if state == PENDING and leased else _STATE_NAMES[state],
        last_status=lstatus,
        last_response=lresp,
    )


def _url_value(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split a ``sqlite://`` URL into an absolute file path and its query options.

    ``sqlite:///relative.db`` is relative to the current working directory,
    ``sqlite:////abs/path.db`` is absolute. Numeric query values become floats.

    Raises:
        InvalidBackendURL: not a ``sqlite:///path`` URL, or an unknown option.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
        raise InvalidBackendURL(
            f"invalid SQLite URL {url!r}: use sqlite:///relative.db or "
            "sqlite:////absolute/path.db"
        )
    path = unquote(parts.path[1:])
    if not path or path == ":memory:" or path.startswith("file:"):
        raise InvalidBackendURL(
            f"invalid SQLite URL {url!r}: name a database file "
            "(use memory:// for an in-memory queue)"
        )
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URL_OPTIONS:
            raise InvalidBackendURL(
                f"unknown option {key!r} in SQLite URL {url!r}: "
                f"use {', '.join(_URL_OPTIONS)}"
            )
        options[key] = _url_value(value)
    return os.path.abspath(path), options


class SQLiteBackend(BackendBase):
    """A backend that keeps its queues in one SQLite file.

    Safe for many threads (one connection each) and many processes on the
    same file. See the module docstring for the storage model.

    Args:
        url: ``sqlite:///relative.db`` (relative to the working directory) or
            ``sqlite:////abs/path.db``, optionally with options in the query.
        **options: ``synchronous`` (``"NORMAL"`` or ``"FULL"``/``"EXTRA"`` for
            power-loss durability), ``busy_timeout`` (seconds, default 30), and
            :class:`BackendBase`'s ``clock``, ``tombstone_ttl``, ``failed_ttl``,
            ``queues``. Keyword arguments win over the URL's query string.

    Raises:
        InvalidBackendURL: the URL is not a SQLite file URL.
        ConfigurationError: a bad option, a missing directory, or a database
            written by a newer tq_web.
    """

    def __init__(self, url: str, **options: Any) -> None:
        path, url_options = parse_url(url)
        merged = {**url_options, **options}
        synchronous = str(merged.pop("synchronous", "NORMAL")).upper()
        if synchronous not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, "
                f"got {synchronous!r}"
            )
        busy = to_timedelta(merged.pop("busy_timeout", 30.0), "busy_timeout")
        super().__init__(**merged)
        self.url = url
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy.total_seconds() if busy is not None else 30.0
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise ConfigurationError(
                f"cannot open SQLite database {path}: "
                f"directory {directory} does not exist"
            )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._generation = 0  # bumped by close(): threads reopen
        self._forks = _PROCESS.forks
        self._next_sweep = 0.0
        self._key: str | None = None
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    # --- connections, transactions, errors ---
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and after close/fork)."""
        handle: _Handle | None = getattr(self._local, "handle", None)
        if (
            handle is not None
            and handle.generation == self._generation
            and handle.forks == _PROCESS.forks
        ):
            return handle.conn
        return self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=256,
        )
        try:
            # Only takes effect when the file is new: small pages make the WAL
            # frames each commit writes (one per b-tree touched) cheaper.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA cache_size = -16000")
        except sqlite3.DatabaseError as err:
            conn.close()
            if isinstance(err, sqlite3.OperationalError) and _is_transient(err):
                raise self._busy(err) from err
            raise ConfigurationError(
                f"cannot open SQLite database {self.path}: {err}"
            ) from err
        if str(mode).lower() != "wal":
            conn.close()
            raise ConfigurationError(
                f"cannot put SQLite database {self.path} in WAL mode (got {mode!r})"
            )
        with self._lock:
            if self._forks != _PROCESS.forks:
                # A forked child must not use (or close) its parent's connections.
                self._conns = []
                self._forks = _PROCESS.forks
            self._conns.append(conn)
            handle = _Handle(conn, self._generation, self._forks)
            # Closed when the thread ends (its thread-local state is dropped).
            weakref.finalize(handle, _release, self._conns, conn, self._forks)
        self._local.handle = handle
        return conn

    def _busy(self, err: sqlite3.OperationalError) -> Transient:
        return Transient(f"SQLite database {self.path} is busy: {err}")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate "database is locked"/"busy" into Transient; all else surfaces."""
        try:
            yield
        except sqlite3.OperationalError as err:
            if _is_transient(err):
                raise self._busy(err) from err
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), rolled back on any error."""
        with self._errors():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot, never upgraded to a write."""
        with self._errors():
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.rollback()

    def migrate(self) -> None:
        """Create or upgrade the schema (idempotent; ``connect()`` calls it).

        Raises:
            ConfigurationError: the database was written by a newer tq_web.
        """
        with self._errors():
            conn = self._conn()
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == SCHEMA_VERSION:
                return
            with self._write() as conn:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"SQLite database {self.path} has schema version {version}; "
                        f"this tq_web knows up to {SCHEMA_VERSION}: upgrade tq_web"
                    )
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close every connection this backend opened (it reopens if used again)."""
        with self._lock:
            conns, self._conns = self._conns, []
            self._generation += 1
            mine = self._forks == _PROCESS.forks
        if mine:  # never close connections inherited over fork()
            for conn in conns:
                conn.close()

    def signing_key(self) -> str:
        """The signing key stored in this database, created on first use.

        Every process and thread on the same file gets the same key.
        """
        if self._key is not None:
            return self._key
        query = "SELECT value FROM tq_meta WHERE key = 'signing_key'"
        with self._errors():
            row = self._conn().execute(query).fetchone()
        if row is None:
            with self._write() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO tq_meta (key, value)"
                    " VALUES ('signing_key', ?)",
                    (self.generate_key(),),
                )
                row = conn.execute(query).fetchone()
        self._key = str(row[0])
        return self._key

    @staticmethod
    def new_name() -> str:
        """A unique name for an unnamed task: 32 hex digits, time-ordered.

        The time prefix makes inserts into the name index append-mostly (it
        stays cache-friendly at millions of rows); then 56 random bits drawn
        once per process and a counter.
        """
        proc = _PROCESS
        return f"{time.time_ns() // 1000:013x}{proc.prefix}{next(proc.counter):05x}"

    # --- seed 000 ---
    def _row(self, stored: Task) -> tuple[Any, ...]:
        assert stored.eta is not None
        eta = to_us(stored.eta)
        return (
            stored.queue_name,
            stored.name,
            1 if stored.method == "PULL" else 0,
            eta,
            eta,
            stored.method,
            stored.tag,
            None if stored.retry_options is None else stored.retry_options.to_json(),
            _dump_headers(stored.headers) if stored.headers else None,
            stored.path,
            stored.payload,
        )

    def add(self, task: Task, queue_name: str = "") -> Task:
        """Add a task; return a new Task with name and eta filled in.

        Raises:
            TaskAlreadyAdded: the name is taken (or tombstoned).
            ValueError: the task or the queue name is malformed.
            Transient: the database stayed locked for ``busy_timeout``.
        """
        q = self.queue(queue_name)
        now = self.now()
        stored = self.prepare(task, q, now)
        params = (*self._row(stored), to_us(now))
        # The hot path: _write() written out (one short BEGIN IMMEDIATE transaction).
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                added = conn.execute(_INSERT, params).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        except sqlite3.OperationalError as err:
            if _is_transient(err):
                raise self._busy(err) from err
            raise
        if added != 1:
            raise TaskAlreadyAdded(stored.name, q)
        return stored

    def add_multi(self, tasks: Sequence[Task], queue_name: str = "") -> list[Task]:
        """Add several tasks in one transaction, each independently (not atomic).

        Raises:
            MultiError: one entry per task, ``None`` where it worked.
        """
        tasks = list(tasks)
        if not tasks:
            return []
        results: list[Task | None] = [None] * len(tasks)
        errors: list[BaseException | None] = [None] * len(tasks)
        try:
            q = self.queue(queue_name)
        except ValueError:
            for i in range(len(tasks)):
                try:
                    self.queue(queue_name)
                except ValueError as err:
                    errors[i] = err
            raise MultiError(errors, results) from None
        now = self.now()
        now_us = to_us(now)
        prepared: list[tuple[int, Task]] = []
        named: list[str] = []
        for i, t in enumerate(tasks):
            try:
                stored = self.prepare(t, q, now)
            except ValueError as err:
                errors[i] = err
                continue
            prepared.append((i, stored))
            if t.name:
                named.append(stored.name)
        with self._write() as conn:
            taken: set[str] = set()
            if named:
                taken = {
                    row[0]
                    for row in conn.execute(_TAKEN, (q, json.dumps(named), now_us))
                }
            rows: list[tuple[Any, ...]] = []
            for i, stored in prepared:
                if stored.name in taken:
                    errors[i] = TaskAlreadyAdded(stored.name, q)
                    continue
                taken.add(stored.name)
                rows.append((*self._row(stored), now_us))
                results[i] = stored
            if rows:
                added = conn.executemany(_INSERT, rows).rowcount
                if added != len(rows):  # pragma: no cover - a generated name collided
                    raise Transient(f"task name collision in queue {q!r}; try again")
        if any(e is not None for e in errors):
            raise MultiError(errors, results)
        return [r for r in results if r is not None]

    def _delete_one(
        self, conn: sqlite3.Connection, task: Task, q: str, now: datetime
    ) -> None:
        changed = conn.execute(
            "UPDATE tq_tasks SET state = 1, leased = 0, expires = ?"
            " WHERE queue = ? AND name = ? AND state != 1"
            " AND (expires IS NULL OR expires > ?)",
            (to_us(now + self.tombstone_ttl), q, task.name, to_us(now)),
        ).rowcount
        if changed != 1:
            raise TaskNotFound(task.name, q)

    def delete(self, task: Task, queue_name: str = "") -> None:
        """Delete a task by name, leaving a tombstone.

        Raises:
            TaskNotFound: unknown or already tombstoned.
        """
        q = self.queue(queue_name)
        now = self.now()
        with self._write() as conn:
            self._delete_one(conn, task, q, now)

    def delete_multi(self, tasks: Sequence[Task], queue_name: str = "") -> None:
        """Delete several tasks in one transaction.

        Raises:
            MultiError: one entry per task (``TaskNotFound`` or ``None``).
        """
        tasks = list(tasks)
        if not tasks:
            return
        q = self.queue(queue_name)
        now = self.now()
        errors: list[BaseException | None] = []
        with self._write() as conn:
            for t in tasks:
                try:
                    self._delete_one(conn, t, q, now)
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
        now = self.now()
        now_us = to_us(now)
        expiry_us = to_us(now + lease)
        failed_expiry = to_us(now + self.failed_ttl)
        due = (
            " FROM tq_tasks INDEXED BY tq_tasks_due"
            " WHERE queue = ? AND state = 0 AND is_pull = 1 AND eta <= ?"
        )
        select = "SELECT id, retry_count, retry_options" + due
        select += " AND tag = ?" if tag is not None else ""
        select += " ORDER BY eta, id LIMIT ?"
        out: list[Task] = []
        with self._write() as conn:
            if tag == "":  # the tag of the earliest due task
                first = conn.execute(
                    "SELECT tag" + due + " ORDER BY eta, id LIMIT 1", (q, now_us)
                ).fetchone()
                if first is None:
                    return []
                tag = str(first[0])
            while len(out) < max_tasks:
                want = max_tasks - len(out)
                params: tuple[Any, ...] = (q, now_us)
                params += (tag, want) if tag is not None else (want,)
                rows = conn.execute(select, params).fetchall()
                if not rows:
                    break
                order: dict[int, int] = {}
                failed: list[int] = []
                for row_id, retry_count, ropts in rows:
                    limit = self.pull_retry_limit(_load_options(ropts), q)
                    if limit is not None and retry_count >= limit + 1:
                        failed.append(row_id)
                    else:
                        order[row_id] = len(order)
                if failed:
                    conn.execute(
                        "UPDATE tq_tasks SET state = 2, leased = 0, expires = ?,"
                        " last_response = 'lease limit exceeded'"
                        " WHERE id IN (SELECT value FROM json_each(?))",
                        (failed_expiry, json.dumps(failed)),
                    )
                if order:
                    leased = conn.execute(
                        "UPDATE tq_tasks SET retry_count = retry_count + 1, eta = ?,"
                        " leased = 1 WHERE id IN (SELECT value FROM json_each(?))"
                        " RETURNING id, " + _COLS,
                        (expiry_us, json.dumps(list(order))),
                    ).fetchall()
                    leased.sort(key=lambda r: order[r[0]])
                    out.extend(_row_task(r[1:]) for r in leased)
                if len(rows) < want:
                    break
        return out

    def modify_lease(
        self, task: Task, queue_name: str, lease_seconds: Duration
    ) -> None:
        """Extend or give back (``0``) a lease; moves ``task.eta`` to the new expiry.

        Raises:
            TaskNotFound: no such task.
            LeaseExpired: the caller's lease has expired or was taken over.
        """
        lease = self.lease_duration(lease_seconds)
        q = self.queue(queue_name)
        now = self.now()
        now_us = to_us(now)
        new_eta = now + lease
        with self._write() as conn:
            changed = 0
            if task.eta is not None:
                changed = conn.execute(
                    "UPDATE tq_tasks SET eta = ?, leased = ?"
                    " WHERE queue = ? AND name = ? AND state = 0 AND leased = 1"
                    " AND eta = ? AND eta > ?",
                    (
                        to_us(new_eta),
                        1 if lease > timedelta(0) else 0,
                        q,
                        task.name,
                        to_us(task.eta),
                        now_us,
                    ),
                ).rowcount
            if changed != 1:
                row = conn.execute(
                    "SELECT 1 FROM tq_tasks WHERE queue = ? AND name = ? AND state = 0",
                    (q, task.name),
                ).fetchone()
                if row is None:
                    raise TaskNotFound(task.name, q)
                raise LeaseExpired(task.name, q)
        task.eta = new_eta

    def purge(self, queue_name: str) -> None:
        """Remove every pending task of a queue (tombstones and failed stay)."""
        q = self.queue(queue_name)
        with self._write() as conn:
            conn.execute("DELETE FROM tq_tasks WHERE queue = ? AND state = 0", (q,))

    def queue_stats(self, queue_names: Sequence[str]) -> list[QueueStatistics]:
        """Statistics for each named queue, in order."""
        names = [self.queue(name) for name in queue_names]
        now = self.now()
        now_us = to_us(now)
        minute_ago = to_us(now - timedelta(minutes=1))
        out: list[QueueStatistics] = []
        with self._read() as conn:
            for q in names:
                tasks, oldest, in_flight = conn.execute(
                    "SELECT count(*), min(scheduled_eta),"
                    " coalesce(sum(leased = 1 AND eta > ?), 0)"
                    " FROM tq_tasks WHERE queue = ? AND state = 0",
                    (now_us, q),
                ).fetchone()
                (failed,) = conn.execute(
                    "SELECT count(*) FROM tq_tasks WHERE queue = ? AND state = 2"
                    " AND (expires IS NULL OR expires > ?)",
                    (q, now_us),
                ).fetchone()
                (executed,) = conn.execute(
                    "SELECT count(*) FROM tq_tasks INDEXED BY tq_tasks_done"
                    " WHERE queue = ? AND done_at IS NOT NULL AND done_at > ?",
                    (q, minute_ago),
                ).fetchone()
                out.append(
                    QueueStatistics(
                        tasks=tasks,
                        oldest_eta=_opt_us(oldest),
                        executed_1_minute=executed,
                        in_flight=in_flight,
                        enforced_rate=self.queue_config(q).rate,
                        failed=failed,
                    )
                )
        return out

    # --- runner and tooling ---
    def _sweep(self, now_us: int) -> None:
        """Delete one bounded batch of expired tombstones and failed tasks."""
        with self._write() as conn:
            deleted = conn.execute(_SWEEP, (now_us, SWEEP_BATCH)).rowcount
        # A full batch means more are waiting: sweep again on the next call.
        self._next_sweep = time.monotonic() + (
            0.0 if deleted >= SWEEP_BATCH else SWEEP_INTERVAL
        )

    @staticmethod
    def _all_queues(conn: sqlite3.Connection) -> list[str]:
        return [str(r[0]) for r in conn.execute(_QUEUES)]

    def _due_push(
        self, conn: sqlite3.Connection, queues: list[str] | None, now_us: int, n: int
    ) -> list[int]:
        if queues is None:
            queues = self._all_queues(conn)
        if len(queues) == 1:
            return [r[0] for r in conn.execute(_DUE, (queues[0], now_us, n))]
        # One index range per queue, merged: each part is bounded by n.
        rows: list[tuple[int, int]] = []
        for q in queues:
            rows.extend(conn.execute(_DUE, (q, now_us, n)))
        rows.sort(key=lambda r: (r[1], r[0]))
        return [r[0] for r in rows[:n]]

    def lease_push(
        self,
        max_tasks: int,
        lease_seconds: Duration,
        queue_names: Sequence[str] | None = None,
    ) -> list[Task]:
        """Lease due push tasks of the given queues (all when None), earliest first.

        The claim is atomic (one ``BEGIN IMMEDIATE`` transaction), so concurrent
        runners in any number of processes never get the same task. See
        :meth:`tq_web.backends.base.Backend.lease_push` for the fields set.
        """
        lease = self.lease_duration(lease_seconds)
        queues = None
        if queue_names is not None:
            queues = sorted({self.queue(q) for q in queue_names})
            if not queues:
                return []
        if max_tasks < 1:
            return []
        now = self.now()
        now_us = to_us(now)
        if time.monotonic() >= self._next_sweep:
            self._sweep(now_us)
        with self._write() as conn:
            ids = self._due_push(conn, queues, now_us, max_tasks)
            if not ids:
                return []
            order = {row_id: i for i, row_id in enumerate(ids)}
            rows = conn.execute(
                _CLAIM, (now_us, to_us(now + lease), json.dumps(ids))
            ).fetchall()
        rows.sort(key=lambda r: order[r[0]])
        return [_row_task(r[1:]) for r in rows]

    def complete(self, task: Task, queue_name: str) -> None:
        """Mark a leased task done (a tombstone), whoever holds the lease now."""
        q = self.queue(queue_name)
        now = self.now()
        with self._write() as conn:
            conn.execute(
                "UPDATE tq_tasks SET state = 1, leased = 0, expires = ?, done_at = ?"
                " WHERE queue = ? AND name = ? AND state = 0",
                (to_us(now + self.tombstone_ttl), to_us(now), q, task.name),
            )

    def complete_many(self, tasks: Sequence[Task]) -> None:
        """Mark several leased tasks done in one transaction."""
        if not tasks:
            return
        now = self.now()
        expires, done = to_us(now + self.tombstone_ttl), to_us(now)
        rows = [(expires, done, self.queue(t.queue_name), t.name) for t in tasks]
        with self._write() as conn:
            conn.executemany(
                "UPDATE tq_tasks SET state = 1, leased = 0, expires = ?, done_at = ?"
                " WHERE queue = ? AND name = ? AND state = 0",
                rows,
            )

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

        Returns False, doing nothing, when the caller's lease was lost.
        """
        q = self.queue(queue_name)
        if task.eta is None:
            return False
        eta_us = to_us(eta)
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE tq_tasks SET eta = ?, scheduled_eta = ?, previous_response = ?,"
                " retry_reason = ?, execution_count = execution_count + ?, leased = 0"
                " WHERE queue = ? AND name = ? AND state = 0 AND eta = ?",
                (
                    eta_us,
                    eta_us,
                    status,
                    reason,
                    1 if executed else 0,
                    q,
                    task.name,
                    to_us(task.eta),
                ),
            ).rowcount
        return changed == 1

    def fail(self, task: Task, queue_name: str, status: int, response: str) -> bool:
        """Move a leased task to the failed state. False if the lease was lost."""
        q = self.queue(queue_name)
        if task.eta is None:
            return False
        now = self.now()
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE tq_tasks SET state = 2, leased = 0, expires = ?,"
                " last_status = ?, last_response = ?, previous_response = ?"
                " WHERE queue = ? AND name = ? AND state = 0 AND eta = ?",
                (
                    to_us(now + self.failed_ttl),
                    status,
                    response,
                    status,
                    q,
                    task.name,
                    to_us(task.eta),
                ),
            ).rowcount
        return changed == 1

    def list_tasks(
        self, queue_name: str | None = None, state: str = "pending", limit: int = 100
    ) -> list[Task]:
        """Tasks in a state (``pending``, ``failed``, ``done``), earliest ETA first.

        Raises:
            ValueError: an unknown state.
        """
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}: use pending, failed or done")
        params: tuple[Any, ...] = (_STATES[state], to_us(self.now()))
        where = "state = ? AND (expires IS NULL OR expires > ?)"
        if queue_name is not None:
            where = "queue = ? AND " + where
            params = (self.queue(queue_name), *params)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLS} FROM tq_tasks WHERE {where}"
                " ORDER BY scheduled_eta, name, queue LIMIT ?",
                (*params, max(0, limit)),
            ).fetchall()
        return [_row_task(r) for r in rows]

    def requeue_failed(
        self, queue_name: str | None = None, names: Sequence[str] | None = None
    ) -> int:
        """Make failed tasks pending again, due now; return how many."""
        now_us = to_us(self.now())
        where = "state = 2 AND (expires IS NULL OR expires > ?)"
        params: tuple[Any, ...] = (now_us, now_us, now_us)
        if queue_name is not None:
            where += " AND queue = ?"
            params += (self.queue(queue_name),)
        if names is not None:
            where += " AND name IN (SELECT value FROM json_each(?))"
            params += (json.dumps(list(names)),)
        with self._write() as conn:
            return conn.execute(
                "UPDATE tq_tasks SET state = 0, expires = NULL, leased = 0, eta = ?,"
                " scheduled_eta = ?, retry_count = 0, execution_count = 0,"
                f" first_attempt = NULL WHERE {where}",
                params,
            ).rowcount

    def next_eta(self, queue_names: Sequence[str] | None = None) -> datetime | None:
        """The earliest ETA of pending push tasks (leased ones included)."""
        wanted = None
        if queue_names is not None:
            wanted = {self.queue(name) for name in queue_names}
        etas: list[int] = []
        with self._read() as conn:
            for q in self._all_queues(conn) if wanted is None else wanted:
                (eta,) = conn.execute(
                    "SELECT min(eta) FROM tq_tasks"
                    " WHERE queue = ? AND state = 0 AND is_pull = 0",
                    (q,),
                ).fetchone()
                if eta is not None:
                    etas.append(eta)
        return _opt_us(min(etas, default=None))

    def queue_names(self) -> list[str]:
        """Every queue that holds or held tasks, sorted."""
        with self._read() as conn:
            return self._all_queues(conn)
