"""Tests of the Starlette example: the demo end to end, and the flow on a fake clock."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import tq_web.testing

from . import app as example


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TQ_WEB_BACKEND", "TQ_WEB_SECRET_KEY", "TQ_WEB_TARGET"):
        monkeypatch.delenv(name, raising=False)


def test_demo_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "queue.sqlite3"
    result = example.run_demo(f"sqlite:///{db}", timeout=30)

    assert result.ok, result
    assert result.statuses == [202, 202, 202, 202]
    # Three distinct users: the double submit was deduplicated.
    assert sorted(result.emails) == [
        "ada@example.com",
        "alan@example.com",
        "grace@example.com",
    ]
    assert sorted(result.reports) == sorted(
        example.user_id_for(e) for e in result.emails
    )
    # The first e-mail failed transiently (500) and was retried.
    mail = [(s, a) for kind, s, a in result.attempts if kind == "SendWelcomeEmail"]
    assert mail.count((500, "retry")) == 1
    assert mail.count((200, "done")) == 3
    # Each report ran no earlier than its delay after the sign-up.
    for uid, ran in result.reports.items():
        assert ran - result.signed_up[uid] >= example.REPORT_DELAY - 0.05
    assert result.pending == 0 and result.failed == 0

    out = capsys.readouterr().out
    assert "sent welcome email to Ada <ada@example.com>" in out
    assert "default/SendWelcomeEmail -> 500, retry" in out
    assert "reports/GenerateReport -> 200, done" in out
    assert "demo: done in" in out
    assert db.exists()  # the demo used the queue it was given


def test_demo_command_exits_zero_and_leaves_no_file(tmp_path: Path) -> None:
    # The README's command, run from another directory.
    proc = subprocess.run(
        [sys.executable, str(Path(example.__file__)), "--demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing left in the queue" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # the queue lived in a temp dir


def test_signup_flow_on_a_fake_clock() -> None:
    outbox = example.Outbox()
    app = example.create_app("memory://", in_process_runner=False, outbox=outbox)
    d = app.state.dispatcher

    with tq_web.testing.Scheduler(d) as sched:
        start = sched.now
        client = TestClient(app)
        form = {"email": "ada@example.com", "name": "Ada"}
        assert client.post("/signup", data=form).status_code == 202
        assert client.post("/signup", data=form).status_code == 202  # deduplicated

        scheduled = sched.tasks()
        assert [type(t.payload).__name__ for t in scheduled] == [
            "SendWelcomeEmail",
            "GenerateReport",
        ]
        assert scheduled[1].eta == start + timedelta(seconds=example.REPORT_DELAY)
        assert scheduled[1].queue == "reports"

        ran = sched.run()

    assert [(type(i.payload).__name__, i.status) for i in ran] == [
        ("SendWelcomeEmail", 500),  # the mail server was not ready: retried
        ("SendWelcomeEmail", 200),
        ("GenerateReport", 200),
    ]
    assert ran[1].eta == start + timedelta(seconds=1)  # min_backoff
    assert outbox.emails == ["ada@example.com"]
    assert list(outbox.reports) == [example.user_id_for("ada@example.com")]
    assert sched.now == start + timedelta(seconds=example.REPORT_DELAY)


def test_signup_rejects_a_bad_form() -> None:
    app = example.create_app("memory://", in_process_runner=False)
    with tq_web.testing.Scheduler(app.state.dispatcher) as sched:
        resp = TestClient(app).post("/signup", data={"email": "nope", "name": ""})
        assert resp.status_code == 400
        assert sched.tasks() == []
