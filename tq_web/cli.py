"""The ``tq-web`` command (also ``python -m tq_web``).

Options go after the subcommand and fall back to environment variables:
``--backend`` to ``TQ_WEB_BACKEND``, ``--target`` to ``TQ_WEB_TARGET``.
User mistakes print one line and exit 2 (usage) or 1 (runtime); never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

from .exceptions import ConfigurationError, TqWebError

__all__ = ["main"]

ENV_BACKEND = "TQ_WEB_BACKEND"
ENV_TARGET = "TQ_WEB_TARGET"


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit 1."""


class UsageError(UserError):
    """A missing or wrong option: printed as one line, exit 2."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print)."""
    from .backends import redact_url

    return redact_url(url)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default=os.environ.get(ENV_BACKEND),
        help=f"backend URL (env {ENV_BACKEND}; default sqlite:///tq_web.sqlite3)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = _Parser(
        prog="tq-web",
        description="Run and inspect tq_web task queues.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="deliver push tasks to an app over HTTP")
    _backend_arg(run)
    run.add_argument(
        "--target",
        default=os.environ.get(ENV_TARGET),
        help=f"the app's base URL, e.g. http://127.0.0.1:8000 (env {ENV_TARGET})",
    )
    run.add_argument(
        "--queue-yaml", help="an App Engine queue.yaml with queue settings"
    )
    run.add_argument(
        "--queue",
        action="append",
        dest="queues",
        help="serve only this queue (repeatable)",
    )
    run.add_argument("--lease-seconds", type=float, default=30.0, help="default 30")
    run.add_argument(
        "--dispatch-deadline", type=float, default=600.0, help="seconds (default 600)"
    )
    run.add_argument("--max-in-flight", type=int, default=256, help="default 256")
    run.add_argument(
        "--drain", action="store_true", help="exit once no task is due or in flight"
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a live counter (default: when stderr is a terminal)",
    )

    stats = sub.add_parser("stats", help="show queue statistics")
    _backend_arg(stats)
    stats.add_argument(
        "--queue", action="append", dest="queues", help="only this queue"
    )

    tasks = sub.add_parser("tasks", help="list the tasks of a queue")
    _backend_arg(tasks)
    tasks.add_argument(
        "--queue", default="default", help="the queue (default: default)"
    )
    tasks.add_argument(
        "--state", choices=["pending", "failed", "done"], default="pending"
    )
    tasks.add_argument("--limit", type=int, default=50)

    failed = sub.add_parser("failed", help="list tasks that failed for good")
    _backend_arg(failed)
    failed.add_argument("--queue", help="only this queue")
    failed.add_argument("--limit", type=int, default=50)

    retry = sub.add_parser("retry", help="run failed tasks again")
    _backend_arg(retry)
    retry.add_argument("--queue", help="only this queue")
    retry.add_argument("names", nargs="*", help="task names (or --all)")
    retry.add_argument("--all", action="store_true", help="every failed task")

    purge = sub.add_parser("purge", help="delete every pending task of a queue")
    _backend_arg(purge)
    purge.add_argument("--queue", required=True)
    purge.add_argument("--yes", action="store_true", help="do not ask")

    migrate = sub.add_parser("migrate", help="create or upgrade the queue schema")
    _backend_arg(migrate)
    return parser


# --- helpers ---
def _connect(url: str | None) -> Any:
    from .backends import connect

    return connect(url)


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(
    rows: Sequence[Sequence[object]], headers: Sequence[str], out: TextIO
) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out.write(line.rstrip() + "\n")
    for r in cells:
        out.write(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        )
        out.write("\n")


def _known_queue(backend: Any, queue: str) -> str:
    from .taskqueue import validate_queue_name

    try:
        name = validate_queue_name(queue)
    except ValueError as err:
        raise UserError(str(err)) from None
    names = backend.queue_names()
    if name not in names:
        known = ", ".join(names) or "none yet"
        raise UserError(f"queue {name!r} does not exist (known queues: {known})")
    return name


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- commands ---
def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    backend = _connect(args.backend)
    try:
        names = (
            [_known_queue(backend, q) for q in args.queues]
            if args.queues
            else backend.queue_names()
        )
        if not names:
            out.write("no queues yet\n")
            return 0
        rows = []
        for name, s in zip(names, backend.queue_stats(names), strict=True):
            rows.append(
                [
                    name,
                    s.tasks,
                    s.in_flight,
                    _fmt_time(s.oldest_eta),
                    s.executed_1_minute,
                    s.failed,
                    f"{s.enforced_rate:g}/s",
                ]
            )
        _table(
            rows,
            [
                "QUEUE",
                "TASKS",
                "IN FLIGHT",
                "OLDEST ETA (UTC)",
                "DONE/MIN",
                "FAILED",
                "RATE",
            ],
            out,
        )
        return 0
    finally:
        backend.close()


def cmd_tasks(args: argparse.Namespace, out: TextIO) -> int:
    backend = _connect(args.backend)
    try:
        queue = _known_queue(backend, args.queue)
        tasks = backend.list_tasks(queue, args.state, args.limit)
        if not tasks:
            out.write(f"no {args.state} tasks in queue {queue}\n")
            return 0
        rows = [
            [
                t.name,
                _fmt_time(t.scheduled_eta or t.eta),
                t.state or args.state,
                max(0, t.retry_count),
                t.method,
                _short(t.path, 50),
            ]
            for t in tasks
        ]
        _table(rows, ["NAME", "ETA (UTC)", "STATE", "ATTEMPTS", "METHOD", "PATH"], out)
        return 0
    finally:
        backend.close()


