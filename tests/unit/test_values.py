"""Task names, the wire format, header parsing, retry options, queue.yaml."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct

import tq_web
from tq_web import codec
from tq_web import taskqueue as tq
from tq_web.headers import parse_request_headers
from tq_web.queues import parse_queue_yaml


def test_import_loads_no_framework_or_driver():
    code = (
        "import sys, tq_web, tq_web.taskqueue, tq_web.testing\n"
        "bad = [m for m in ('flask', 'starlette', 'httpx', 'aiohttp', 'psycopg', "
        "'google.cloud', 'fastapi', 'yaml', 'uvicorn') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_task_name_oracle():
    t = tq_web.Task(Duration(), deduplication_key="abc", name_prefix="prefix")
    assert (
        t.name
        == "prefix-afc6f8271b8598ee04e359916e6c584a9bc3c520a11dd5244e3399346ac0d3a7"
    )
    assert tq_web.Task(Duration()).name == ""
    assert tq_web.Task(Duration(), name_prefix="p").name == "p"
    assert tq_web.Task(Duration(), deduplication_key="abc").name == (
        "afc6f8271b8598ee04e359916e6c584a9bc3c520a11dd5244e3399346ac0d3a7"
    )
    # dedup is per type
    assert (
        tq_web.Task(Empty(), deduplication_key="abc").name
        != tq_web.Task(Duration(), deduplication_key="abc").name
    )


def test_task_delay_and_eta():
    with pytest.raises(ValueError):
        tq_web.Task(Duration(), delay=1, eta=datetime.now(UTC))
    with pytest.raises(ValueError):
        tq_web.Task(Duration(), eta=datetime(2030, 1, 1))
    with pytest.raises(ValueError):
        tq_web.Task(Duration(), delay=-1)
    assert tq_web.Task(Duration(), delay=1.5).delay == timedelta(seconds=1.5)


def test_wire_format_oracle_and_roundtrip():
    assert codec.encode(Duration(seconds=123)) == (
        b'{"type":"google.protobuf.Duration","body":"123s"}'
    )
    s = Struct()
    s.update({"name": "é", "n": 2})
    data = codec.encode(s)
    assert b"\\u" not in data  # UTF-8, not escaped
    _, back = codec.decode(data, lambda n: Struct)
    assert back == s


def test_decode_errors():
    lookup = {"google.protobuf.Duration": Duration}.get
    for bad in (
        b"",
        b"nul",
        b"[]",
        b'{"type":1,"body":"1s"}',
        b'{"body":"1s"}',
        b'{"type":"google.protobuf.Duration","body":null}',
        b'{"type":"google.protobuf.Duration","body":{"a":1}}',
        b"[" * 100000,
        b"\xff\xfe",
    ):
        with pytest.raises(codec.DecodeError):
            codec.decode(bad, lookup)


def test_parse_request_headers_malformed_values():
    h = parse_request_headers(
        {
            "x-appengine-taskretrycount": "abc",
            "x-cloudtasks-taskretrycount": "5",
            "x-cloudtasks-tasketa": "nan",
            "x-appengine-taskexecutioncount": "99999999999999999999999",
            "x-appengine-taskpreviousresponse": "",
            "x-cloudtasks-taskpreviousresponse": "503",
            "x-cloudtasks-queuename": "projects/p/locations/l/queues/short",
        }
    )
    assert h.task_retry_count == 0  # X-AppEngine wins even if malformed
    assert h.task_eta is None and h.task_execution_count == 0
    assert h.task_previous_response == 503
    assert h.queue_name == "short"
    assert parse_request_headers({"x-appengine-tasketa": "0"}).task_eta is None
    assert parse_request_headers({"x-appengine-tasketa": "1e300"}).task_eta is None
    assert parse_request_headers({}) == tq_web.RequestHeaders()


def test_request_headers_outside_handler():
    with pytest.raises(tq_web.NotInTaskHandler):
        tq_web.request_headers()
    with pytest.raises(LookupError):
        tq_web.request_headers()


def test_backoff_formula_documented_example():
    o = tq.RetryOptions(min_backoff=10, max_backoff=300, max_doublings=3)
    assert [tq.backoff(o, n).total_seconds() for n in range(1, 10)] == [
        10,
        20,
        40,
        80,
        160,
        240,
        300,
        300,
        300,
    ]
    d = [tq.backoff(None, n).total_seconds() for n in (1, 2, 3, 16, 17, 30)]
    assert (
        d[:3] == [0.1, 0.2, 0.4]
        and d[3] == pytest.approx(3276.8)
        and d[4:] == [3600, 3600]
    )
    zero = tq.RetryOptions(min_backoff=1, max_doublings=0)
    assert [tq.backoff(zero, n).total_seconds() for n in (1, 2, 3)] == [1, 2, 3]


def test_retries_exhausted_needs_every_limit():
    both = tq.RetryOptions(retry_limit=2, age_limit=60)
    assert not tq.retries_exhausted(both, 5, timedelta(seconds=10))  # age ok
    assert not tq.retries_exhausted(both, 0, timedelta(seconds=100))  # count ok
    assert tq.retries_exhausted(both, 2, timedelta(seconds=100))
    assert tq.retries_exhausted(tq.RetryOptions(retry_limit=0), 0, timedelta())
    assert not tq.retries_exhausted(tq.RetryOptions(), 1000, timedelta(days=9))


def test_retry_options_fields():
    with pytest.raises(ValueError):
        tq.RetryOptions(retry_limit=-1)
    with pytest.raises(ValueError):
        tq.RetryOptions(min_backoff=10, max_backoff=1)
    o = tq.RetryOptions(retry_limit=1).merged(
        tq.RetryOptions(retry_limit=5, min_backoff=2)
    )
    assert o.retry_limit == 1 and o.min_backoff == timedelta(seconds=2)
    assert tq.RetryOptions.from_dict(o.to_dict()) == o
    assert tq_web.RetryOptions is tq.RetryOptions


def test_new_post_task():
    t = tq.new_post_task("/w", {"a": ["1", "2"], "b": "x y"})
    assert t.payload == b"a=1&a=2&b=x+y" and t.method == "POST"
    assert t.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_queue_yaml():
    cfg = parse_queue_yaml(
        {
            "queue": [
                {
                    "name": "fast",
                    "rate": "10/m",
                    "bucket_size": 5,
                    "max_concurrent_requests": 2,
                    "retry_parameters": {
                        "task_retry_limit": 3,
                        "task_age_limit": "2h",
                        "min_backoff_seconds": 0.5,
                        "max_backoff_seconds": 30,
                        "max_doublings": 2,
                    },
                },
                {"name": "pullq", "mode": "pull"},
            ]
        }
    )
    fast = cfg["fast"]
    assert fast.rate == pytest.approx(10 / 60) and fast.bucket_size == 5
    assert fast.retry_options == tq.RetryOptions(3, 7200, 0.5, 30, 2)
    assert cfg["pullq"].mode == "pull" and cfg["pullq"].rate == 500
    for bad in (
        {"queue": [{"rate": "1/s"}]},
        {"queue": [{"name": "q", "rate": "fast"}]},
        {"queue": [{"name": "q", "bogus": 1}]},
        {"queue": "x"},
        {"queue": [{"name": "q", "retry_parameters": {"task_age_limit": "soon"}}]},
        {"queue": [{"name": "q"}, {"name": "q"}]},
    ):
        with pytest.raises(tq_web.ConfigurationError):
            parse_queue_yaml(bad)


def test_load_queue_yaml_errors(tmp_path):
    with pytest.raises(tq_web.ConfigurationError, match="cannot read"):
        tq_web.load_queue_yaml(tmp_path / "missing.yaml")
    p = tmp_path / "queue.yaml"
    p.write_text("queue: [\n")
    with pytest.raises(tq_web.ConfigurationError, match="not valid YAML"):
        tq_web.load_queue_yaml(p)
    p.write_text("queue:\n- name: q1\n  rate: 5/s\n")
    assert tq_web.load_queue_yaml(p)["q1"].rate == 5


def test_connect_errors():
    for bad in ("redis://x", "nonsense", "sqlite:/x"):
        with pytest.raises(tq_web.InvalidBackendURL):
            tq_web.connect(bad)


def test_dispatcher_base_url_normalised():
    assert tq_web.Dispatcher("memory://", base_url="/x/tasks").base_url == "/x/tasks/"
    with pytest.raises(ValueError):
        tq_web.Dispatcher("memory://", base_url="relative/")


def test_add_task_errors_are_transient():
    from tq_web.backends.memory import MemoryBackend

    class Broken(MemoryBackend):
        def add(self, task, queue_name=""):
            raise OSError("disk on fire")

    d = tq_web.Dispatcher(Broken())
    d.register_task(Duration, lambda p: None)
    with pytest.raises(tq_web.Transient) as info:
        d.add_task(tq_web.Task(Duration()))
    assert isinstance(info.value.__cause__, OSError)


def test_body_over_limit_refused_at_add():
    d = tq_web.Dispatcher("memory://", max_body_size=100)
    d.register_task(Struct, lambda p: None)
    s = Struct()
    s.update({"x": "y" * 200})
    with pytest.raises(ValueError, match="push limit"):
        d.add_task(tq_web.Task(s))


def test_retry_options_stored_are_effective():
    from tq_web.queues import QueueConfig

    d = tq_web.Dispatcher(
        "memory://",
        queues=[
            QueueConfig(
                "q", retry_options=tq.RetryOptions(max_doublings=4, min_backoff=3)
            )
        ],
    )
    d.register_task(
        Duration, lambda p: None, "q", tq.RetryOptions(min_backoff=1, retry_limit=9)
    )
    d.add_task(tq_web.Task(Duration(), retry_options=tq.RetryOptions(retry_limit=2)))
    [t] = d.backend.list_tasks("q")
    assert t.retry_options == tq.RetryOptions(
        retry_limit=2, min_backoff=1, max_doublings=4
    )


def test_add_task_conn_needs_postgres():
    d = tq_web.Dispatcher("memory://")
    d.register_task(Duration, lambda p: None)
    with pytest.raises(TypeError, match="PostgreSQL"):
        d.add_task(tq_web.Task(Duration()), conn=object())


def test_scheduler_does_not_leave_dispatcher_unsigned(tmp_path, monkeypatch):
    from tq_web.auth import SIGNATURE_HEADER
    from tq_web.testing import Scheduler

    monkeypatch.delenv("TQ_WEB_SECRET_KEY", raising=False)
    d = tq_web.Dispatcher(f"sqlite:///{tmp_path}/s.db")
    d.register_task(Duration, lambda p: None)
    with Scheduler(d) as sched:
        d.add_task(tq_web.Task(Duration()))
        assert len(sched.run()) == 1
    d.add_task(tq_web.Task(Duration()))
    [t] = d.backend.list_tasks("default")
    assert SIGNATURE_HEADER in t.headers


def test_cli_redacts_passwords():
    from tq_web.cli import redact

    assert (
        redact("postgresql://u:s3cret@h/db?schema=x")
        == "postgresql://u:***@h/db?schema=x"
    )
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
