"""Exceptions raised by tq_web (a leaf module: no imports from the package).

Every exception tq_web raises derives from :class:`TqWebError`, except
configuration and input errors, which are named :class:`ValueError` subclasses,
and :class:`NotInTaskHandler`, a :class:`LookupError`.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)

_TAG_ATTR = "__tq_web_tags__"


class TqWebError(Exception):
    """Root of the exceptions tq_web raises at runtime."""


class _Tag(TqWebError):
    """Base for the tag classes: instances and tagged errors both count."""

    _tag_name = ""

    @classmethod
    def tag(cls, exc: E) -> E:
        """Tag ``exc`` so the push endpoint treats it as this class, and return it.

        Use it as ``raise Transient.tag(err)``. A tag anywhere in the
        ``__cause__``/``__context__`` chain of the raised exception counts.
        """
        tags: frozenset[str] = getattr(exc, _TAG_ATTR, frozenset())
        try:
            setattr(exc, _TAG_ATTR, frozenset(tags) | {cls._tag_name})
        except (AttributeError, TypeError) as err:  # pragma: no cover - exotic types
            raise TypeError(f"cannot tag {type(exc).__name__} instances") from err
        return exc

    @classmethod
    def is_tagged(cls, exc: BaseException) -> bool:
        """Whether ``exc`` or any error in its cause/context chain has this tag."""
        seen: set[int] = set()
        stack: list[BaseException] = [exc]
        while stack:
            cur = stack.pop()
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            if isinstance(cur, cls) or cls._tag_name in getattr(cur, _TAG_ATTR, ()):
                return True
            if cur.__cause__ is not None:
                stack.append(cur.__cause__)
            if cur.__context__ is not None:
                stack.append(cur.__context__)
        return False


class Retry(_Tag):
    """Raised by a handler that wants its task redelivered later (status 409).

    Use it when the handler knows the queue semantics and expects a later
    attempt to succeed ("cannot run before 2 PM"). It wins over :class:`Transient`.
    """

    _tag_name = "retry"


class Transient(_Tag):
    """A transient failure (status 500 at the push endpoint; the queue retries).

    ``Dispatcher.add_task`` also raises it, with the backend error as
    ``__cause__``, when the backend fails.
    """

    _tag_name = "transient"


class NotInTaskHandler(LookupError):
    """``request_headers()`` was called outside a task handler."""


class ConfigurationError(ValueError):
    """tq_web was configured wrongly (bad option, bad URL, bad queue.yaml)."""


class InvalidBackendURL(ConfigurationError):
    """``tq_web.connect()`` got a URL it cannot use."""


class MissingDependency(ConfigurationError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


class TaskTypeError(ValueError):
    """Base for errors about a task's type or payload."""


class NotAProtoMessage(TaskTypeError):
    """``register_task`` got a prototype that is not a protobuf message class."""


class DuplicateTaskType(TaskTypeError):
    """``register_task`` was called twice for the same protobuf type."""


class UnregisteredTaskType(TaskTypeError):
    """``add_task`` got a payload whose type has no registered handler."""


class InvalidTask(ValueError):
    """A task is malformed: bad title, bad name, both delay and ETA, too large."""


def missing(package: str, extra: str, feature: str) -> MissingDependency:
    """Build the error raised when an optional dependency is absent."""
    return MissingDependency(
        f"{feature} needs the {package!r} package: pip install 'tq_web[{extra}]'"
    )
