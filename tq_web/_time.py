"""Time and duration helpers shared by every layer (a leaf module)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

Duration = timedelta | float | int
"""A duration: a :class:`datetime.timedelta` or a number of seconds."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def to_timedelta(value: Duration | None, what: str = "duration") -> timedelta | None:
    """Normalise a duration given as a timedelta or seconds.

    Raises:
        TypeError: the value is neither a number nor a timedelta.
        ValueError: the value is negative or not finite.
    """
    if value is None:
        return None
    if isinstance(value, str):  # from URL query strings and config files
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"{what} must be a number of seconds, got {value!r}"
            ) from None
    if isinstance(value, timedelta):
        td = value
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a timedelta or seconds, got {value!r}")
    else:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what} must be finite, got {value!r}")
        td = timedelta(seconds=value)
    if td < timedelta(0):
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return td


def require_aware(value: datetime | None, what: str = "datetime") -> datetime | None:
    """Check that a datetime is timezone-aware and return it in UTC.

    Raises:
        ValueError: the datetime is naive.
    """
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {value!r}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(
            f"{what} must be timezone-aware (use datetime.now(UTC)), "
            f"got a naive {value!r}"
        )
    return value.astimezone(UTC)


def to_us(value: datetime) -> int:
    """Microseconds since the epoch, exactly."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int) -> datetime:
    """The datetime for microseconds since the epoch (inverse of :func:`to_us`)."""
    return EPOCH + timedelta(microseconds=value)


def monotonic() -> float:
    """Monotonic seconds (for measuring intervals)."""
    return time.monotonic()
