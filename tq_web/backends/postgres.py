"""The PostgreSQL backend (``postgresql://``): many runners, many machines.

Built on psycopg 3 (sync API) and a :class:`psycopg_pool.ConnectionPool`::

    backend = tq_web.connect("postgresql://app@db.internal/app?schema=tasks")

What it does:

* **Leasing** uses ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)``, so any
  number of runners on any number of machines share a queue and no task is handed
  to two of them during its lease. Due tasks are found through partial indexes
  ``WHERE state = 'pending'``: ``(eta, name)`` over the push tasks of every queue,
  ``(queue, pull, eta, name)`` per queue, so a lease reads only the rows it takes
  (plus dead index entries until vacuum) with a thousand or a million queued.
* **Times** come from the database clock (``clock_timestamp()``) unless the backend
  was given its own ``clock``: every machine agrees on ETAs and lease expiries.
* **Wake-ups**: every ``add`` of a push task sends a ``NOTIFY`` on a channel named
  after the schema; :meth:`PostgresBackend.wait_for_tasks` ``LISTEN`` s on a dedicated
  connection. ``listen=False`` (``?listen=0``) is the polling-only mode for
  PgBouncer in transaction pooling mode: no ``LISTEN`` and no prepared statements.
* **Transactional enqueue**: ``backend.add(task, queue, conn=connection)`` runs on
  the application's own psycopg connection (or SQLAlchemy ``Session`` /
  ``Connection``) without committing, so the task exists if and only if the
  application's transaction commits.
* **Schema**: created and migrated by the library (versioned in
  ``<schema>.tq_web_meta``) in a configurable schema (``schema="tq_web"``).
* **Housekeeping**: tombstones and failed tasks are deleted once their retention
  window ends, in batches of at most 1,000 rows (no long locks), at most every few
  seconds, from :meth:`PostgresBackend.lease_push`.

Connection errors (the server restarts, a connection is killed, the pool times
out) are raised as :class:`tq_web.Transient`; the pool replaces dead connections
by itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._time import Duration, require_aware, utcnow
from ..exceptions import ConfigurationError, InvalidBackendURL, InvalidTask, Transient
from ..exceptions import missing as _missing
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

_IMPORT_ERROR: ImportError | None = None
try:
    import psycopg
    from psycopg import conninfo as _conninfo
    from psycopg.rows import TupleRow, tuple_row
    from psycopg_pool import ConnectionPool
except ImportError as _err:  # pragma: no cover - exercised without the extra
    _IMPORT_ERROR = _err

__all__ = ["SCHEMA_VERSION", "PostgresBackend"]

log = logging.getLogger("tq_web.postgres")

SCHEMA_VERSION = 1
"""The schema version this module creates and understands."""

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_OWN_KEYS = frozenset(
    {
        "schema",
        "listen",
        "pool_size",
        "pool_timeout",
        "prepare",
        "tombstone_ttl",
        "failed_ttl",
    }
)
_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "f"})
_HOUSEKEEPING_EVERY = 5.0  # seconds between housekeeping passes
_HOUSEKEEPING_BATCH = 1000  # rows per DELETE
_CHUNK = 250  # rows per INSERT statement in add_multi

# stored task, explicit eta, delay in µs, named by the caller
_Row = tuple[Task, datetime | None, int, bool]
_COLUMN_NAMES = (
    "names",
    "pulls",
    "methods",
    "paths",
    "payloads",
    "headers",
    "tags",
    "ropts",
    "rlimits",
    "etas",
    "delays",
)


def _columns(rows: Sequence[_Row], shape: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """The insert parameters: one list per column, passed through ``shape``."""
    cols: list[list[Any]] = [[] for _ in _COLUMN_NAMES]
    (
        names,
        pulls,
        methods,
        paths,
        payloads,
        headers,
        tags,
        ropts,
        rlimits,
        etas,
        delays,
    ) = cols
    for s, eta, delay_us, _named in rows:
        opts = s.retry_options
        names.append(s.name)
        pulls.append(s.method == "PULL")
        methods.append(s.method)
        paths.append(s.path)
        payloads.append(s.payload)
        headers.append(json.dumps(s.headers, separators=(",", ":")))
        tags.append(s.tag)
        ropts.append(None if opts is None else opts.to_json())
        rlimits.append(opts.retry_limit if opts is not None else None)
        etas.append(eta)
        delays.append(delay_us)
    return {key: shape(col) for key, col in zip(_COLUMN_NAMES, cols, strict=True)}


_COLS = (
    "t.queue, t.name, t.state, t.leased, t.method, t.path, t.payload, t.headers, "
    "t.tag, t.retry_options, t.eta, t.scheduled_eta, t.retry_count, "
    "t.execution_count, t.previous_response, t.retry_reason, t.first_attempt, "
    "t.last_status, t.last_response"
)
_NCOLS = 19

# The statements below use {s} for the quoted schema name. ``c`` is a
# materialised one-row CTE holding "now": the caller's clock when the backend
# has one, else clock_timestamp() read once per statement.
_NOW_CTE = (
    "WITH c AS MATERIALIZED "
    "(SELECT COALESCE(%(now)s::timestamptz, clock_timestamp()) AS now)"
)

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE {s}.tasks (
            queue text NOT NULL,
            name text NOT NULL,
            state text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'done', 'failed')),
            pull boolean NOT NULL DEFAULT false,
            leased boolean NOT NULL DEFAULT false,
            method text NOT NULL DEFAULT 'POST',
            path text NOT NULL DEFAULT '',
            payload bytea NOT NULL DEFAULT '',
            headers text NOT NULL DEFAULT '{}',
            tag text NOT NULL DEFAULT '',
            retry_options text,
            retry_limit integer,
            eta timestamptz NOT NULL,
            scheduled_eta timestamptz NOT NULL,
            added_at timestamptz NOT NULL,
            retry_count integer NOT NULL DEFAULT 0,
            execution_count integer NOT NULL DEFAULT 0,
            previous_response integer NOT NULL DEFAULT 0,
            retry_reason text NOT NULL DEFAULT '',
            first_attempt timestamptz,
            last_status integer NOT NULL DEFAULT 0,
            last_response text NOT NULL DEFAULT '',
            expires timestamptz,
            completed_at timestamptz,
            PRIMARY KEY (queue, name)
        ) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.01,
                autovacuum_analyze_scale_factor = 0.02)""",
        # Due push tasks of every queue, earliest first (the runner's lease).
        "CREATE INDEX tasks_push_due ON {s}.tasks (eta, name)"
        " WHERE state = 'pending' AND NOT pull",
        # Due tasks of one queue: pull leases, and push leases of named queues.
        "CREATE INDEX tasks_queue_due ON {s}.tasks (queue, pull, eta, name)"
        " WHERE state = 'pending'",
        "CREATE INDEX tasks_expires ON {s}.tasks (expires) WHERE expires IS NOT NULL",
    ),
}

