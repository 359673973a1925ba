"""``tq_web.Task``: a typed payload plus routing options (seed 001 ``Task``)."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta

from google.protobuf.message import Message

from ._time import Duration, require_aware, to_timedelta
from .codec import full_name
from .exceptions import InvalidTask
from .taskqueue import RetryOptions

__all__ = ["Task"]

TITLE_RE = re.compile(r"^[A-Za-z0-9_.~-]{1,100}$")


class Task:
    """A task to enqueue: its protobuf payload and how to route it.

    Args:
        payload: the message; its type picks the handler and the queue.
        name_prefix: prepended to the task name. A prefix or a deduplication
            key makes a named task, which can be deleted and is deduplicated.
        deduplication_key: tasks of the same type with the same key are added
            once (while the name is taken, including its tombstone window).
        title: shown in the URL for humans and logs only (1-100 characters of
            ``[A-Za-z0-9_.~-]``, checked by ``add_task``).
        delay: run no earlier than this long from now.
        eta: run no earlier than this time (timezone-aware).
        retry_options: overrides the registered options field by field.

    Raises:
        ValueError: both ``delay`` and ``eta``, a naive ``eta``, a negative delay.
    """

    __slots__ = (
        "deduplication_key",
        "delay",
        "eta",
        "name_prefix",
        "payload",
        "retry_options",
        "title",
    )

    def __init__(
        self,
        payload: Message,
        *,
        name_prefix: str = "",
        deduplication_key: str = "",
        title: str = "",
        delay: Duration | None = None,
        eta: datetime | None = None,
        retry_options: RetryOptions | None = None,
    ) -> None:
        if delay is not None and eta is not None:
            raise InvalidTask("either delay or eta may be set, not both")
        self.payload = payload
        self.name_prefix = name_prefix
        self.deduplication_key = deduplication_key
        self.title = title
        self.delay: timedelta | None = to_timedelta(delay, "delay")
        self.eta: datetime | None = require_aware(eta, "eta")
        self.retry_options = retry_options

    @property
    def name(self) -> str:
        """The task name: ``""``, or prefix and/or ``hex(sha256(type + NUL + key))``.

        Joined by ``-``; deduplication is per protobuf type.
        """
        parts: list[str] = []
        if self.name_prefix:
            parts.append(self.name_prefix)
        if self.deduplication_key:
            if not isinstance(self.payload, Message):
                raise InvalidTask("task must have a protobuf payload")
            h = hashlib.sha256(
                (full_name(self.payload) + "\x00" + self.deduplication_key).encode(
                    "utf-8"
                )
            )
            parts.append(h.hexdigest())
        return "-".join(parts)

    def check_title(self) -> None:
        """Raise InvalidTask unless the title is empty or well formed."""
        if self.title and not (
            isinstance(self.title, str)
            and TITLE_RE.match(self.title)
            and self.title.strip(".")  # "." and ".." are path segments
        ):
            raise InvalidTask(
                f"invalid task title {self.title!r}: use 1-100 characters of "
                "[A-Za-z0-9_.~-]"
            )

    def __repr__(self) -> str:
        kind = full_name(self.payload) if isinstance(self.payload, Message) else "?"
        return f"<tq_web.Task {kind} name={self.name!r} title={self.title!r}>"
