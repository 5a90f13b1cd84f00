"""The command wire format (cancel, reschedule, retry; tombstones): pure encode/decode."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from eventsched.core.domain.commands import (
    TOMBSTONE,
    Command,
    command_headers,
    encode_command,
    is_command,
    new_command,
    parse_command,
    tombstone_command,
)
from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.runtime.errors import DecodeError

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
LIMITS = DecodeLimits()


def test_a_reschedule_round_trips_through_the_wire() -> None:
    sent = new_command(
        "reschedule",
        idempotency_key="invoice-42",
        execute_at=NOW + timedelta(minutes=5, microseconds=1500),
        requested_by="cli:ops",
        now=NOW,
    )
    value = encode_command(sent)
    got = parse_command(value, now=NOW, limits=LIMITS)
    assert got == sent
    # UTC milliseconds, rounded up: a due time is never early
    assert got.execute_at == NOW + timedelta(minutes=5, milliseconds=2)
    assert got.kafka_key == b"invoice-42"
    assert ("schema-version", b"2") in command_headers()
    assert msgspec.json.decode(value)["op"] == "reschedule"


def test_a_command_by_id_is_keyed_by_the_id() -> None:
    event_id = uuid.uuid4()
    command = new_command("retry", event_id=event_id, now=NOW)
    assert command.kafka_key == str(event_id).encode()
    assert parse_command(encode_command(command), now=NOW, limits=LIMITS) == command


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"op": "delete"}, "invalid_op"),
        ({"op": "cancel", "idempotency_key": None}, "missing_field"),
        ({"op": "reschedule"}, "missing_field"),
        ({"op": "cancel", "execute_at": "2026-12-03T12:05:00Z"}, "invalid_field"),
        ({"op": "retry", "execute_at": "2027-12-31T00:00:00Z"}, "beyond_horizon"),
        ({"op": "retry", "execute_at": "2026-11-01T00:00:00Z"}, "too_old"),
        ({"op": "retry", "execute_at": "2026-12-03T12:05:00"}, "invalid_timestamp"),
        ({"op": "cancel", "command_id": "nope"}, "invalid_id"),
        ({"op": "cancel", "idempotency_key": ""}, "invalid_key"),
        ({"op": "cancel", "requested_by": "x" * 201}, "invalid_field"),
    ],
)
def test_bad_commands_are_refused_with_a_dlq_reason(fields: dict[str, object], reason: str) -> None:
    obj: dict[str, object] = {
        "command_id": str(uuid.uuid4()),
        "idempotency_key": "k",
        "created_at": "2026-12-03T12:00:00Z",
        **fields,
    }
    with pytest.raises(DecodeError) as err:
        parse_command(msgspec.json.encode(obj), now=NOW, limits=LIMITS)
    assert err.value.reason == reason


def test_schedule_messages_are_not_commands() -> None:
    assert not is_command({"id": "x"})
    assert not is_command({"op": "schedule", "id": "x"})
    assert is_command({"op": "cancel"})


def test_a_tombstone_is_a_cancel_whose_id_is_its_position() -> None:
    first = tombstone_command(b"invoice-42", topic="events", partition=3, offset=17, now=NOW)
    again = tombstone_command(b"invoice-42", topic="events", partition=3, offset=17, now=NOW)
    other = tombstone_command(b"invoice-42", topic="events", partition=3, offset=18, now=NOW)
    assert first == again  # a redelivered tombstone is the same command
    assert first.command_id != other.command_id
    assert (first.op, first.idempotency_key, first.requested_by) == (
        "cancel",
        "invoice-42",
        TOMBSTONE,
    )
    with pytest.raises(DecodeError) as err:
        tombstone_command(None, topic="events", partition=0, offset=0, now=NOW)
    assert err.value.reason == "empty"


def test_new_command_refuses_what_the_consumer_would() -> None:
    with pytest.raises(ValueError, match="idempotency_key"):
        new_command("cancel", now=NOW)
    with pytest.raises(ValueError, match="execute_at"):
        new_command("reschedule", idempotency_key="k", now=NOW)
    with pytest.raises(ValueError, match="offset"):
        new_command("retry", idempotency_key="k", execute_at=datetime(2027, 1, 1), now=NOW)
    assert isinstance(new_command("cancel", idempotency_key="k"), Command)