_SQL_ADD = (
    _NOW_CTE
    + """,
ins AS (
  INSERT INTO {s}.tasks AS t (queue, name, state, pull, leased, method, path,
      payload, headers, tag, retry_options, retry_limit, eta, scheduled_eta,
      added_at)
  SELECT %(queue)s, u.name, 'pending', u.pull, false, u.method, u.path,
      u.payload, u.headers, u.tag, u.ropts, u.rlimit,
      COALESCE(u.eta, c.now + u.delay_us * interval '1 microsecond'),
      COALESCE(u.eta, c.now + u.delay_us * interval '1 microsecond'),
      c.now
  FROM {source}
  CROSS JOIN c{conflict}
  RETURNING t.name, t.eta
)
SELECT ins.name, ins.eta{notify} FROM ins"""
)
# Named tasks: a taken name yields no row (never a unique violation, which
# would abort the caller's transaction); an expired tombstone or failed task of
# that name is taken over. Generated names are unique (time + 76 random bits)
# and skip this (a plain insert is twice as fast).
_ON_CONFLICT = """
  ON CONFLICT (queue, name) DO UPDATE SET
      state = 'pending', pull = EXCLUDED.pull, leased = false,
      method = EXCLUDED.method, path = EXCLUDED.path, payload = EXCLUDED.payload,
      headers = EXCLUDED.headers, tag = EXCLUDED.tag,
      retry_options = EXCLUDED.retry_options, retry_limit = EXCLUDED.retry_limit,
      eta = EXCLUDED.eta, scheduled_eta = EXCLUDED.scheduled_eta,
      added_at = EXCLUDED.added_at, retry_count = 0, execution_count = 0,
      previous_response = 0, retry_reason = '', first_attempt = NULL,
      last_status = 0, last_response = '', expires = NULL, completed_at = NULL
  WHERE t.expires <= EXCLUDED.added_at"""
_SOURCE_MANY = """unnest(%(names)b::text[], %(pulls)b::boolean[], %(methods)b::text[],
              %(paths)b::text[], %(payloads)b::bytea[], %(headers)b::text[],
              %(tags)b::text[], %(ropts)b::text[], %(rlimits)b::integer[],
              %(etas)b::timestamptz[], %(delays)b::bigint[])
       AS u(name, pull, method, path, payload, headers, tag, ropts, rlimit, eta,
            delay_us)"""
_SOURCE_ONE = """(VALUES (%(names)s::text, %(pulls)s::boolean, %(methods)s::text,
              %(paths)s::text, %(payloads)s::bytea, %(headers)s::text,
              %(tags)s::text, %(ropts)s::text, %(rlimits)s::integer,
              %(etas)s::timestamptz, %(delays)s::bigint))
       AS u(name, pull, method, path, payload, headers, tag, ropts, rlimit, eta,
            delay_us)"""
# A scalar subquery is evaluated once, and only if a row was inserted.
_NOTIFY_COL = ", (SELECT 1 FROM (SELECT pg_notify(%(channel)s, %(queue)s)) AS n)"

_SQL_DELETE = (
    _NOW_CTE
    + """
UPDATE {s}.tasks t SET state = 'done', leased = false, expires = c.now + %(ttl)s
FROM c
WHERE t.queue = %(queue)s AND t.name = ANY(%(names)s::text[]) AND t.state <> 'done'
  AND (t.expires IS NULL OR t.expires > c.now)
RETURNING t.name"""
)

_SQL_LEASE_PULL = (
    _NOW_CTE
    + """,
due AS (
  SELECT ctid AS tid, eta AS due_eta,
      COALESCE(retry_count >= COALESCE(retry_limit, %(qlimit)s::integer) + 1, false)
        AS over
  FROM {s}.tasks
  WHERE queue = %(queue)s AND state = 'pending' AND pull
    AND eta <= (SELECT now FROM c){tag}
  ORDER BY eta, name
  LIMIT %(n)s
  FOR UPDATE SKIP LOCKED
)
UPDATE {s}.tasks t SET
  state = CASE WHEN due.over THEN 'failed' ELSE 'pending' END,
  leased = NOT due.over,
  expires = CASE WHEN due.over THEN c.now + %(failed_ttl)s END,
  last_response = CASE WHEN due.over THEN 'lease limit exceeded'
                       ELSE t.last_response END,
  retry_count = t.retry_count + CASE WHEN due.over THEN 0 ELSE 1 END,
  eta = CASE WHEN due.over THEN t.eta ELSE c.now + %(lease)s END
FROM due, c
WHERE t.ctid = due.tid
RETURNING """
    + _COLS
    + ", due.due_eta, due.over"
)
_TAG_FIXED = " AND tag = %(tag)s"
_TAG_EARLIEST = """ AND tag = (
    SELECT e.tag FROM {s}.tasks e
    WHERE e.queue = %(queue)s AND e.state = 'pending' AND e.pull
      AND e.eta <= (SELECT now FROM c)
    ORDER BY e.eta, e.name LIMIT 1)"""

_SQL_LEASE_PUSH = (
    _NOW_CTE
    + """,
due AS ({due}
)
UPDATE {s}.tasks t SET
  eta = c.now + %(lease)s, leased = true, retry_count = t.retry_count + 1,
  first_attempt = COALESCE(t.first_attempt, c.now)
FROM due, c
WHERE t.ctid = due.tid
RETURNING """
    + _COLS
    + ", due.due_eta"
)
_DUE_ALL = """
  SELECT ctid AS tid, eta AS due_eta FROM {s}.tasks
  WHERE state = 'pending' AND NOT pull AND eta <= (SELECT now FROM c)
  ORDER BY eta, name
  LIMIT %(n)s
  FOR UPDATE SKIP LOCKED"""
# Per queue through tasks_queue_due ("ORDER BY x.pull" rules out the global
# index, which has no pull column), then merged; rows locked but not taken are
# released when the statement's transaction ends.
_DUE_QUEUES = """
  SELECT d.tid, d.eta AS due_eta
  FROM unnest(%(queues)s::text[]) AS qn(queue)
  CROSS JOIN LATERAL (
    SELECT x.ctid AS tid, x.eta, x.name FROM {s}.tasks x
    WHERE x.queue = qn.queue AND x.state = 'pending' AND NOT x.pull
      AND x.eta <= (SELECT now FROM c)
    ORDER BY x.pull, x.eta, x.name
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED) AS d
  ORDER BY d.eta, d.name
  LIMIT %(n)s"""

