"""The client's messages and configuration, without a broker: what it builds decodes with
the consumer's decoder to the same event, and what the consumer would refuse is refused
before sending. (Sending, reading back and failures are in tests/integration/test_client.py.)"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventsched
from eventsched.client import Client, ClientError, DeliveryError
from eventsched.client.messages import command_message, event_message, event_messages
from eventsched.core.domain.commands import command_headers, parse_command
from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.wire import kafka_headers
from eventsched.core.runtime.errors import ConfigError, EventschedError
from eventsched.core.runtime.settings import build_settings

LIMITS = DecodeLimits()
# Nothing listens here, and nothing is sent by these tests: librdkafka connects lazily.
NOWHERE = "127.0.0.1:9"

_text = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)))
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_keys = st.none() | st.text(
    st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1, max_size=512
)
_types = st.text(st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=200).filter(
    lambda t: t.isprintable() and not t.isspace()
)
_offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: timezone(timedelta(minutes=m))
)


# 50 examples a run: the codec's own property tests (test_events) cover its corners; this one
# checks that what the client builds is what the consumer decodes.
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    type_=_types,
    payload=st.dictionaries(_text, _json, max_size=6),
    key=_keys,
    ahead=st.floats(min_value=-3000, max_value=300 * 86_400),
    zone=_offsets,
)
def test_what_the_client_builds_decodes_to_the_same_event(
    type_: str, payload: dict[str, Any], key: str | None, ahead: float, zone: timezone
) -> None:
    at = (datetime.now(UTC) + timedelta(seconds=ahead)).astimezone(zone)
    message = event_message(type_, payload, at=at, delay=None, key=key, limits=LIMITS)
    event = decode_event(
        message.value, now=datetime.now(UTC), limits=LIMITS, headers=dict(message.headers)
    )
    assert event.id == message.id
    assert event.type == type_
    assert event.payload == payload
    assert event.idempotency_key == (key if key is not None else str(message.id))
    assert message.key == event.idempotency_key.encode()
    # Rounded up to the millisecond: a due time is never early.
    assert event.execute_at == at.astimezone(UTC) + timedelta(microseconds=-at.microsecond % 1000)
    assert message.headers == tuple(kafka_headers())


def test_delay_and_now() -> None:
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    soon = event_message("t", {}, at=None, delay=30, key=None, limits=LIMITS)
    now = event_message("t", {}, at=None, delay=None, key="k", limits=LIMITS)
    td = event_message("t", {}, at=None, delay=timedelta(hours=1), key=None, limits=LIMITS)
    after = datetime.now(UTC) + timedelta(milliseconds=1)  # due times are rounded up
    due = {
        name: msgspec.json.decode(m.value)["execute_at"]
        for name, m in (("soon", soon), ("now", now), ("td", td))
    }
    parsed = {name: datetime.fromisoformat(text) for name, text in due.items()}
    assert before + timedelta(seconds=30) <= parsed["soon"] <= after + timedelta(seconds=30)
    assert before <= parsed["now"] <= after
    assert before + timedelta(hours=1) <= parsed["td"] <= after + timedelta(hours=1)


@pytest.mark.parametrize(
    ("kwargs", "limits", "match"),
    [
        ({"type": ""}, LIMITS, "invalid_type"),
        ({"type": "a\nb"}, LIMITS, "invalid_type"),
        ({"key": ""}, LIMITS, "invalid_key"),
        ({"key": "k" * 513}, LIMITS, "invalid_key"),
        ({"at": datetime(2030, 1, 1)}, LIMITS, "naive"),
        ({"at": datetime.now(UTC), "delay": 5}, LIMITS, "not both"),
        ({"delay": -1}, LIMITS, "non-negative"),
        ({"delay": float("nan")}, LIMITS, "non-negative"),
        ({"delay": 400 * 86_400}, LIMITS, "beyond_horizon"),
        ({"delay": 1e30}, LIMITS, "beyond_horizon"),
        ({"at": datetime.now(UTC) - timedelta(days=2)}, LIMITS, "too_old"),
        ({"payload": {"x": "y" * 2000}}, DecodeLimits(max_message_bytes=1000), "too_large"),
        ({"payload": {"a": {"b": {"c": {}}}}}, DecodeLimits(max_payload_depth=3), "too_deep"),
        ({"payload": {"a": float("nan")}}, LIMITS, "NaN"),
        ({"payload": {"a": "\x00"}}, LIMITS, "NUL"),
        ({"payload": {"a": {1, 2}}}, LIMITS, "not a JSON value"),
        ({"payload": [1]}, LIMITS, "must be a dict"),
    ],
)
def test_what_the_consumer_would_refuse_raises_value_error(
    kwargs: dict[str, Any], limits: DecodeLimits, match: str
) -> None:
    args: dict[str, Any] = {"type": "t", "payload": {}, "at": None, "delay": None, "key": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        event_message(args.pop("type"), args.pop("payload"), limits=limits, **args)


def test_wrong_argument_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="type must be a str"):
        event_message(1, {}, at=None, delay=None, key=None, limits=LIMITS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="delay"):
        event_message("t", {}, at=None, delay=True, key=None, limits=LIMITS)
    with pytest.raises(TypeError, match="key_or_id"):
        command_message("cancel", 7, execute_at=None, requested_by="", limits=LIMITS)  # type: ignore[arg-type]


def test_a_batch_names_its_first_bad_item() -> None:
    good = {"type": "t", "payload": {}}
    with pytest.raises(ValueError, match="item 2: invalid_type"):
        event_messages([good, good, {"type": "", "payload": {}}], LIMITS)
    with pytest.raises(ValueError, match="item 0: unknown field"):
        event_messages([{"type": "t", "payload": {}, "when": 5}], LIMITS)  # type: ignore[list-item]
    ready = eventsched.new_event("t", {"n": 1}, datetime.now(UTC), idempotency_key="k")
    (message,) = event_messages([ready], LIMITS)
    assert (message.id, message.key) == (ready.id, b"k")


def test_a_str_target_is_a_key_even_when_it_looks_like_a_uuid() -> None:
    text = str(uuid.uuid4())
    by_key = command_message("cancel", text, execute_at=None, requested_by="me", limits=LIMITS)
    by_id = command_message(
        "cancel", uuid.UUID(text), execute_at=None, requested_by="me", limits=LIMITS
    )
    now = datetime.now(UTC)
    key_cmd = parse_command(by_key.value, now=now, limits=LIMITS)
    id_cmd = parse_command(by_id.value, now=now, limits=LIMITS)
    assert (key_cmd.idempotency_key, key_cmd.event_id) == (text, None)
    assert (id_cmd.idempotency_key, id_cmd.event_id) == (None, uuid.UUID(text))
    assert by_key.key == by_id.key == text.encode()
    assert by_key.headers == tuple(command_headers())
    assert key_cmd.command_id == by_key.id and key_cmd.requested_by == "me"


def test_commands_are_checked_with_the_limits() -> None:
    far = datetime.now(UTC) + timedelta(days=400)
    with pytest.raises(ValueError, match="beyond_horizon"):
        command_message("reschedule", "k", execute_at=far, requested_by="", limits=LIMITS)
    with pytest.raises(ValueError, match="missing_field"):
        command_message("reschedule", "k", execute_at=None, requested_by="", limits=LIMITS)
    with pytest.raises(ValueError, match="invalid_key"):
        command_message("cancel", "", execute_at=None, requested_by="", limits=LIMITS)


def test_the_client_refuses_before_sending_and_checks_its_own_arguments() -> None:
    with Client(NOWHERE, "t", timeout=1) as client:
        with pytest.raises(ValueError, match="reschedule needs at or delay"):
            client.reschedule("k")
        with pytest.raises(ValueError, match="invalid_type"):
            client.schedule("", {})
        assert client.schedule_many([]) == []
    assert client.closed
    with pytest.raises(ClientError, match="closed"):
        client.schedule("t", {})
    client.close()  # twice is fine
    for bad in ({"timeout": 0}, {"timeout": float("inf")}, {"requested_by": "x" * 201}):
        with pytest.raises(ValueError):
            Client(NOWHERE, **bad)
    with pytest.raises(ValueError, match="bootstrap"):
        Client("")
    with pytest.raises(ClientError, match="invalid Kafka configuration"):
        Client(NOWHERE, kafka_config={"no.such.property": 1})


def test_from_settings_takes_topic_limits_and_the_client_layer() -> None:
    settings = build_settings(
        {
            "kafka": {"bootstrap_servers": NOWHERE, "topic": "mine", "client": {"linger.ms": 0}},
            "consumer": {"max_message_bytes": 5000, "horizon": "2d", "max_past": "1h"},
        },
        "test",
    )
    with Client.from_settings(settings, requested_by="billing") as client:
        assert client.topic == "mine"
        assert client.limits == DecodeLimits(max_message_bytes=5000, horizon=2 * 86_400.0,
                                             max_past=3600.0)  # fmt: skip
        assert client.requested_by == "billing"
        with pytest.raises(ValueError, match="beyond_horizon"):
            client.schedule("t", {}, delay=timedelta(days=3))
        assert "mine" in repr(client)
    with pytest.raises(ConfigError):
        Client.from_settings(build_settings({}, "test"))


def test_from_env_reads_settings_like_the_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text("[default.consumer]\nmax_payload_depth = 7\n")
    monkeypatch.setenv("EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS", NOWHERE)
    monkeypatch.setenv("EVENTSCHED_KAFKA__TOPIC", "from-env")
    client = Client.from_env(extra, timeout=2)
    try:
        assert (client.topic, client.limits.max_payload_depth, client.timeout) == ("from-env", 7, 2)
    finally:
        client.close()


def test_delivery_errors_name_the_failed_and_hide_secrets() -> None:
    ids = [uuid.uuid4() for _ in range(7)]
    err = DeliveryError("cannot reach https://user:hunter2@broker/x", ids, [uuid.uuid4()])
    text = str(err)
    assert "hunter2" not in text
    assert "7 of 8 message(s)" in text and str(ids[0]) in text and "and 2 more" in text
    assert err.failed == tuple(ids) and len(err.acknowledged) == 1
    assert isinstance(err, ClientError) and isinstance(err, EventschedError)