def cmd_failed(args: argparse.Namespace, out: TextIO) -> int:
    backend = _connect(args.backend)
    try:
        queue = _known_queue(backend, args.queue) if args.queue else None
        tasks = backend.list_tasks(queue, "failed", args.limit)
        if not tasks:
            out.write("no failed tasks\n")
            return 0
        rows = [
            [
                t.queue_name,
                t.name,
                t.last_status or "-",
                t.retry_count,
                _short(t.last_response or "", 50),
            ]
            for t in tasks
        ]
        _table(rows, ["QUEUE", "NAME", "STATUS", "ATTEMPTS", "RESPONSE"], out)
        return 0
    finally:
        backend.close()


def cmd_retry(args: argparse.Namespace, out: TextIO) -> int:
    if not args.names and not args.all:
        raise UserError("name the tasks to retry, or pass --all")
    if args.names and args.all:
        raise UserError("give task names or --all, not both")
    backend = _connect(args.backend)
    try:
        queue = _known_queue(backend, args.queue) if args.queue else None
        n = backend.requeue_failed(queue, None if args.all else args.names)
        if args.names and n < len(set(args.names)):
            out.write(
                f"requeued {n} of {len(set(args.names))} tasks "
                "(the others are not in the failed state)\n"
            )
            return 1
        out.write(f"requeued {n} failed task{'s' if n != 1 else ''}\n")
        return 0
    finally:
        backend.close()


def cmd_purge(args: argparse.Namespace, out: TextIO) -> int:
    backend = _connect(args.backend)
    try:
        queue = _known_queue(backend, args.queue)
        if not args.yes:
            if not sys.stdin.isatty():
                raise UserError(f"refusing to purge queue {queue!r} without --yes")
            answer = input(f"Delete every pending task of queue {queue!r}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                out.write("nothing purged\n")
                return 1
        before = backend.queue_stats([queue])[0].tasks
        backend.purge(queue)
        out.write(f"purged {before} task{'s' if before != 1 else ''} from {queue}\n")
        return 0
    finally:
        backend.close()


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    backend = _connect(args.backend)
    try:
        migrate = getattr(backend, "migrate", None)
        if migrate is not None:
            migrate()
        out.write(f"schema is up to date for {redact(backend.url)}\n")
        return 0
    finally:
        backend.close()


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    if not args.target:
        raise UsageError(f"no target: pass --target URL or set {ENV_TARGET}")
    from .queues import load_queue_yaml
    from .runner import Runner

    queues = load_queue_yaml(args.queue_yaml) if args.queue_yaml else {}
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    runner = Runner(
        _connect(args.backend) if args.backend is not None else _connect(None),
        args.target,
        queues=queues,
        only_queues=args.queues,
        lease_seconds=args.lease_seconds,
        dispatch_deadline=args.dispatch_deadline,
        max_in_flight=args.max_in_flight,
    )
    runner._owns_backend = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await runner.start()
        out.write(
            f"tq-web: delivering {redact(runner.backend.url)} → {runner.target} "
            "(Ctrl-C stops gracefully)\n"
        )
        out.flush()
        last = 0.0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.25)
            except TimeoutError:
                pass
            if progress and time.monotonic() - last > 0.25:
                last = time.monotonic()
                _progress(runner, sys.stderr)
            if args.drain and runner.stats.in_flight == 0 and not runner._pending:
                nxt = await asyncio.to_thread(runner.backend.next_eta, args.queues)
                if nxt is None:
                    break
        if progress:
            _progress(runner, sys.stderr)
            sys.stderr.write("\n")
        out.write("tq-web: stopping; waiting for requests in flight…\n")
        out.flush()
        await runner.stop()
        s = runner.stats
        out.write(
            f"tq-web: stopped: {s.delivered} delivered, {s.retried} retried, "
            f"{s.failed} failed\n"
        )

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


def _progress(runner: Any, err: TextIO) -> None:
    s = runner.stats
    err.write(
        f"\rdelivered {s.delivered}  retried {s.retried}  failed {s.failed}  "
        f"in flight {s.in_flight}  {s.rate():.0f}/s   "
    )
    err.flush()


COMMANDS = {
    "run": cmd_run,
    "stats": cmd_stats,
    "tasks": cmd_tasks,
    "failed": cmd_failed,
    "retry": cmd_retry,
    "purge": cmd_purge,
    "migrate": cmd_migrate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tq-web``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    # The pool logs every failed connection attempt; the CLI says it once.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        return COMMANDS[args.command](args, sys.stdout)
    except UsageError as err:
        sys.stderr.write(f"tq-web {args.command}: error: {err}\n")
        return 2
    except (UserError, ConfigurationError, TqWebError, ValueError) as err:
        sys.stderr.write(f"tq-web: error: {err}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as err:
        sys.stderr.write(f"tq-web: error: {err}\n")
        return 1


def entry() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