_SQL_MODIFY_LEASE = (
    _NOW_CTE
    + """
UPDATE {s}.tasks t SET eta = c.now + %(lease)s, leased = %(lease)s > interval '0'
FROM c
WHERE t.queue = %(queue)s AND t.name = %(name)s AND t.state = 'pending'
  AND t.leased AND t.eta = %(token)s AND t.eta > c.now
RETURNING t.eta"""
)

_SQL_COMPLETE = (
    _NOW_CTE
    + """
UPDATE {s}.tasks t SET state = 'done', leased = false, expires = c.now + %(ttl)s,
    completed_at = c.now
FROM c
WHERE t.queue = %(queue)s AND t.name = %(name)s AND t.state = 'pending'"""
)

_SQL_RETRY_LATER = """
UPDATE {s}.tasks t SET eta = %(eta)s, scheduled_eta = %(eta)s,
    previous_response = %(status)s, retry_reason = %(reason)s,
    execution_count = t.execution_count + %(inc)s, leased = false
WHERE t.queue = %(queue)s AND t.name = %(name)s AND t.state = 'pending'
  AND t.eta = %(token)s
RETURNING 1"""

_SQL_FAIL = (
    _NOW_CTE
    + """
UPDATE {s}.tasks t SET state = 'failed', leased = false,
    expires = c.now + %(ttl)s, last_status = %(status)s,
    last_response = %(response)s, previous_response = %(status)s
FROM c
WHERE t.queue = %(queue)s AND t.name = %(name)s AND t.state = 'pending'
  AND t.eta = %(token)s
RETURNING 1"""
)

_SQL_PURGE = "DELETE FROM {s}.tasks WHERE queue = %(queue)s AND state = 'pending'"

_SQL_STATS = (
    _NOW_CTE
    + """
SELECT t.queue,
  count(*) FILTER (WHERE t.state = 'pending'),
  min(t.scheduled_eta) FILTER (WHERE t.state = 'pending'),
  count(*) FILTER (WHERE t.completed_at > c.now - interval '1 minute'),
  count(*) FILTER (WHERE t.state = 'pending' AND t.leased AND t.eta > c.now),
  count(*) FILTER (WHERE t.state = 'failed' AND t.expires > c.now)
FROM {s}.tasks t CROSS JOIN c
WHERE t.queue = ANY(%(queues)s::text[])
GROUP BY t.queue, c.now"""
)

_SQL_LIST = (
    _NOW_CTE
    + """
SELECT """
    + _COLS
    + """
FROM {s}.tasks t CROSS JOIN c
WHERE t.state = %(state)s AND (t.expires IS NULL OR t.expires > c.now){queue}
ORDER BY t.scheduled_eta, t.name
LIMIT %(limit)s"""
)

_SQL_REQUEUE = (
    _NOW_CTE
    + """,
r AS (
  UPDATE {s}.tasks t SET state = 'pending', expires = NULL, leased = false,
      eta = c.now, scheduled_eta = c.now, retry_count = 0, execution_count = 0,
      first_attempt = NULL
  FROM c
  WHERE t.state = 'failed' AND t.expires > c.now{queue}{names}
  RETURNING t.pull
)
SELECT count(*), count(*) FILTER (WHERE NOT r.pull) FROM r"""
)

_SQL_NEXT_ETA = (
    "SELECT min(t.eta) FROM {s}.tasks t WHERE t.state = 'pending' AND NOT t.pull"
)
_SQL_NEXT_ETA_QUEUES = """
SELECT min(d.eta)
FROM unnest(%(queues)s::text[]) AS qn(queue)
CROSS JOIN LATERAL (
  SELECT x.eta FROM {s}.tasks x
  WHERE x.queue = qn.queue AND x.state = 'pending' AND NOT x.pull
  ORDER BY x.pull, x.eta LIMIT 1) AS d"""

_SQL_QUEUE_NAMES = """
WITH RECURSIVE q(queue) AS (
  (SELECT queue FROM {s}.tasks ORDER BY queue LIMIT 1)
  UNION ALL
  SELECT (SELECT t.queue FROM {s}.tasks t WHERE t.queue > q.queue
          ORDER BY t.queue LIMIT 1)
  FROM q WHERE q.queue IS NOT NULL
)
SELECT queue FROM q WHERE queue IS NOT NULL"""

_SQL_HOUSEKEEPING = (
    _NOW_CTE
    + """
DELETE FROM {s}.tasks t
WHERE t.ctid = ANY(ARRAY(
  SELECT x.ctid FROM {s}.tasks x
  WHERE x.expires <= (SELECT now FROM c)
    AND (x.completed_at IS NULL
         OR x.completed_at <= (SELECT now FROM c) - interval '1 minute')
  LIMIT %(batch)s
  FOR UPDATE SKIP LOCKED
)) AND t.expires <= (SELECT now FROM c)"""
)


def _parse_bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(
        f"{what} must be a boolean (1/0, true/false), got {value!r}"
    )


