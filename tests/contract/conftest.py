"""The backend contract suite runs against every backend through one fixture.

A backend is added by adding a factory to ``FACTORIES``. PostgreSQL tests skip
when no server is reachable, unless ``TQ_WEB_REQUIRE_POSTGRES=1`` (set by CI),
which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tq_web
from tq_web.backends.base import Backend

Factory = Callable[..., Backend]


def _memory(tmp_path: Path, **opts: Any) -> Backend:
    return tq_web.connect("memory://", **opts)


def _sqlite(tmp_path: Path, **opts: Any) -> Backend:
    return tq_web.connect(
        f"sqlite:///{tmp_path}/contract-{uuid.uuid4().hex[:8]}.db", **opts
    )


def postgres_url() -> str:
    return os.environ.get(
        "TQ_WEB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )


def require_postgres() -> None:
    """Skip (or fail, under CI's TQ_WEB_REQUIRE_POSTGRES=1) without a server."""
    try:
        import psycopg

        with psycopg.connect(postgres_url(), connect_timeout=3):
            pass
    except Exception as err:
        if os.environ.get("TQ_WEB_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required but unreachable: {err}")
        pytest.skip(f"no PostgreSQL server reachable: {err}")


def _postgres(tmp_path: Path, **opts: Any) -> Backend:
    require_postgres()
    schema = "tq_contract_" + uuid.uuid4().hex[:10]
    b = tq_web.connect(postgres_url(), schema=schema, **opts)
    b._test_schema = schema  # type: ignore[attr-defined]
    return b


FACTORIES: dict[str, Factory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgresql": _postgres,
}


@pytest.fixture(params=list(FACTORIES), ids=list(FACTORIES))
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    made: list[Backend] = []

    def make(**opts: Any) -> Backend:
        b = FACTORIES[request.param](tmp_path, **opts)
        made.append(b)
        return b

    yield make
    for b in made:
        drop = getattr(b, "drop_schema", None)
        if drop is not None:
            drop()
        b.close()


@pytest.fixture
def backend(make_backend: Factory) -> Backend:
    return make_backend()
