"""decode_message: what the consumer makes of a message (an event or a command)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from eventsched.core.domain.commands import Command, encode_command, new_command
from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.domain.event import Event
from eventsched.core.domain.message import decode_message
from eventsched.core.domain.wire import encode_event, new_event
from eventsched.core.runtime.errors import DecodeError

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
LIMITS = DecodeLimits()


def decode(value: bytes | None, version: bytes | None = None, key: bytes | None = None) -> object:
    headers = {"schema-version": version} if version is not None else None
    return decode_message(
        value, now=NOW, limits=LIMITS, headers=headers, key=key, topic="t", partition=1, offset=7
    )


def test_events_decode_in_version_1_2_or_without_a_header_even_with_an_op_in_the_payload() -> None:
    event = new_event("t", {"op": "cancel"}, NOW + timedelta(hours=1), now=NOW)
    for version in (None, b"1", b"2"):
        assert decode(encode_event(event), version) == event
    body = json.loads(encode_event(event))
    assert decode(json.dumps({**body, "op": "schedule"}).encode(), b"2") == event


def test_commands_decode_with_or_without_the_header() -> None:
    command = new_command("reschedule", idempotency_key="k", execute_at=NOW + timedelta(hours=2))
    for version in (None, b"2"):
        decoded = decode(encode_command(command), version)
        assert isinstance(decoded, Command)
        assert (decoded.op, decoded.command_id, decoded.execute_at) == (
            "reschedule",
            command.command_id,
            command.execute_at,
        )


def test_a_tombstone_with_a_key_is_a_cancel_of_that_key_with_a_stable_id() -> None:
    first, again = decode(None, key=b"invoice-42"), decode(None, key=b"invoice-42")
    assert isinstance(first, Command) and first.op == "cancel"
    assert first.idempotency_key == "invoice-42" and first.requested_by == "kafka-tombstone"
    assert isinstance(again, Command) and again.command_id == first.command_id


@pytest.mark.parametrize(
    ("value", "version", "key", "reason"),
    [
        (None, None, None, "empty"),
        (b"", None, b"k", "empty"),
        (b"{}", b"3", None, "unsupported_schema"),
        (b'{"op":"drop","command_id":"0190a4b2-7c3e-7d4f-8a1b-2c3d4e5f6a7c",'
         b'"idempotency_key":"k","created_at":"2026-05-01T12:00:00Z"}', b"2", None, "invalid_op"),
        (b'{"op":"cancel","idempotency_key":"k","created_at":"2026-05-01T12:00:00Z"}', None, None,
         "missing_field"),
    ],
)  # fmt: skip
def test_bad_messages_get_their_reason(
    value: bytes | None, version: bytes | None, key: bytes | None, reason: str
) -> None:
    with pytest.raises(DecodeError) as info:
        decode(value, version, key)
    assert info.value.reason == reason


def test_an_event_is_an_event() -> None:
    event = new_event("t", {}, NOW, now=NOW)
    assert isinstance(decode(encode_event(event)), Event)
