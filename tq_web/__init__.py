"""tq_web: App Engine push-queue semantics for Python web apps."""

from __future__ import annotations

from . import taskqueue
from .backends import Backend, connect
from .exceptions import (
    ConfigurationError,
    DuplicateTaskType,
    InvalidBackendURL,
    InvalidTask,
    MissingDependency,
    NotAProtoMessage,
    NotInTaskHandler,
    Retry,
    TqWebError,
    Transient,
    UnregisteredTaskType,
)
from .queues import QueueConfig, load_queue_yaml
from .taskqueue import RetryOptions

__version__ = "0.1.0.dev0"
