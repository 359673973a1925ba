"""Flask integration: the push endpoint as a view, and the runner in a thread."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import flask
except ImportError as err:  # pragma: no cover - exercised without flask
    from .exceptions import missing

    raise missing("flask", "flask", "tq_web.flask") from err

from .exceptions import ConfigurationError
from .request import PushResult
from .wsgi import push_request_from_environ

if TYPE_CHECKING:
    from .dispatcher import Dispatcher
    from .runner import RunnerThread

__all__ = ["install", "start_runner_thread"]

ENDPOINT = "tq_web_push"
# Every method reaches the view, which answers non-POST with 405 and the
# X-TQ-Web-Outcome header, like the other adapters.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _view(dispatcher: Dispatcher) -> Any:
    def tq_web_push(subpath: str = "") -> flask.Response:
        req = push_request_from_environ(
            flask.request.environ, dispatcher.core.max_body_size
        )
        result = req if isinstance(req, PushResult) else dispatcher.core.call_sync(req)
        return flask.Response(result.body, status=result.status, headers=result.headers)

    return tq_web_push


def install(
    dispatcher: Dispatcher, app: flask.Flask | flask.Blueprint, mount_path: str = ""
) -> None:
    """Add the push view to a Flask app, or to a Blueprint before it is registered.

    ``base_url`` is absolute: for a Blueprint with ``url_prefix="/api"`` use
    ``base_url="/api/internal/tasks/"``. For an app served under a
    ``SCRIPT_NAME`` (e.g. mounted at ``/api`` by a WSGI dispatcher), pass
    ``mount_path="/api"`` with that same absolute ``base_url``.
    """
    view = _view(dispatcher)
    base = dispatcher.base_url
    mount = mount_path.rstrip("/")
    if mount:
        if not base.startswith(mount + "/"):
            raise ConfigurationError(
                f"mount_path {mount_path!r} is not a prefix of base_url {base!r}: "
                "base_url must be the absolute path clients use"
            )
        base = base[len(mount) :]
    if isinstance(app, flask.Flask):
        app.add_url_rule(base + "<path:subpath>", ENDPOINT, view, methods=METHODS)
        app.extensions["tq_web"] = dispatcher
        return

    def register(state: Any) -> None:
        prefix = (state.url_prefix or "").rstrip("/")
        if not base.startswith(prefix + "/"):
            raise ConfigurationError(
                f"blueprint {app.name!r} is mounted at {prefix!r} but the dispatcher's "
                f"base_url is {base!r}: base_url must be the absolute path, e.g. "
                f"{prefix + '/internal/tasks/'!r}"
            )
        rule = base[len(prefix) :]
        state.add_url_rule(rule + "<path:subpath>", ENDPOINT, view, methods=METHODS)
        state.app.extensions["tq_web"] = dispatcher

    app.record(register)


def start_runner_thread(
    dispatcher: Dispatcher, target: str, **options: Any
) -> RunnerThread:
    """Start the push runner in a daemon thread (development servers).

    Returns the thread; call ``.stop()`` for a graceful stop (in-flight pushes
    finish). The runner never starts by itself.
    """
    from .runner import RunnerThread

    thread = RunnerThread(
        dispatcher.backend, target, queues=dispatcher.queue_configs, **options
    )
    thread.start()
    dispatcher.on_add(thread.wake)
    return thread
