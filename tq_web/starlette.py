"""Starlette (and FastAPI) integration: a route for the push endpoint and a
lifespan that runs the push runner in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

try:
    from starlette.applications import Starlette
    from starlette.routing import BaseRoute, Match, NoMatchFound, Router
    from starlette.types import Receive, Scope, Send
except ImportError as err:  # pragma: no cover - exercised without starlette
    from .exceptions import missing

    raise missing("starlette", "starlette", "tq_web.starlette") from err

from .asgi import serve_push
from .request import full_path

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

__all__ = ["PushRoute", "install", "runner_lifespan"]


class PushRoute(BaseRoute):
    """Matches every request whose full path starts with ``base_url``.

    The full path includes ``root_path``, so the route works in a Router under a
    ``Mount`` as long as ``base_url`` is the absolute path clients use.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.name = "tq_web_push"
        self.path = dispatcher.base_url

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            path = full_path(scope.get("path", ""), scope.get("root_path", ""))
            if path.startswith(self.dispatcher.base_url):
                return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_push(self.dispatcher, scope, receive, send)

    def __repr__(self) -> str:
        return f"PushRoute(base_url={self.dispatcher.base_url!r})"


def install(dispatcher: Dispatcher, app: Starlette | Router) -> None:
    """Add the push route first in ``app``'s routes (so catch-alls don't shadow it)."""
    router = app.router if isinstance(app, Starlette) else app
    router.routes.insert(0, PushRoute(dispatcher))


def runner_lifespan(
    dispatcher: Dispatcher,
    target: str,
    *,
    inner: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
    **runner_options: Any,
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """A Starlette lifespan that runs the push runner while the app serves.

    Args:
        dispatcher: whose backend and queues to serve.
        target: the base URL the runner posts to, e.g. ``http://127.0.0.1:8000``.
        inner: the app's own lifespan, to compose with.
        runner_options: passed to :class:`tq_web.runner.Runner`.

    Example::

        app = Starlette(routes=..., lifespan=runner_lifespan(d, "http://127.0.0.1:8000"))
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        from .runner import Runner

        runner = Runner(
            dispatcher.backend,
            target,
            queues=dispatcher.queue_configs,
            **runner_options,
        )
        await runner.start()
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(runner.wake)

        remove = dispatcher.on_add(wake)
        try:
            if inner is not None:
                async with inner(app) as state:
                    yield state
            else:
                yield None
        finally:
            remove()
            await runner.stop()

    return lifespan
