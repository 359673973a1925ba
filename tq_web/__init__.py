"""tq_web: App Engine push-queue semantics for Python web apps.

Register typed protobuf handlers on a :class:`Dispatcher`, add tasks, and a
queue (embedded SQLite, PostgreSQL, or Google Cloud Tasks) pushes them back
over HTTP to ``/internal/tasks/<type>/<title>``.
"""

from __future__ import annotations

from . import taskqueue
from .auth import Authenticator, Signer
from .backends import Backend, connect
from .dispatcher import Dispatcher
from .exceptions import (
    ConfigurationError,
    DuplicateTaskType,
    InvalidBackendURL,
    InvalidTask,
    MissingDependency,
    NotAProtoMessage,
    NotInTaskHandler,
    Retry,
    TaskTypeError,
    TqWebError,
    Transient,
    UnregisteredTaskType,
)
from .headers import RequestHeaders, request_headers
from .oidc import AppEngineAuthenticator, OIDCAuthenticator
from .queues import QueueConfig, load_queue_yaml
from .request import PushRequest, PushResult
from .task import Task
from .taskqueue import RetryOptions

__version__ = "0.1.0.dev0"

__all__ = [
    "AppEngineAuthenticator",
    "Authenticator",
    "Backend",
    "ConfigurationError",
    "Dispatcher",
    "DuplicateTaskType",
    "InvalidBackendURL",
    "InvalidTask",
    "MissingDependency",
    "NotAProtoMessage",
    "NotInTaskHandler",
    "OIDCAuthenticator",
    "PushRequest",
    "PushResult",
    "QueueConfig",
    "RequestHeaders",
    "Retry",
    "RetryOptions",
    "Signer",
    "Task",
    "TaskTypeError",
    "TqWebError",
    "Transient",
    "UnregisteredTaskType",
    "__version__",
    "connect",
    "load_queue_yaml",
    "request_headers",
    "taskqueue",
]


def __getattr__(name: str) -> object:
    # tq_web.testing, tq_web.runner and tq_web.cli load on first attribute access.
    if name in ("testing", "runner", "cli"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