def _parse_number(value: object, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise ConfigurationError(f"{what} must be a number, got {value!r}") from None


def _aware(value: datetime) -> datetime:
    """A datetime from the database, in UTC."""
    return value.astimezone(UTC)


def _clean(text: str) -> str:
    """Text PostgreSQL can store (no NUL characters)."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _check_text(task: Task) -> None:
    """Refuse what PostgreSQL text columns cannot store (NUL characters)."""
    parts = [task.path, task.tag, task.method]
    parts.extend(task.headers)
    parts.extend(task.headers.values())
    for part in parts:
        if not isinstance(part, str):
            raise InvalidTask(
                f"task path, tag and headers must be strings, got {part!r}"
            )
        if "\x00" in part:
            raise InvalidTask(
                "task path, tag and headers may not contain NUL characters"
            )


def _row_to_task(row: Sequence[Any]) -> Task:
    (
        queue,
        name,
        state,
        leased,
        method,
        path,
        payload,
        headers,
        tag,
        ropts,
        eta,
        scheduled_eta,
        retry_count,
        execution_count,
        previous_response,
        retry_reason,
        first_attempt,
        last_status,
        last_response,
    ) = row[:_NCOLS]
    return Task(
        path=path,
        payload=bytes(payload),
        headers=json.loads(headers),
        method=method,
        name=name,
        eta=_aware(eta),
        retry_count=retry_count,
        tag=tag,
        retry_options=None if ropts is None else RetryOptions.from_json(ropts),
        queue_name=queue,
        scheduled_eta=_aware(scheduled_eta),
        execution_count=execution_count,
        previous_response=previous_response,
        retry_reason=retry_reason,
        first_attempt=None if first_attempt is None else _aware(first_attempt),
        state="leased" if state == "pending" and leased else state,
        last_status=last_status,
        last_response=last_response,
    )


def _readable(fd: int) -> bool:
    """Whether a socket has data (or EOF) waiting, without blocking."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        ready, _, _ = select.select([fd], [], [], 0)  # pragma: no cover - Windows
        return bool(ready)
    except (OSError, ValueError):
        return True


class PostgresBackend(BackendBase):
    """A backend on PostgreSQL (psycopg 3, a connection pool).

    Args:
        url: ``postgresql://user:password@host:port/dbname?...``; libpq
            parameters in the query string go to psycopg, tq_web's own
            (``schema``, ``listen``, ``pool_size``, ``pool_timeout``, ``prepare``,
            ``tombstone_ttl``, ``failed_ttl``) are taken out first. Keyword
            arguments win over the query string.
        **options: ``clock``, ``tombstone_ttl``, ``failed_ttl``, ``queues`` (see
            :class:`~tq_web.backends.base.BackendBase`), and:

            * ``schema`` (``"tq_web"``): the schema holding the tables, created
              and migrated when the backend opens.
            * ``pool_size`` (4): connections in the pool at most.
            * ``pool_timeout`` (10 s): how long to wait for a pooled connection
              before raising :class:`tq_web.Transient`.
            * ``listen`` (True): ``LISTEN``/``NOTIFY`` wake-ups. False is the
              polling-only mode for PgBouncer (transaction pooling):
              :meth:`wait_for_tasks` then just sleeps.
            * ``prepare`` (same as ``listen``): let psycopg prepare frequent
              statements on the server.

    Raises:
        MissingDependency: psycopg or psycopg-pool is not installed.
        ConfigurationError: a bad option or URL.
        Transient: the server cannot be reached.
    """

    def __init__(self, url: str, **options: Any) -> None:
        if _IMPORT_ERROR is not None:
            raise _missing("psycopg", "postgres", "The PostgreSQL backend") from (
                _IMPORT_ERROR
            )
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise InvalidBackendURL(f"not a PostgreSQL URL: {parts.scheme}://...")
        own: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _OWN_KEYS:
                own[key] = value
            else:
                rest.append((key, value))
        own.update(options)
        schema = own.pop("schema", "tq_web")
        listen = _parse_bool(own.pop("listen", True), "listen")
        prepare = _parse_bool(own.pop("prepare", listen), "prepare")
        pool_size = int(_parse_number(own.pop("pool_size", 4), "pool_size"))
        pool_timeout = _parse_number(own.pop("pool_timeout", 10.0), "pool_timeout")
        for key in ("tombstone_ttl", "failed_ttl"):
            if isinstance(own.get(key), str):
                own[key] = _parse_number(own[key], key)
        super().__init__(**own)
        if not isinstance(schema, str) or not _IDENT_RE.match(schema):
            raise ConfigurationError(
                f"invalid schema name {schema!r}: use 1-63 characters of "
                "[A-Za-z0-9_], not starting with a digit"
            )
        if pool_size < 1:
            raise ConfigurationError("pool_size must be >= 1")
        self.url = url
        self.schema: str = schema
        self.listen: bool = listen
        self.pool_size: int = pool_size
        self.pool_timeout: float = pool_timeout
        self._conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
        try:
            params = _conninfo.conninfo_to_dict(self._conninfo)
        except psycopg.Error as err:
            raise InvalidBackendURL(f"bad PostgreSQL URL: {str(err).strip()}") from None
        self._kwargs: dict[str, Any] = {"autocommit": True}
        if not prepare:
            self._kwargs["prepare_threshold"] = None
        if "application_name" not in params:
            self._kwargs["application_name"] = "tq_web"
        if "connect_timeout" not in params:
            self._kwargs["connect_timeout"] = max(1, int(pool_timeout))
        channel = f"tq_web:{schema}"
        if len(channel.encode()) > 63:  # pragma: no cover - schema <= 63 chars
            channel = "tq_web:" + hashlib.sha256(schema.encode()).hexdigest()[:32]
        self.channel: str = channel
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"tq_web:migrate:{schema}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        self._sql = self._render(f'"{schema}"')
        self._closed = False
        self._listen_conn: psycopg.Connection[TupleRow] | None = None
        self._listen_lock = threading.Lock()
        self._waiting = 0
        self._listen_failed = False
        self._housekeeping_lock = threading.Lock()
        self._next_housekeeping = 0.0
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            self._conninfo,
            kwargs=self._kwargs,
            min_size=1,
            max_size=pool_size,
            open=True,
            timeout=pool_timeout,
            name=f"tq_web:{schema}",
        )
        try:
            self.migrate()
        except BaseException:
            self._pool.close()
            raise

    @staticmethod
    def new_name() -> str:
        """A unique name for an unnamed task: 32 hex digits, time-ordered.

        Microseconds since the epoch (13 digits), then 76 random bits: new names
        land at the right edge of the primary key index (cheap inserts), and
        tasks due at the same time are leased in the order they were added.
        """
        return f"{time.time_ns() // 1000:013x}{os.urandom(10).hex()[:19]}"

    # --- plumbing ---
    @staticmethod
    def _render(s: str) -> dict[str, str]:
        def r(template: str, **extra: str) -> str:
            return (
                template.replace("{notify}", extra.get("notify", ""))
                .replace("{tag}", extra.get("tag", ""))
                .replace("{queues}", extra.get("queues", ""))
                .replace("{queue}", extra.get("queue", ""))
                .replace("{names}", extra.get("names", ""))
                .replace("{s}", s)
            )

        return {
            **{
                f"add_{size}{named}{notify}": r(
                    _SQL_ADD.replace("{source}", source).replace(
                        "{conflict}", _ON_CONFLICT if named else ""
                    ),
                    notify=_NOTIFY_COL if notify else "",
                )
                for size, source in (("one", _SOURCE_ONE), ("many", _SOURCE_MANY))
                for named in ("", "_named")
                for notify in ("", "_notify")
            },
            "delete": r(_SQL_DELETE),
            "lease": r(_SQL_LEASE_PULL),
            "lease_tag": r(_SQL_LEASE_PULL, tag=_TAG_FIXED),
            "lease_first_tag": r(_SQL_LEASE_PULL, tag=_TAG_EARLIEST.replace("{s}", s)),
            "lease_push": r(_SQL_LEASE_PUSH.replace("{due}", _DUE_ALL)),
            "lease_push_q": r(_SQL_LEASE_PUSH.replace("{due}", _DUE_QUEUES)),
            "modify_lease": r(_SQL_MODIFY_LEASE),
            "state_of": (
                f"SELECT state FROM {s}.tasks WHERE queue = %(queue)s"
                " AND name = %(name)s AND state = 'pending'"
            ),
            "complete": r(_SQL_COMPLETE),
            "retry_later": r(_SQL_RETRY_LATER),
            "fail": r(_SQL_FAIL),
            "purge": r(_SQL_PURGE),
            "stats": r(_SQL_STATS),
            "list": r(_SQL_LIST),
            "list_q": r(_SQL_LIST, queue=" AND t.queue = %(queue)s"),
            "requeue": r(_SQL_REQUEUE),
            "requeue_q": r(_SQL_REQUEUE, queue=" AND t.queue = %(queue)s"),
            "requeue_n": r(_SQL_REQUEUE, names=" AND t.name = ANY(%(names)s::text[])"),
            "requeue_qn": r(
                _SQL_REQUEUE,
                queue=" AND t.queue = %(queue)s",
                names=" AND t.name = ANY(%(names)s::text[])",
            ),
            "notify": "SELECT 1 FROM (SELECT pg_notify(%(channel)s, %(queue)s)) AS n",
            "next_eta": r(_SQL_NEXT_ETA),
            "next_eta_q": r(_SQL_NEXT_ETA_QUEUES),
            "queue_names": r(_SQL_QUEUE_NAMES),
            "housekeeping": r(_SQL_HOUSEKEEPING),
            "version": f"SELECT max(version) FROM {s}.tq_web_meta",
            "has_meta": f"SELECT to_regclass('{s}.tq_web_meta')",
            "lock": "SELECT pg_advisory_xact_lock(%(key)s)",
            "create_schema": f"CREATE SCHEMA IF NOT EXISTS {s}",
            "create_meta": (
                f"CREATE TABLE IF NOT EXISTS {s}.tq_web_meta (version integer NOT NULL)"
            ),
            "set_version": f"UPDATE {s}.tq_web_meta SET version = %(version)s",
            "init_version": f"INSERT INTO {s}.tq_web_meta (version) VALUES (0)",
            "drop": f"DROP SCHEMA IF EXISTS {s} CASCADE",
            "schema": s,
        }

    def _now_param(self) -> datetime | None:
        """None means "the database clock"; a custom clock is sent as a value."""
        return None if self.clock is utcnow else require_aware(self.clock())

    @staticmethod
    def _translate(err: Exception) -> Transient:
        return Transient(f"PostgreSQL backend: {type(err).__name__}: {err}".strip())

    def _getconn(self) -> psycopg.Connection[TupleRow]:
        """A pooled connection, skipping ones the server has closed meanwhile."""
        for _ in range(self.pool_size + 2):
            conn = self._pool.getconn()
            if (
                conn.closed
                or conn.broken
                or (_readable(conn.fileno()) and not self._alive(conn))
            ):
                conn.close()
                self._pool.putconn(conn)
                continue
            return conn
        return self._pool.getconn()  # pragma: no cover - every connection died

    @staticmethod
    def _alive(conn: psycopg.Connection[TupleRow]) -> bool:
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.Error:
            return False
        return True

    @contextlib.contextmanager
    def _cursor(
        self, conn: object | None = None, *, transaction: bool = False
    ) -> Iterator[psycopg.Cursor[TupleRow]]:
        """A cursor on the caller's connection or a pooled one; errors translated.

        Connection-level errors (:class:`psycopg.OperationalError`, which covers
        pool timeouts, server shutdowns and serialization failures, and
        :class:`psycopg.InterfaceError`) become :class:`tq_web.Transient`.
        """
        try:
            if conn is not None:
                own = self._dbapi(conn)
                with own.cursor(row_factory=tuple_row) as cur:
                    yield cur
                return
            if self._closed:
                raise Transient("PostgreSQL backend: the backend is closed")
            pooled = self._getconn()
            try:
                if transaction:
                    with pooled.transaction(), pooled.cursor() as cur:
                        yield cur
                else:
                    with pooled.cursor() as cur:
                        yield cur
            finally:
                self._pool.putconn(pooled)
        except (psycopg.OperationalError, psycopg.InterfaceError) as err:
            raise self._translate(err) from err

    @staticmethod
    def _dbapi(conn: object) -> psycopg.Connection[Any]:
        """The psycopg connection behind ``conn``.

        Accepts a :class:`psycopg.Connection`, a SQLAlchemy ``Connection`` or a
        SQLAlchemy ``Session`` (duck-typed: SQLAlchemy is not a dependency) whose
        driver is psycopg 3.
        """
        if isinstance(conn, psycopg.Connection):
            return conn
        target: Any = conn
        # A SQLAlchemy Session: Session.connection() joins its transaction.
        if callable(getattr(target, "connection", None)) and hasattr(
            target, "get_bind"
        ):
            target = target.connection()
        # A SQLAlchemy Connection: .connection is the pool's proxy of the DBAPI one.
        fairy = getattr(target, "connection", None)
        for attr in ("driver_connection", "dbapi_connection"):
            driver = getattr(fairy, attr, None)
            if isinstance(driver, psycopg.Connection):
                return driver
        raise TypeError(
            "conn must be a psycopg.Connection, or a SQLAlchemy Session or "
            f"Connection using psycopg 3, not {type(conn).__name__}"
        )

    # --- schema ---
    def migrate(self) -> int:
        """Create or upgrade the schema; return its version.

        Safe to run from many processes at once: the work happens under a
        transaction-scoped advisory lock. Called when the backend opens.

        Raises:
            ConfigurationError: the schema is newer than this tq_web knows.
            Transient: the server cannot be reached.
        """
        sql = self._sql
        with self._cursor() as cur:
            cur.execute(sql["has_meta"])
            row = cur.fetchone()
            if row is not None and row[0] is not None:
                cur.execute(sql["version"])
                got = cur.fetchone()
                if got is not None and got[0] == SCHEMA_VERSION:
                    return SCHEMA_VERSION
        with self._cursor(transaction=True) as cur:
            cur.execute(sql["lock"], {"key": self._lock_key})
            cur.execute(sql["create_schema"])
            cur.execute(sql["create_meta"])
            cur.execute(sql["version"])
            got = cur.fetchone()
            version = got[0] if got is not None else None
            if version is None:
                cur.execute(sql["init_version"])
                version = 0
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"schema {self.schema!r} is at version {version}, newer than this "
                    f"tq_web supports ({SCHEMA_VERSION}): upgrade tq_web"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    cur.execute(statement.replace("{s}", sql["schema"]))
                cur.execute(sql["set_version"], {"version": step})
                log.info("tq_web: migrated schema %s to version %d", self.schema, step)
        return SCHEMA_VERSION

    def drop_schema(self) -> None:
        """Drop the schema and everything in it (for tests and teardown)."""
        with self._cursor() as cur:
            cur.execute(self._sql["drop"])

    # --- add ---
    def add(
        self, task: Task, queue_name: str = "", *, conn: object | None = None
    ) -> Task:
        """Add a task; return a new Task with name and eta filled in.

        Args:
            task: the task to add (not modified).
            queue_name: the queue (``""`` is ``"default"``).
            conn: run inside the application's transaction: a
                :class:`psycopg.Connection`, or a SQLAlchemy ``Session`` or
                ``Connection`` on psycopg 3. Nothing is committed: the task exists
                if and only if that transaction commits (its wake-up ``NOTIFY`` is
                sent at commit too). Named tasks are fine there: the insert is an
                ``INSERT ... ON CONFLICT``, so a taken name raises
                :class:`~tq_web.taskqueue.TaskAlreadyAdded` without aborting the
                transaction. While the transaction is open, a concurrent add of
                the same name waits for it, and an existing task of that name
                stays locked (runners skip it until the transaction ends).

        Raises:
            TaskAlreadyAdded: the name is taken (or tombstoned).
            ValueError: the task is malformed.
            Transient: the database is unreachable.
        """
        q = self.queue(queue_name)
        row = self._prepare(task, q)
        stored = row[0]
        got = self._insert([[row]], q, conn, many=False)
        eta = got.get(stored.name)
        if eta is None:
            raise TaskAlreadyAdded(stored.name, q)
        stored.eta = stored.scheduled_eta = eta
        return stored

    def add_multi(
        self, tasks: Sequence[Task], queue_name: str = "", *, conn: object | None = None
    ) -> list[Task]:
        """Add several tasks, each independently (not atomic), in one round trip.

        Args:
            tasks: the tasks to add (not modified).
            queue_name: the queue (``""`` is ``"default"``).
            conn: as for :meth:`add`: run in the application's transaction.

        Raises:
            MultiError: one entry per task, ``None`` where it worked.
            Transient: the database is unreachable.
        """
        results: list[Task | None] = [None] * len(tasks)
        errors: list[BaseException | None] = [None] * len(tasks)
        todo: list[tuple[int, _Row]] = []
        seen: set[str] = set()
        try:
            q = self.queue(queue_name)
        except ValueError as err:
            q, errors = "", [err] * len(tasks)

        def chunks() -> Iterator[list[_Row]]:
            # Validated chunk by chunk, so that encoding the next chunk overlaps
            # with the server inserting the previous one.
            if not q:
                return
            for start in range(0, len(tasks), _CHUNK):
                chunk: list[_Row] = []
                for i in range(start, min(start + _CHUNK, len(tasks))):
                    try:
                        row = self._prepare(tasks[i], q)
                    except ValueError as err:
                        errors[i] = err
                        continue
                    name = row[0].name
                    if name in seen:
                        errors[i] = TaskAlreadyAdded(name, q)
                        continue
                    seen.add(name)
                    todo.append((i, row))
                    chunk.append(row)
                yield chunk

        got = self._insert(chunks(), q, conn, many=len(tasks) > 1)
        for i, (stored, *_) in todo:
            eta = got.get(stored.name)
            if eta is None:
                errors[i] = TaskAlreadyAdded(stored.name, q)
            else:
                stored.eta = stored.scheduled_eta = eta
                results[i] = stored
        if any(e is not None for e in errors):
            raise MultiError(errors, results)
        return [r for r in results if r is not None]

    def _prepare(self, task: Task, q: str) -> _Row:
        """Validate; return the stored copy, the explicit eta, the delay in µs and
        whether the caller named the task.

        The eta ``prepare`` computes from a delay is replaced by the database's.
        """
        stored = self.prepare(task, q, utcnow())
        _check_text(stored)
        if task.eta is not None:
            return stored, stored.eta, 0, bool(task.name)
        delay = task.delay if task.delay is not None else timedelta()
        return stored, None, delay // timedelta(microseconds=1), bool(task.name)

    def _insert(
        self,
        chunks: Iterable[Sequence[_Row]],
        q: str,
        conn: object | None,
        *,
        many: bool = True,
    ) -> dict[str, datetime]:
        """Insert; return the eta of each task added, by name (taken names absent).

        ``many=False``: one task, one statement. Otherwise each chunk becomes one
        or two statements (named tasks, generated names), all sent in one
        pipeline (the server inserts a chunk while the next one is encoded) and,
        on a pooled connection, in one transaction (one commit); the caller's
        connection is never committed.
        """
        base = {"now": self._now_param(), "queue": q, "channel": self.channel}
        if not many:
            rows = [row for chunk in chunks for row in chunk]
            if not rows:
                return {}
            named = "_named" if rows[0][3] else ""
            notify = "_notify" if rows[0][0].method != "PULL" else ""
            params = {**base, **_columns(rows, lambda x: x[0])}
            with self._cursor(conn) as cur:
                cur.execute(self._sql[f"add_one{named}{notify}"], params)
                return {row[0]: _aware(row[1]) for row in cur.fetchall()}
        out: dict[str, datetime] = {}
        cursors: list[psycopg.Cursor[TupleRow]] = []
        with self._cursor(conn, transaction=True) as cur:
            pg = cur.connection
            try:
                with pg.pipeline():
                    for chunk in chunks:
                        for flag in (True, False):
                            part = [r for r in chunk if r[3] is flag]
                            if not part:
                                continue
                            push = any(r[0].method != "PULL" for r in part)
                            key = "add_many" + ("_named" if flag else "")
                            key += "_notify" if push else ""
                            c = pg.cursor(row_factory=tuple_row)
                            cursors.append(c)
                            c.execute(self._sql[key], {**base, **_columns(part, list)})
                for c in cursors:
                    out.update((row[0], _aware(row[1])) for row in c.fetchall())
            finally:
                for c in cursors:
                    c.close()
        return out

    # --- delete ---
    def delete(
        self, task: Task, queue_name: str = "", *, conn: object | None = None
    ) -> None:
        """Delete a task by name, leaving a tombstone.

        Args:
            task: the task (only its name is used).
            queue_name: the queue.
            conn: optionally the application's connection (see :meth:`add`).

        Raises:
            TaskNotFound: unknown or already tombstoned.
        """
        q = self.queue(queue_name)
        if not self._delete([task.name], q, conn):
            raise TaskNotFound(task.name, q)

    def delete_multi(
        self, tasks: Sequence[Task], queue_name: str = "", *, conn: object | None = None
    ) -> None:
        """Delete several tasks.

        Raises:
            MultiError: one entry per task (``TaskNotFound`` or ``None``).
        """
        q = self.queue(queue_name)
        wanted = [t.name for t in tasks if t.name]
        done = self._delete(wanted, q, conn) if wanted else set()
        errors: list[BaseException | None] = []
        for t in tasks:
            if t.name in done:
                done.discard(t.name)
                errors.append(None)
            else:
                errors.append(TaskNotFound(t.name, q))
        if any(e is not None for e in errors):
            raise MultiError(errors)

    def _delete(self, names: Sequence[str], q: str, conn: object | None) -> set[str]:
        if not any(names):
            return set()
        params = {
            "now": self._now_param(),
            "queue": q,
            "names": list(names),
            "ttl": self.tombstone_ttl,
        }
        with self._cursor(conn) as cur:
            cur.execute(self._sql["delete"], params)
            return {row[0] for row in cur.fetchall()}

    # --- pull queues ---

    def _lease(
        self, max_tasks: int, queue_name: str, lease_seconds: Duration, tag: str | None
    ) -> list[Task]:
        lease = self.lease_duration(lease_seconds)
        q = self.queue(queue_name)
        qlimit = self.pull_retry_limit(None, q)
        out: list[tuple[datetime, str, Task]] = []
        # "" means the earliest due task's tag: found by the first round, then
        # fixed (tasks failed for exceeding their lease limit do not change it).
        query = self._sql[
            "lease" if tag is None else "lease_first_tag" if tag == "" else "lease_tag"
        ]
        with self._cursor() as cur:
            while len(out) < max_tasks:
                want = max_tasks - len(out)
                cur.execute(
                    query,
                    {
                        "now": self._now_param(),
                        "queue": q,
                        "tag": tag,
                        "qlimit": qlimit,
                        "n": want,
                        "lease": lease,
                        "failed_ttl": self.failed_ttl,
                    },
                )
                rows = cur.fetchall()
                failed = 0
                for row in rows:
                    if row[_NCOLS + 1]:
                        failed += 1
                        continue
                    t = _row_to_task(row)
                    out.append((_aware(row[_NCOLS]), t.name, t))
                if rows and query is self._sql["lease_first_tag"]:
                    tag, query = rows[0][8], self._sql["lease_tag"]
                if not failed or len(rows) < want:
                    break
        out.sort(key=lambda x: (x[0], x[1]))
        return [t for _, _, t in out]

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
        params = {
            "now": self._now_param(),
            "queue": q,
            "name": task.name,
            "lease": lease,
            "token": task.eta,
        }
        with self._cursor() as cur:
            cur.execute(self._sql["modify_lease"], params)
            row = cur.fetchone()
            if row is None:
                cur.execute(self._sql["state_of"], params)
                if cur.fetchone() is None:
                    raise TaskNotFound(task.name, q)
                raise LeaseExpired(task.name, q)
        task.eta = _aware(row[0])

    def purge(self, queue_name: str) -> None:
        """Remove every pending task of a queue (tombstones and failed stay)."""
        q = self.queue(queue_name)
        with self._cursor() as cur:
            cur.execute(self._sql["purge"], {"queue": q})

    def queue_stats(self, queue_names: Sequence[str]) -> list[QueueStatistics]:
        """Statistics for each named queue, in order."""
        qs = [self.queue(n) for n in queue_names]
        if not qs:
            return []
        with self._cursor() as cur:
            cur.execute(self._sql["stats"], {"now": self._now_param(), "queues": qs})
            by_queue = {row[0]: row for row in cur.fetchall()}
        out = []
        for q in qs:
            row = by_queue.get(q)
            tasks, oldest, executed, in_flight, failed = (
                (0, None, 0, 0, 0) if row is None else row[1:]
            )
            out.append(
                QueueStatistics(
                    tasks=tasks,
                    oldest_eta=None if oldest is None else _aware(oldest),
                    executed_1_minute=executed,
                    in_flight=in_flight,
                    enforced_rate=self.queue_config(q).rate,
                    failed=failed,
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
        """Lease due push tasks of the given queues (all when None), earliest first.

        Also deletes expired tombstones and failed tasks now and then (bounded
        batches; see :meth:`delete_expired`).
        """
        lease = self.lease_duration(lease_seconds)
        queues = (
            None
            if queue_names is None
            else sorted({self.queue(q) for q in queue_names})
        )
        if max_tasks < 1 or queues == []:
            return []
        self._maybe_housekeep()
        self._drain_notifies()
        params = {
            "now": self._now_param(),
            "n": max_tasks,
            "lease": lease,
            "queues": queues,
        }
        with self._cursor() as cur:
            cur.execute(
                self._sql["lease_push" if queues is None else "lease_push_q"], params
            )
            rows = cur.fetchall()
        rows.sort(key=lambda r: (r[_NCOLS], r[1]))
        return [_row_to_task(r) for r in rows]

    def complete(self, task: Task, queue_name: str) -> None:
        """Mark a leased task done (a tombstone), whoever holds the lease now."""
        params = {
            "now": self._now_param(),
            "queue": self.queue(queue_name),
            "name": task.name,
            "ttl": self.tombstone_ttl,
        }
        with self._cursor() as cur:
            cur.execute(self._sql["complete"], params)

    def complete_many(self, tasks: Sequence[Task]) -> None:
        """Mark several leased tasks done in one transaction."""
        if not tasks:
            return
        now = self._now_param()
        params = [
            {
                "now": now,
                "queue": self.queue(t.queue_name),
                "name": t.name,
                "ttl": self.tombstone_ttl,
            }
            for t in tasks
        ]
        with self._cursor(transaction=True) as cur:
            cur.executemany(self._sql["complete"], params)

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
        """Give a leased task back for a retry at ``eta`` (False: the lease is lost)."""
        if task.eta is None:
            return False
        params = {
            "queue": self.queue(queue_name),
            "name": task.name,
            "token": task.eta,
            "eta": require_aware(eta, "eta"),
            "status": int(status),
            "reason": _clean(reason),
            "inc": 1 if executed else 0,
        }
        with self._cursor() as cur:
            cur.execute(self._sql["retry_later"], params)
            return cur.fetchone() is not None

    def fail(self, task: Task, queue_name: str, status: int, response: str) -> bool:
        """Move a leased task to the failed state. False if the lease was lost."""
        if task.eta is None:
            return False
        params = {
            "now": self._now_param(),
            "queue": self.queue(queue_name),
            "name": task.name,
            "token": task.eta,
            "status": int(status),
            "response": _clean(response),
            "ttl": self.failed_ttl,
        }
        with self._cursor() as cur:
            cur.execute(self._sql["fail"], params)
            return cur.fetchone() is not None

    def list_tasks(
        self, queue_name: str | None = None, state: str = "pending", limit: int = 100
    ) -> list[Task]:
        """Tasks in a state (``pending``, ``failed``, ``done``), earliest ETA first."""
        if state not in ("pending", "failed", "done"):
            raise ValueError(f"unknown state {state!r}: use pending, failed or done")
        params = {
            "now": self._now_param(),
            "state": state,
            "limit": max(0, int(limit)),
            "queue": None if queue_name is None else self.queue(queue_name),
        }
        with self._cursor() as cur:
            cur.execute(self._sql["list" if queue_name is None else "list_q"], params)
            return [_row_to_task(r) for r in cur.fetchall()]

    def requeue_failed(
        self, queue_name: str | None = None, names: Sequence[str] | None = None
    ) -> int:
        """Make failed tasks pending again, due now; return how many."""
        key = (
            "requeue"
            + ("" if queue_name is None and names is None else "_")
            + ("q" if queue_name is not None else "")
            + ("n" if names is not None else "")
        )
        q = None if queue_name is None else self.queue(queue_name)
        params = {
            "now": self._now_param(),
            "queue": q,
            "names": None if names is None else list(names),
            "channel": self.channel,
        }
        with self._cursor(transaction=True) as cur:
            cur.execute(self._sql[key], params)
            row = cur.fetchone()
            n, push = (0, 0) if row is None else row
            if push:
                cur.execute(self._sql["notify"], {**params, "queue": q or ""})
        return int(n)

    def next_eta(self, queue_names: Sequence[str] | None = None) -> datetime | None:
        """The earliest ETA of pending push tasks (leased ones included)."""
        queues = (
            None
            if queue_names is None
            else sorted({self.queue(q) for q in queue_names})
        )
        if queues == []:
            return None
        with self._cursor() as cur:
            cur.execute(
                self._sql["next_eta" if queues is None else "next_eta_q"],
                {"queues": queues},
            )
            row = cur.fetchone()
        return None if row is None or row[0] is None else _aware(row[0])

    def queue_names(self) -> list[str]:
        """Every queue that holds tasks, tombstones or failed tasks, sorted."""
        with self._cursor() as cur:
            cur.execute(self._sql["queue_names"])
            return [row[0] for row in cur.fetchall()]

    def signing_key(self) -> str | None:
        """None: only SQLite stores a generated key (SPEC 1.8)."""
        return None

    # --- housekeeping ---
    def delete_expired(self, max_batches: int = 1) -> int:
        """Delete tombstones and failed tasks whose retention window has ended.

        Works in batches of at most 1,000 rows, each its own short transaction
        (``FOR UPDATE SKIP LOCKED``: concurrent runners do not wait on each other).

        Args:
            max_batches: batches at most; stops early when a batch is not full.

        Returns:
            The number of rows deleted.
        """
        total = 0
        with self._cursor() as cur:
            for _ in range(max_batches):
                cur.execute(
                    self._sql["housekeeping"],
                    {"now": self._now_param(), "batch": _HOUSEKEEPING_BATCH},
                )
                total += max(cur.rowcount, 0)
                if cur.rowcount < _HOUSEKEEPING_BATCH:
                    break
        return total

    def _maybe_housekeep(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping or not self._housekeeping_lock.acquire(False):
            return
        try:
            if now < self._next_housekeeping:
                return
            deleted = self.delete_expired(1)
            # A full batch means more is waiting: come back at the next call.
            self._next_housekeeping = (
                now if deleted >= _HOUSEKEEPING_BATCH else now + _HOUSEKEEPING_EVERY
            )
        except Transient:
            self._next_housekeeping = now + _HOUSEKEEPING_EVERY
        finally:
            self._housekeeping_lock.release()

    # --- wake-ups ---
    def wait_for_tasks(self, timeout: float) -> None:
        """Block until tasks may have been added, or ``timeout`` seconds pass.

        With ``listen=True`` this waits for a ``NOTIFY`` (sent when push tasks are
        added or failed tasks requeued) on a dedicated connection. The first
        call, and the first after that connection was lost, only starts
        listening and returns at once, so a caller that polls again after each
        return never misses a task. Wake-ups may be spurious. With
        ``listen=False`` (PgBouncer) it sleeps for ``timeout``.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        if not self.listen or self._closed:
            time.sleep(max(0.0, timeout))
            return
        if not self._listen_lock.acquire(timeout=max(0.0, timeout)):
            return
        self._waiting += 1
        try:
            conn = self._listen_conn
            if conn is None or conn.closed:
                self._listen_conn = None
                try:
                    conn = psycopg.connect(self._conninfo, **self._kwargs)
                    conn.execute(f'LISTEN "{self.channel}"')
                except psycopg.Error as err:
                    if not self._listen_failed:  # once per outage
                        log.warning(
                            "tq_web: cannot LISTEN (%s); polling meanwhile", err
                        )
                    self._listen_failed = True
                    if conn is not None:
                        conn.close()
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    return
                self._listen_conn = conn
                self._listen_failed = False
                return
            try:
                for _ in conn.notifies(
                    timeout=max(0.0, deadline - time.monotonic()), stop_after=1
                ):
                    pass
                for _ in conn.notifies(timeout=0):  # drain the backlog
                    pass
            except psycopg.Error as err:
                log.warning("tq_web: lost the LISTEN connection (%s)", err)
                conn.close()
                self._listen_conn = None
        finally:
            self._waiting -= 1
            self._listen_lock.release()

    def _drain_notifies(self) -> None:
        """Read notifications that are waiting, without blocking.

        Called before each lease: those tasks are about to be seen anyway, and a
        listener that never reads would make the server's notification queue
        grow (when it is full, every NOTIFY, hence every add, fails).
        """
        conn = self._listen_conn
        if conn is None or not self._listen_lock.acquire(blocking=False):
            return
        try:
            if conn is self._listen_conn and not conn.closed:
                for _ in conn.notifies(timeout=0):
                    pass
        except psycopg.Error:
            conn.close()
            self._listen_conn = None
        finally:
            self._listen_lock.release()

    # --- lifecycle ---
    def close(self) -> None:
        """Close the pool and the listening connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._waiting:
            with contextlib.suppress(Exception), self._pool.connection(timeout=2) as c:
                c.execute(self._sql["notify"], {"channel": self.channel, "queue": ""})
        if self._listen_lock.acquire(timeout=5):
            try:
                if self._listen_conn is not None:
                    self._listen_conn.close()
                    self._listen_conn = None
            finally:
                self._listen_lock.release()
        self._pool.close()

    def __repr__(self) -> str:
        from . import redact_url

        return f"<PostgresBackend {redact_url(self.url)} schema={self.schema}>"
