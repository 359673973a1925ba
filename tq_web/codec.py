"""The wire format: ``{"type":"<full proto name>","body":<proto JSON>}``.

Byte-compatible with the Go ``tq`` package for its oracle
(``{"type":"google.protobuf.Duration","body":"123s"}``); beyond it each side
decodes the other's bodies.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from google.protobuf import json_format
from google.protobuf.message import Message

__all__ = ["DecodeError", "decode", "encode", "full_name"]


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class DecodeError(ValueError):
    """A push body is not a valid envelope for a known type."""


def full_name(message_or_class: Message | type[Message]) -> str:
    """The full protobuf type name, e.g. ``google.protobuf.Duration``."""
    return str(message_or_class.DESCRIPTOR.full_name)


def encode(message: Message) -> bytes:
    """Serialise a payload into the compact JSON envelope."""
    body = json_format.MessageToDict(message, preserving_proto_field_name=False)
    return _ENCODER.encode({"type": full_name(message), "body": body}).encode("utf-8")


def decode(
    data: bytes, lookup: Callable[[str], type[Message] | None]
) -> tuple[str, Message]:
    """Parse an envelope; ``lookup`` maps a type name to its message class.

    Unknown fields in ``body`` are ignored (an old handler accepts a newer
    producer's bodies).

    Raises:
        DecodeError: not JSON, not an object, no ``type`` or ``body``, an
            unknown type, or a body that does not parse as the type.
    """
    try:
        env = json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise DecodeError(f"not JSON: {err}") from None
    if not isinstance(env, dict):
        raise DecodeError("the envelope is not a JSON object")
    type_name = env.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise DecodeError("the envelope has no type")
    body = env.get("body")
    if body is None:
        raise DecodeError("no task body given")
    cls = lookup(type_name)
    if cls is None:
        raise DecodeError(f"no handler for type {type_name!r}")
    message = cls()
    try:
        json_format.ParseDict(body, message, ignore_unknown_fields=True)
    except (
        json_format.ParseError,
        ValueError,
        TypeError,
        RecursionError,
        AttributeError,
    ) as err:
        raise DecodeError(f"body does not parse as {type_name}: {err}") from None
    except Exception as err:  # protobuf may raise others on hostile input
        raise DecodeError(f"body does not parse as {type_name}: {err!r}") from None
    return type_name, message
