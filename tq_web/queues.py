"""Queue configuration: in Python, or from an App Engine ``queue.yaml``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigurationError, missing
from .taskqueue import DEFAULT_QUEUE, RetryOptions, validate_queue_name

__all__ = ["QueueConfig", "load_queue_yaml", "parse_queue_yaml"]

DEFAULT_RATE = 500.0
DEFAULT_BUCKET_SIZE = 100
DEFAULT_MAX_CONCURRENT = 1000


@dataclass(frozen=True)
class QueueConfig:
    """How one queue is served (queue.yaml keys; Cloud Tasks' defaults).

    Attributes:
        name: the queue name.
        rate: dispatches per second (token refill rate).
        bucket_size: the token bucket's size (the largest burst).
        max_concurrent_requests: requests in flight at once.
        retry_options: the queue's retry parameters.
        mode: ``"push"`` or ``"pull"``.
    """

    name: str = DEFAULT_QUEUE
    rate: float = DEFAULT_RATE
    bucket_size: int = DEFAULT_BUCKET_SIZE
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT
    retry_options: RetryOptions | None = None
    mode: str = "push"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", validate_queue_name(self.name))
        if not (self.rate >= 0):
            raise ConfigurationError(f"queue {self.name}: rate must be >= 0")
        if self.bucket_size < 1:
            raise ConfigurationError(f"queue {self.name}: bucket_size must be >= 1")
        if self.max_concurrent_requests < 1:
            raise ConfigurationError(
                f"queue {self.name}: max_concurrent_requests must be >= 1"
            )
        if self.mode not in ("push", "pull"):
            raise ConfigurationError(f"queue {self.name}: mode must be push or pull")


_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*/\s*([smhd])\s*$")
_AGE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([smhd])\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _rate(queue: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _RATE_RE.match(str(value))
    if not m:
        raise ConfigurationError(
            f"queue {queue}: bad rate {value!r} (use e.g. 5/s, 10/m, 100/h, 1/d)"
        )
    return float(m.group(1)) / _UNIT[m.group(2)]


def _age(queue: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _AGE_RE.match(str(value))
    if not m:
        raise ConfigurationError(
            f"queue {queue}: bad task_age_limit {value!r} (use e.g. 30s, 5m, 2h, 1d)"
        )
    return float(m.group(1)) * _UNIT[m.group(2)]


def _number(queue: str, key: str, value: object, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"queue {queue}: {key} must be a number, got {value!r}"
        )
    if kind is int and value != int(value):
        raise ConfigurationError(
            f"queue {queue}: {key} must be an integer, got {value!r}"
        )
    return kind(value)


_QUEUE_KEYS = {
    "name",
    "rate",
    "bucket_size",
    "max_concurrent_requests",
    "retry_parameters",
    "mode",
    "target",
    "acl",
}
_RETRY_KEYS = {
    "task_retry_limit",
    "task_age_limit",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "max_doublings",
}


def parse_queue_yaml(
    data: object, source: str = "queue.yaml"
) -> dict[str, QueueConfig]:
    """Turn parsed queue.yaml data into queue configurations.

    Raises:
        ConfigurationError: the data is not a valid queue.yaml (the message says
            which queue and key).
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping) or not isinstance(data.get("queue", []), list):
        raise ConfigurationError(f"{source}: expected a mapping with a 'queue:' list")
    out: dict[str, QueueConfig] = {}
    for i, entry in enumerate(data.get("queue") or []):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigurationError(f"{source}: queue entry {i + 1} has no name")
        name = str(entry["name"])
        unknown = set(entry) - _QUEUE_KEYS
        if unknown:
            raise ConfigurationError(
                f"{source}: queue {name}: unknown key(s) {', '.join(sorted(unknown))}"
            )
        mode = str(entry.get("mode", "push"))
        retry = entry.get("retry_parameters") or {}
        if not isinstance(retry, Mapping):
            raise ConfigurationError(
                f"{source}: queue {name}: retry_parameters must be a mapping"
            )
        bad = set(retry) - _RETRY_KEYS
        if bad:
            raise ConfigurationError(
                f"{source}: queue {name}: unknown retry_parameters key(s) "
                + ", ".join(sorted(bad))
            )
        try:
            opts = RetryOptions(
                retry_limit=(
                    _number(name, "task_retry_limit", retry["task_retry_limit"], int)
                    if "task_retry_limit" in retry
                    else None
                ),
                age_limit=_age(name, retry["task_age_limit"])
                if "task_age_limit" in retry
                else None,
                min_backoff=(
                    _number(name, "min_backoff_seconds", retry["min_backoff_seconds"])
                    if "min_backoff_seconds" in retry
                    else None
                ),
                max_backoff=(
                    _number(name, "max_backoff_seconds", retry["max_backoff_seconds"])
                    if "max_backoff_seconds" in retry
                    else None
                ),
                max_doublings=(
                    _number(name, "max_doublings", retry["max_doublings"], int)
                    if "max_doublings" in retry
                    else None
                ),
            )
            cfg = QueueConfig(
                name=name,
                rate=_rate(name, entry["rate"]) if "rate" in entry else DEFAULT_RATE,
                bucket_size=(
                    _number(name, "bucket_size", entry["bucket_size"], int)
                    if "bucket_size" in entry
                    else DEFAULT_BUCKET_SIZE
                ),
                max_concurrent_requests=(
                    _number(
                        name,
                        "max_concurrent_requests",
                        entry["max_concurrent_requests"],
                        int,
                    )
                    if "max_concurrent_requests" in entry
                    else DEFAULT_MAX_CONCURRENT
                ),
                retry_options=opts if retry else None,
                mode=mode,
            )
        except ConfigurationError as err:
            raise ConfigurationError(f"{source}: {err}") from None
        except (ValueError, TypeError) as err:
            raise ConfigurationError(f"{source}: queue {name}: {err}") from None
        if name in out:
            raise ConfigurationError(f"{source}: queue {name} is defined twice")
        out[name] = cfg
    return out


def load_queue_yaml(path: str | os.PathLike[str]) -> dict[str, QueueConfig]:
    """Read an App Engine ``queue.yaml`` file.

    Raises:
        ConfigurationError: the file is missing, is not YAML, or is not a valid
            queue.yaml.
    """
    try:
        import yaml
    except ImportError:
        raise missing("pyyaml", "cli", "reading queue.yaml") from None
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigurationError(
            f"cannot read {os.fspath(path)}: {err.strerror}"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigurationError(
            f"{os.fspath(path)} is not valid YAML: {err}"
        ) from None
    return parse_queue_yaml(data, os.fspath(path))
