"""A sign-up form that sends welcome e-mails through tq_web (Flask).

``POST /signup`` answers at once and leaves the slow work to two tasks:

* ``SendWelcomeEmail``, sent now. The (fake) mail server is not ready for the
  first message, so its handler raises ``tq_web.Transient`` and the queue
  retries it a second later.
* ``GenerateReport``, queued with ``delay=2``: it runs two seconds later.

The queue is the embedded SQLite default. The push runner runs in a thread
that ``main()`` starts explicitly (``tq_web.flask.start_runner_thread``) and
POSTs each task back to ``/internal/tasks/...``.

Run it from the repository root::

    python examples/flask_app/app.py --demo   # end to end in ~3 s, then exit
    python examples/flask_app/app.py          # serve http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, jsonify, request
from markupsafe import escape
from messages_pb2 import GenerateReport, SendWelcomeEmail
from werkzeug.serving import WSGIRequestHandler, make_server

import tq_web
from tq_web import taskqueue as tq
from tq_web.flask import start_runner_thread

REPORT_DELAY = 2.0
"""Seconds between a sign-up and its first report."""

FORM = """<!doctype html>
<title>Sign up</title>
<h1>Sign up</h1>
<form method="post" action="/signup">
  <label>Name <input name="name" required></label>
  <label>E-mail <input name="email" type="email" required></label>
  <button>Sign up</button>
