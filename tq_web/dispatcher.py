"""The Dispatcher (seed 001): register typed handlers, add tasks, serve pushes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.message import Message

from . import taskqueue as tq
from ._time import Duration
from .auth import (
    SIGNATURE_HEADER,
    Authenticator,
    Keys,
    SignatureAuthenticator,
    Signer,
    keys_from_env,
)
from .backends import Backend, connect
from .codec import encode, full_name
from .exceptions import (
    ConfigurationError,
    DuplicateTaskType,
    InvalidTask,
    NotAProtoMessage,
    Transient,
    UnregisteredTaskType,
)
from .push import DEFAULT_MAX_BODY_SIZE, PushCore, Registration, loggable_path
from .queues import QueueConfig, load_queue_yaml
from .request import PushRequest
from .task import Task

__all__ = ["DEFAULT_BASE_URL", "Dispatcher"]

log = logging.getLogger("tq_web")

DEFAULT_BASE_URL = "/internal/tasks/"
BATCH_SIZE = 100

QueuesArg = Mapping[str, QueueConfig] | Iterable[QueueConfig] | str | None


def _normalise_base_url(base_url: str) -> str:
    if not isinstance(base_url, str) or not base_url.startswith("/"):
        raise ConfigurationError(f"base_url must be an absolute path, got {base_url!r}")
    return base_url if base_url.endswith("/") else base_url + "/"


def _queue_configs(queues: QueuesArg) -> dict[str, QueueConfig]:
    if queues is None:
        return {}
    if isinstance(queues, str):
        return load_queue_yaml(queues)
    if isinstance(queues, Mapping):
        return {cfg.name: cfg for cfg in queues.values()}
    return {cfg.name: cfg for cfg in queues}


class Dispatcher:
    """Submits tasks to a queue and serves them back to typed handlers.

    Args:
        backend: a backend, or a URL for :func:`tq_web.connect`; ``None`` means
            ``$TQ_WEB_BACKEND``, else ``sqlite:///tq_web.sqlite3`` (relative to
            the working directory). Connected on first use.
        base_url: the absolute path the push endpoint serves.
        secret_key: key(s) that sign and verify pushes (oldest first; the last
            signs). Default: ``$TQ_WEB_SECRET_KEY`` (comma-separated), else on a
            ``sqlite://`` backend a key stored in the database.
        allow_unauthenticated: accept every push, signed or not (local
            experiments only).
        authenticators: more ways to accept a push (OIDC, App Engine); a push is
            accepted when any authenticator accepts it.
        retry_untagged_errors: answer 500 (retry) instead of 202 (drop) when a
            handler raises an untagged exception.
        max_body_size: the largest push body in bytes (413 above it).
        signature_max_age: reject signatures older than this (default never).
        queues: queue configurations: a mapping or list of
            :class:`~tq_web.QueueConfig`, or the path of a ``queue.yaml``.
        log_task_bodies: log task bodies at DEBUG level (off by default).
    """

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        secret_key: Keys | None = None,
        allow_unauthenticated: bool = False,
        authenticators: Sequence[Authenticator] = (),
        retry_untagged_errors: bool = False,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        signature_max_age: Duration | None = None,
        queues: QueuesArg = None,
        log_task_bodies: bool = False,
    ) -> None:
        self.base_url = _normalise_base_url(base_url)
        self.allow_unauthenticated = bool(allow_unauthenticated)
        self.queue_configs = _queue_configs(queues)
        self._backend_arg = backend
        self._backend: Backend | None = (
            backend if not isinstance(backend, str | None) else None
        )
        self._lock = threading.RLock()
        self._handlers: dict[str, Registration] = {}
        self._extra_auth = list(authenticators)
        self._explicit_keys = secret_key
        self._signature_max_age = signature_max_age
        self._signer: Signer | None = None
        self._signer_resolved = False
        self._warned_no_auth = False
        self._add_listeners: list[Callable[[], None]] = []
        self._opts_cache: dict[str, tq.RetryOptions | None] = {}
        self._auth_cache: tuple[Signer | None, int, list[Authenticator]] | None = None
        if secret_key is not None:
            self._signer = Signer(secret_key, signature_max_age)
            self._signer_resolved = True
        self.core = PushCore(
            self._handlers.get,
            self._authenticate,
            max_body_size=max_body_size,
            retry_untagged=retry_untagged_errors,
            log_task_bodies=log_task_bodies,
        )
        self.core.auth_may_block = lambda: (
            bool(self._extra_auth) and not (self.allow_unauthenticated)
        )
        if self._backend is not None:
            self._configure_backend(self._backend)

    # --- backend and keys ---
    @property
    def backend(self) -> Backend:
        """The backend, connected on first use."""
        b = self._backend
        if b is None:
            with self._lock:
                if self._backend is None:
                    arg = self._backend_arg
                    self._backend = connect(arg if isinstance(arg, str) else None)
                    self._configure_backend(self._backend)
                b = self._backend
        return b

    def _configure_backend(self, backend: Backend) -> None:
        configure = getattr(backend, "configure_queue", None)
        if configure is not None:
            for cfg in self.queue_configs.values():
                configure(cfg)

    def _swap_backend(self, backend: Backend | None) -> Backend | None:
        """Replace the backend (used by the testing Scheduler); returns the old one."""
        with self._lock:
            old, self._backend = self._backend, backend
            if backend is not None:
                self._configure_backend(backend)
            if self._explicit_keys is None:  # a stored key belongs to a backend
                self._signer, self._signer_resolved = None, False
            self._auth_cache = None
            return old

    @property
    def signer(self) -> Signer | None:
        """The push signer: explicit key, ``$TQ_WEB_SECRET_KEY``, or a stored key."""
        if not self._signer_resolved:
            with self._lock:
                if not self._signer_resolved:
                    keys: Keys | None = keys_from_env()
                    if keys is None:
                        get_key = getattr(self.backend, "signing_key", None)
                        keys = get_key() if get_key is not None else None
                    if keys:
                        self._signer = Signer(keys, self._signature_max_age)
                    self._signer_resolved = True
        return self._signer

    def _authenticate(self, request: PushRequest) -> str | None:
        if self.allow_unauthenticated:
            return None
        reasons: list[str] = []
        for auth in self._authenticators():
            reason = auth.authenticate(request)
            if reason is None:
                return None
            reasons.append(reason)
        if not reasons:
            if not self._warned_no_auth:
                self._warned_no_auth = True
                log.warning(
                    "tq_web: refusing every push with 403: no authentication is "
                    "configured (set secret_key or TQ_WEB_SECRET_KEY, add an "
                    "authenticator, or allow_unauthenticated=True for local use)"
                )
            return "no authentication configured"
        log.warning(
            "tq_web: rejected push to %s: %s",
            loggable_path(request.path),
            "; ".join(reasons),
        )
        return "; ".join(reasons)

    def _authenticators(self) -> list[Authenticator]:
        signer = self.signer
        cached = self._auth_cache
        if (
            cached is not None
            and cached[0] is signer
            and cached[1] == len(self._extra_auth)
        ):
            return cached[2]
        auths: list[Authenticator] = []
        if signer is not None:
            auths.append(SignatureAuthenticator(signer))
        auths.extend(self._extra_auth)
        self._auth_cache = (signer, len(self._extra_auth), auths)
        return auths

    def add_authenticator(self, authenticator: Authenticator) -> None:
        """Accept pushes that ``authenticator`` accepts (in addition to the others)."""
        self._extra_auth.append(authenticator)

    # --- registration ---
    def register_task(
        self,
        prototype: type[Message] | Message,
        handler: Callable[[Any], Any],
        queue: str = "default",
        retry_options: tq.RetryOptions | None = None,
    ) -> None:
        """Route tasks whose payload has ``prototype``'s type to ``handler``.

        Args:
            prototype: a protobuf message class (an instance is accepted too).
            handler: ``def h(payload)`` or ``async def h(payload)``.
            queue: the queue its tasks go to (``""`` means ``"default"``).
            retry_options: defaults for its tasks, field by field.

        Raises:
            NotAProtoMessage: ``prototype`` is not a protobuf message class.
            DuplicateTaskType: the type already has a handler.
            ValueError: a bad queue name.
            TypeError: ``handler`` is not callable.
        """
        cls = prototype if isinstance(prototype, type) else type(prototype)
        if not (
            isinstance(cls, type)
            and issubclass(cls, Message)
            and cls is not Message
            and getattr(cls, "DESCRIPTOR", None) is not None
        ):
            raise NotAProtoMessage(f"{prototype!r} is not a protobuf message class")
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        if retry_options is not None and not isinstance(retry_options, tq.RetryOptions):
            raise TypeError("retry_options must be a tq_web.RetryOptions")
        queue_name = tq.validate_queue_name(queue)
        type_name = full_name(cls)
        is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004
        )
        with self._lock:
            if type_name in self._handlers:
                raise DuplicateTaskType(
                    f"handler for {type_name!r} has already been registered"
                )
            self._handlers[type_name] = Registration(
                type_name, cls, handler, queue_name, retry_options, is_async
            )

    def get_queues(self) -> list[str]:
        """The queues of the registered task types, sorted and distinct."""
        return sorted({r.queue for r in self._handlers.values()})

    def registration(self, type_name: str) -> Registration | None:
        """The registration for a full protobuf type name, or None."""
        return self._handlers.get(type_name)

    # --- enqueueing ---
    def _build(self, task: Task) -> tuple[str, tq.Task]:
        if not isinstance(task, Task):
            raise InvalidTask(f"expected a tq_web.Task, got {type(task).__name__}")
        if not isinstance(task.payload, Message):
            raise UnregisteredTaskType(
                f"task payload must be a protobuf message, got {task.payload!r}"
            )
        type_name = full_name(task.payload)
        reg = self._handlers.get(type_name)
        if reg is None:
            raise UnregisteredTaskType(f"handler for {type_name!r} is not registered")
        task.check_title()
        name = task.name
        if name and not tq.NAME_RE.match(name):
            raise InvalidTask(
                f"invalid task name {name!r} (name_prefix may use [A-Za-z0-9_-], "
                "and the whole name at most 500 characters)"
            )
        path = self.base_url + type_name + ("/" + task.title if task.title else "")
        body = encode(task.payload)
        if len(body) > self.core.max_body_size:
            raise InvalidTask(
                f"task body is {len(body)} bytes, over the push limit of "
                f"{self.core.max_body_size}"
            )
        headers = {"Content-Type": "application/json"}
        signer = self.signer
        if signer is not None:
            headers[SIGNATURE_HEADER] = signer.sign(path, body)
        opts_or_none = self._effective_options(reg, task.retry_options)
        return reg.queue, tq.Task(
            path=path,
            payload=body,
            headers=headers,
            method="POST",
            name=name,
            delay=task.delay,
            eta=task.eta,
            retry_options=opts_or_none,
        )

    def _effective_options(
        self, reg: Registration, own: tq.RetryOptions | None
    ) -> tq.RetryOptions | None:
        """The task's options, else the registered ones, else the queue's."""
        if own is None and reg.type_name in self._opts_cache:
            return self._opts_cache[reg.type_name]
        opts = (own or tq.RetryOptions()).merged(reg.retry_options)
        cfg = self.queue_configs.get(reg.queue)
        if cfg is not None:
            opts = opts.merged(cfg.retry_options)
        result = None if opts == tq.RetryOptions() else opts
        if own is None:
            self._opts_cache[reg.type_name] = result
        return result

    def _build_all(self, tasks: Sequence[Task]) -> dict[str, list[tq.Task]]:
        per_queue: dict[str, list[tq.Task]] = defaultdict(list)
        for t in tasks:
            queue, raw = self._build(t)
            per_queue[queue].append(raw)
        return per_queue

    def add_task(self, *tasks: Task, conn: Any = None) -> None:
        """Enqueue tasks; returns once the backend has stored them.

        All tasks are checked first (nothing is enqueued if one is bad), then
        submitted per queue in batches of at most 100. A task whose name is
        taken (a duplicate or a tombstone) is skipped silently.

        Args:
            tasks: the tasks.
            conn: PostgreSQL only: the application's open connection (psycopg,
                or a SQLAlchemy Session/Connection). The tasks are added in its
                transaction, so they exist if and only if it commits.

        Raises:
            UnregisteredTaskType: a payload type has no handler.
            InvalidTask: a bad title or name, or a body over the push limit.
            Transient: the backend failed (its error is the ``__cause__``).
        """
        if not tasks:
            return
        per_queue = self._build_all(tasks)
        backend = self.backend
        kwargs: dict[str, Any] = {}
        if conn is not None:
            if "conn" not in inspect.signature(backend.add).parameters:
                raise TypeError(
                    f"{type(backend).__name__} cannot add tasks inside an application "
                    "transaction (conn=): use the PostgreSQL backend"
                )
            kwargs["conn"] = conn
        errors: list[BaseException] = []
        for queue, raws in per_queue.items():
            for i in range(0, len(raws), BATCH_SIZE):
                batch = raws[i : i + BATCH_SIZE]
                try:
                    if len(batch) == 1:
                        backend.add(batch[0], queue, **kwargs)
                    else:
                        backend.add_multi(batch, queue, **kwargs)
                except tq.TaskAlreadyAdded:
                    pass
                except tq.MultiError as err:
                    real = [
                        e
                        for e in err.errors
                        if e is not None and not isinstance(e, tq.TaskAlreadyAdded)
                    ]
                    if real:
                        errors.append(err)
                except Exception as err:
                    errors.append(err)
        for listener in list(self._add_listeners):
            try:
                listener()
            except Exception:  # a stopped runner must not break add_task
                log.debug("tq_web: add listener failed", exc_info=True)
        if errors:
            raise Transient(f"adding tasks failed: {errors[0]}") from errors[0]

    def on_add(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after each ``add_task`` (an in-process runner wakes).

        Returns a function that removes the listener.
        """
        self._add_listeners.append(listener)
        return lambda: self._add_listeners.remove(listener)

    async def add_task_async(self, *tasks: Task) -> None:
        """:meth:`add_task` without blocking the event loop."""
        if tasks:
            await asyncio.to_thread(self.add_task, *tasks)

    def delete_task(self, *tasks: Task) -> None:
        """Delete named tasks (rebuilding names as ``add_task`` does).

        Unknown or already deleted tasks are not an error; unnamed tasks are
        ignored.

        Raises:
            UnregisteredTaskType: a payload type has no handler.
            Transient: the backend failed.
        """
        per_queue: dict[str, list[tq.Task]] = defaultdict(list)
        for t in tasks:
            if not isinstance(t, Task) or not isinstance(t.payload, Message):
                raise InvalidTask(
                    f"expected a tq_web.Task with a protobuf payload, got {t!r}"
                )
            reg = self._handlers.get(full_name(t.payload))
            if reg is None:
                raise UnregisteredTaskType(
                    f"handler for {full_name(t.payload)!r} is not registered"
                )
            name = t.name
            if name:
                per_queue[reg.queue].append(tq.Task(name=name))
        if not per_queue:
            return
        backend = self.backend
        errors: list[BaseException] = []
        for queue, raws in per_queue.items():
            for i in range(0, len(raws), BATCH_SIZE):
                batch = raws[i : i + BATCH_SIZE]
                try:
                    backend.delete_multi(batch, queue)
                except tq.MultiError as err:
                    real = [
                        e
                        for e in err.errors
                        if e is not None and not isinstance(e, tq.TaskNotFound)
                    ]
                    if real:
                        errors.append(err)
                except tq.TaskNotFound:
                    pass
                except Exception as err:
                    errors.append(err)
        if errors:
            raise Transient(f"deleting tasks failed: {errors[0]}") from errors[0]

    async def delete_task_async(self, *tasks: Task) -> None:
        """:meth:`delete_task` without blocking the event loop."""
        if tasks:
            await asyncio.to_thread(self.delete_task, *tasks)

    # --- serving ---
    def install_routes(self, app: Any, *, mount_path: str = "") -> None:
        """Serve pushes at ``base_url`` in a Flask app or Blueprint, or a
        Starlette (or FastAPI) app or Router.

        Raises:
            TypeError: ``app`` is none of those (use :meth:`asgi_app` or
                :meth:`wsgi_app`).
        """
        if "flask" in sys.modules:
            import flask

            if isinstance(app, flask.Flask | flask.Blueprint):
                from .flask import install

                install(self, app, mount_path)
                return
        if "starlette" in sys.modules:
            from starlette.applications import Starlette
            from starlette.routing import Router

            if type(app).__module__.startswith("fastapi") and not isinstance(
                app, Starlette
            ):
                raise TypeError(
                    "install_routes on a FastAPI APIRouter would be lost by "
                    "app.include_router(): call install_routes(app) on the FastAPI "
                    "app (or a Starlette Router mounted with Mount)"
                )
            if isinstance(app, Starlette | Router):
                from .starlette import install as install_starlette

                install_starlette(self, app)
                return
        raise TypeError(
            f"install_routes needs a Flask app or Blueprint, or a Starlette app or "
            f"Router; got {type(app).__name__}. For another framework mount "
            "dispatcher.asgi_app() or dispatcher.wsgi_app()."
        )

    def asgi_app(self) -> Any:
        """A standalone ASGI app that serves ``base_url`` (404 elsewhere)."""
        from .asgi import PushASGIApp

        return PushASGIApp(self)

    def wsgi_app(self) -> Any:
        """A standalone WSGI app that serves ``base_url`` (404 elsewhere)."""
        from .wsgi import PushWSGIApp

        return PushWSGIApp(self)

    def close(self) -> None:
        """Close the backend if this dispatcher opened it."""
        if isinstance(self._backend_arg, str | None) and self._backend is not None:
            self._backend.close()
            self._backend = None
