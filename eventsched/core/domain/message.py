"""Incoming messages on the ``events`` topic: a schedule (an :class:`Event`) or a command.

Pure functions, no I/O; any side. The consumer calls :func:`decode_message` for every
message. It tells the two kinds apart and hands each to its decoder:

* a tombstone (no value) with a key is a *cancel* of the event with that idempotency key
  (:func:`~eventsched.core.domain.commands.tombstone_command`); without a key it is
  ``empty``;
* ``schema-version`` (absent, ``1`` or ``2``; anything else is ``unsupported_schema``):
  a value with a top-level ``op`` other than ``schedule`` is a command
  (:func:`~eventsched.core.domain.commands.decode_command`); any other value is an event
  (:func:`~eventsched.core.domain.decode.decode_event`), in either version.

Only values that contain the bytes ``"op"`` are parsed to look for the field, so events
(the hot path) are parsed once, by :func:`decode_event`. Errors are
:class:`~eventsched.core.runtime.errors.DecodeError` with the reasons of
:data:`~eventsched.core.domain.decode.DECODE_REASONS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Final

from eventsched.core.domain.commands import Command, decode_command, is_command, tombstone_command
from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event, short
from eventsched.core.domain.jsonparse import parse_json
from eventsched.core.runtime.errors import DecodeError

__all__ = ["SCHEMA_VERSIONS", "decode_message"]

#: The ``schema-version`` header values the consumer accepts (absent means 1).
SCHEMA_VERSIONS: Final = (b"1", b"2")


def decode_message(
    value: bytes | None,
    *,
    now: datetime,
    limits: DecodeLimits,
    headers: Mapping[str, bytes | None] | None = None,
    key: bytes | None = None,
    topic: str = "",
    partition: int = 0,
    offset: int = 0,
) -> Event | Command:
    """Decode one Kafka message into an event or a command; raise DecodeError.

    ``key``, ``topic``, ``partition`` and ``offset`` matter for tombstones only (the
    cancel's target and its command id).
    """
    if value is None and key:
        return tombstone_command(key, topic=topic, partition=partition, offset=offset, now=now)
    version = headers.get("schema-version") if headers else None
    if version is not None and version not in SCHEMA_VERSIONS:
        shown = short(version.decode("ascii", "backslashreplace"))
        raise DecodeError("unsupported_schema", f"schema-version {shown}, expected 1 or 2")
    if value and b'"op"' in value:
        if len(value) > limits.max_message_bytes:
            raise DecodeError(
                "too_large", f"{len(value)} bytes, limit {limits.max_message_bytes} bytes"
            )
        obj, _ = parse_json(value)
        if type(obj) is dict and is_command(obj):
            return decode_command(obj, now=now, limits=limits)
    return decode_event(value, now=now, limits=limits)