</form>
"""


@dataclass
class Outbox:
    """What the handlers did: stands in for an SMTP server and a reports table.

    The first ``mail_failures`` sends fail, as a mail server that is still
    starting would, so the demo shows a retry.
    """

    mail_failures: int = 1
    emails: list[str] = field(default_factory=list)
    reports: dict[str, float] = field(default_factory=dict)
    signed_up: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send_mail(self, to: str) -> None:
        with self.lock:
            if self.mail_failures > 0:
                self.mail_failures -= 1
                raise ConnectionError("mail server not ready")
            self.emails.append(to)


def task_type(task: tq.Task) -> str:
    """The short type name of a tq_web task, from its path."""
    # /internal/tasks/example.v1.SendWelcomeEmail/<title> -> SendWelcomeEmail
    return task.path.rstrip("/").split("/")[-2].rsplit(".", 1)[-1]


def print_attempt(task: tq.Task, status: int, action: str) -> None:
    """Print one delivery attempt of the runner (its ``on_result`` hook)."""
    answer = status or "no answer"
    print(f"  runner:  {task.queue_name}/{task_type(task)} -> {answer}, {action}")


def user_id_for(email: str) -> str:
    """A stable user id (in a real app: the primary key of the new row)."""
    return "u" + hashlib.sha256(email.strip().lower().encode()).hexdigest()[:10]


def create_dispatcher(backend_url: str | None, box: Outbox) -> tq_web.Dispatcher:
    """The dispatcher and its two handlers (shared by the app and the tests).

    Args:
        backend_url: the queue; ``None`` means ``$TQ_WEB_BACKEND``, else
            ``sqlite:///tq_web.sqlite3`` in the working directory.
        box: where the handlers record what they did.
    """
    d = tq_web.Dispatcher(
        backend_url,
        # Queue settings, as in an App Engine queue.yaml: at most 5 reports/s.
        queues=[tq_web.QueueConfig("reports", rate=5, max_concurrent_requests=2)],
    )

    def send_welcome_email(msg: SendWelcomeEmail) -> None:
        attempt = tq_web.request_headers().task_retry_count + 1
        try:
            box.send_mail(msg.email)
        except ConnectionError as err:
            print(f"  handler: cannot reach the mail server (attempt {attempt})")
            # Transient: the push answers 500 and the queue retries with backoff.
            raise tq_web.Transient(f"mail to {msg.email} not sent: {err}") from err
        print(f"  handler: sent welcome email to {msg.name} <{msg.email}>")

    def generate_report(msg: GenerateReport) -> None:
        now = time.monotonic()
        with box.lock:
            box.reports[msg.user_id] = now
            since = now - box.signed_up.get(msg.user_id, now)
        print(f"  handler: report for {msg.user_id} ready, {since:.1f} s after sign-up")

    d.register_task(
        SendWelcomeEmail,
        send_welcome_email,
        retry_options=tq.RetryOptions(retry_limit=5, min_backoff=1.0),
    )
    d.register_task(GenerateReport, generate_report, queue="reports")
    return d


def signup_tasks(email: str, name: str) -> list[tq_web.Task]:
    """The tasks one sign-up creates.

    Both are named after the user (``deduplication_key``), so a double submit
    of the form queues them once.
    """
    uid = user_id_for(email)
    return [
        tq_web.Task(
            SendWelcomeEmail(email=email, name=name),
            deduplication_key=email.lower(),
            title=uid,
        ),
        tq_web.Task(
            GenerateReport(user_id=uid),
            deduplication_key=uid,
            title=uid,
            delay=REPORT_DELAY,
        ),
    ]


def create_app(
    backend_url: str | None = None, *, outbox: Outbox | None = None
) -> Flask:
    """The Flask app. It does not start a runner: see :func:`main`.

    Args:
        backend_url: the queue (see :func:`create_dispatcher`).
        outbox: where the handlers record what they did.
    """
    app = Flask(__name__)
    box = outbox if outbox is not None else Outbox()
    d = create_dispatcher(backend_url, box)
    d.install_routes(app)  # serves POST /internal/tasks/...; app.extensions["tq_web"]
    app.extensions["example_outbox"] = box

    @app.get("/")
    def form() -> str:
        return FORM

    @app.post("/signup")
    def signup() -> tuple[str, int]:
        email = request.form.get("email", "").strip()
        name = request.form.get("name", "").strip()
        if "@" not in email or not name:
            return "<p>Please give a name and an e-mail.</p>", 400
        with box.lock:
            box.signed_up.setdefault(user_id_for(email), time.monotonic())
        d.add_task(*signup_tasks(email, name))  # returns once the queue has them
        return f"<p>Thanks, {escape(name)}! Check your inbox.</p>", 202

    @app.get("/status")
    def status() -> Any:
        with box.lock:
            return jsonify(emails=box.emails, reports=sorted(box.reports))

    return app


# --- the demo ---
DEMO_SIGNUPS = [
    ("ada@example.com", "Ada"),
    ("grace@example.com", "Grace"),
    ("ada@example.com", "Ada"),  # a double submit: deduplicated
    ("alan@example.com", "Alan"),
]


@dataclass
class DemoResult:
    """What the demo saw."""

    ok: bool
    seconds: float
    statuses: list[int]
    emails: list[str]
    reports: dict[str, float]
    signed_up: dict[str, float]
    attempts: list[tuple[str, int, str]]
    pending: int
    failed: int


class QuietHandler(WSGIRequestHandler):
    """werkzeug's request handler without the access log."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def post_form(url: str, data: dict[str, str]) -> int:
    """POST a form with the standard library (no proxy); returns the status."""
    req = urllib.request.Request(url, urllib.parse.urlencode(data).encode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        return int(resp.status)


def run_demo(backend_url: str | None = None, *, timeout: float = 30.0) -> DemoResult:
    """Serve the app on a free port, sign up three users, wait for every task.

    Args:
        backend_url: the queue; default a SQLite file in a temporary directory.
        timeout: give up after this many seconds.
    """
    with tempfile.TemporaryDirectory(prefix="tq_web-demo-") as tmp:
        url = backend_url or "sqlite:///" + os.path.join(tmp, "tq_web.sqlite3")
        return _demo(url, timeout)


def _demo(backend_url: str, timeout: float) -> DemoResult:
    box = Outbox()
    app = create_app(backend_url, outbox=box)
    d: tq_web.Dispatcher = app.extensions["tq_web"]
    attempts: list[tuple[str, int, str]] = []

    def on_result(task: tq.Task, status: int, action: str) -> None:
        attempts.append((task_type(task), status, action))
        print_attempt(task, status, action)

    server = make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler
    )
    base = f"http://127.0.0.1:{server.server_port}"
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    print(f"demo: serving {base}, queue {backend_url}")
    started = time.monotonic()
    runner = start_runner_thread(d, base, on_result=on_result)
    statuses: list[int] = []
    expected = len({e for e, _ in DEMO_SIGNUPS})
    pending = failed = -1
    try:
        for email, name in DEMO_SIGNUPS:
            status = post_form(base + "/signup", {"email": email, "name": name})
            statuses.append(status)
            print(f"demo: POST /signup {email} -> {status} (user {user_id_for(email)})")
        queues = d.get_queues()
        deadline = started + timeout
        while time.monotonic() < deadline:
            stats = d.backend.queue_stats(queues)
            pending = sum(s.tasks for s in stats)
            failed = sum(s.failed for s in stats)
            with box.lock:
                done = len(box.emails) >= expected and len(box.reports) >= expected
            if done and pending == 0:
                break
            time.sleep(0.05)
    finally:
        runner.stop()  # graceful: requests in flight finish first
        server.shutdown()
        serving.join(10)
        server.server_close()
        d.close()
    seconds = time.monotonic() - started
    with box.lock:
        result = DemoResult(
            ok=(
                pending == 0
                and failed == 0
                and len(box.emails) == expected
                and len(box.reports) == expected
            ),
            seconds=seconds,
            statuses=statuses,
            emails=list(box.emails),
            reports=dict(box.reports),
            signed_up=dict(box.signed_up),
            attempts=attempts,
            pending=pending,
            failed=failed,
        )
    retries = sum(1 for a in attempts if a[2] == "retry")
    if result.ok:
        print(
            f"demo: done in {seconds:.1f} s: {len(result.emails)} welcome emails "
            f"({retries} retried), {len(result.reports)} delayed reports, "
            "nothing left in the queue"
        )
    else:
        print(
            f"demo: FAILED after {seconds:.1f} s: {len(result.emails)} emails, "
            f"{len(result.reports)} reports, {pending} pending, {failed} failed",
            file=sys.stderr,
        )
    return result


def serve(host: str, port: int, *, runner: bool = True) -> None:
    """Flask's development server, plus the push runner in a thread."""
    app = create_app()
    thread = None
    if runner:
        target = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        d = app.extensions["tq_web"]
        thread = start_runner_thread(d, target, on_result=print_attempt)
    try:
        # No reloader: it would run this function, and a second runner, twice.
        app.run(host=host, port=port, use_reloader=False)
    finally:
        if thread is not None:
            thread.stop()  # graceful: requests in flight finish first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start on a free port, sign up three users, wait for every task, exit",
    )
    parser.add_argument(
        "--no-runner",
        action="store_true",
        help="do not deliver tasks in-process (run `tq-web run` next to it)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "5000")), help="$PORT"
    )
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.demo:
        # Print as things happen, tq_web's log lines included.
        logging.basicConfig(format="  log:     %(message)s", stream=sys.stdout)
        return 0 if run_demo().ok else 1
    serve(args.host, args.port, runner=not args.no_runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
