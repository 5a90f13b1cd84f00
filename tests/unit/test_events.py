"""The event wire format: encoding, decoding, validation limits, UUIDv7 ids and DLQ headers."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventsched.core.domain.deadletter import DLQ_HEADER_NAMES, dlq_headers
from eventsched.core.domain.decode import DECODE_REASONS, DecodeLimits, decode_event
from eventsched.core.domain.event import Event, UUID7Generator, format_time, parse_time, uuid7
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.runtime.errors import DecodeError
from eventsched.core.runtime.sections import ConsumerSettings

NOW = datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
LIMITS = DecodeLimits()
HEADERS = dict(kafka_headers())
EVENT_ID = "0190a4b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b"


def message(**fields: Any) -> dict[str, Any]:
    """A valid v1 message as a dict; ``field=...`` removes a field."""
    base: dict[str, Any] = {
        "id": EVENT_ID,
        "idempotency_key": "order-1001",
        "type": "order.placed",
        "payload": {"order_id": 1001, "amount": 12.5},
        "execute_at": "2024-05-01T13:00:00.000Z",
        "created_at": "2024-05-01T11:59:59.000Z",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decode(value: bytes | None, now: datetime = NOW, limits: DecodeLimits = LIMITS) -> Event:
    return decode_event(value, now=now, limits=limits, headers=HEADERS)


def reason_of(value: bytes | None, now: datetime = NOW, limits: DecodeLimits = LIMITS) -> str:
    with pytest.raises(DecodeError) as info:
        decode(value, now, limits)
    return info.value.reason


# --- encoding and round trips ----------------------------------------------------------


def test_encode_event_writes_compact_v1_json_with_utc_milliseconds() -> None:
    event = Event(
        id=uuid.UUID(EVENT_ID),
        idempotency_key="order-1001",
        type="order.placed",
        payload={"amount": 12.5, "note": "caf\u00e9"},
        execute_at=datetime(2024, 5, 1, 15, 0, 0, 123_000, tzinfo=timezone(timedelta(hours=2))),
        created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )
    assert encode_event(event) == (
        b'{"id":"0190a4b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b","idempotency_key":"order-1001",'
        b'"type":"order.placed","payload":{"amount":12.5,"note":"caf\xc3\xa9"},'
        b'"execute_at":"2024-05-01T13:00:00.123Z","created_at":"2024-05-01T12:00:00.000Z"}'
    )


def test_new_event_round_trips_through_encode_and_decode() -> None:
    due = datetime.now(UTC) + timedelta(hours=1)
    event = new_event("order.placed", {"items": [{"sku": "A1", "qty": 2}], "total": 9.99}, due)
    assert event.idempotency_key == str(event.id)
    assert decode(encode_event(event), now=event.created_at) == event


def test_kafka_key_and_headers() -> None:
    event = new_event("t", {}, NOW, idempotency_key="order-1001", now=NOW)
    assert kafka_key(event) == b"order-1001"
    assert kafka_headers() == [("content-type", b"application/json"), ("schema-version", b"1")]


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
)
json_objects = st.dictionaries(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8),
    st.recursive(
        json_scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=12,
    ),
    max_size=6,
)


# 50 examples a run: each costs ~10 ms (nested payloads, long keys) in a tier that must stay
# under 15 s; the examples are drawn anew each run, so runs add up.
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    type_=st.text(st.characters(categories=("L", "N", "P")), min_size=1, max_size=200),
    payload=json_objects,
    delay_ms=st.integers(min_value=0, max_value=365 * 86_400_000),
    key=st.none() | st.text(min_size=1, max_size=512).filter(lambda k: "\x00" not in k),
)
def test_any_valid_event_round_trips(
    type_: str, payload: dict[str, Any], delay_ms: int, key: str | None
) -> None:
    try:
        event = new_event(
            type_, payload, NOW + timedelta(milliseconds=delay_ms), idempotency_key=key, now=NOW
        )
    except ValueError:
        return  # new_event refuses what the consumer would (e.g. lone surrogates in the key)
    encoded = encode_event(event)
    assert decode(encoded) == event
    # The stdlib fallback parser (taken for pretty-printed input) agrees with the fast path.
    assert decode(json.dumps(json.loads(encoded), indent=2).encode()) == event


# --- the Go original's shape ------------------------------------------------------------


def go_message(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ID": "6f1c2d3e-4b5a-4c6d-9e8f-0a1b2c3d4e5f",
        "IdempotencyKey": "",
        "Type": "user.created",
        "Payload": {"user_id": 42},
        "Status": "pending",
        "RetryCount": 3,
        "LastError": "timeout: upstream",
        "NextRunAt": "2024-05-01T15:30:00.123456789+02:00",
        "CreatedAt": "2024-05-01T11:00:00.000000001Z",
        "UpdatedAt": "2024-05-01T11:00:01Z",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def test_go_shape_maps_to_an_event() -> None:
    event = decode_event(compact(go_message()), now=NOW, limits=LIMITS)  # Go sends no headers
    assert event == Event(
        id=uuid.UUID("6f1c2d3e-4b5a-4c6d-9e8f-0a1b2c3d4e5f"),
        idempotency_key="6f1c2d3e-4b5a-4c6d-9e8f-0a1b2c3d4e5f",  # "" is Go's "not set"
        type="user.created",
        payload={"user_id": 42},
        execute_at=datetime(2024, 5, 1, 13, 30, 0, 124_000, tzinfo=UTC),  # due: rounded up
        created_at=datetime(2024, 5, 1, 11, 0, tzinfo=UTC),  # a record: truncated
        late=False,
        shape="go",
    )


def test_go_shape_keeps_its_idempotency_key_and_accepts_a_base64_payload() -> None:
    payload = base64.b64encode(b'{"user_id":42,"tags":["a"]}').decode()
    event = decode(compact(go_message(IdempotencyKey="user-42", Payload=payload)))
    assert (event.idempotency_key, event.payload) == ("user-42", {"user_id": 42, "tags": ["a"]})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (base64.b64encode(b"[1]").decode(), "invalid_payload"),
        (base64.b64encode(b"not json").decode(), "invalid_payload"),
        ("", "invalid_payload"),
        ("not base64!", "invalid_payload"),
        (base64.b64encode(b'{"a":1,"a":2}').decode(), "duplicate_key"),
        (base64.b64encode(b'{"a":' * 40 + b"1" + b"}" * 40).decode(), "too_deep"),
        (None, "invalid_payload"),
    ],
)
def test_go_payload_must_be_an_object_or_base64_of_one(payload: Any, reason: str) -> None:
    assert reason_of(compact(go_message(Payload=payload))) == reason


# --- identifiers -------------------------------------------------------------------------


def test_uuid7_layout_follows_rfc_9562() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after


def test_uuid7_ids_sort_in_creation_order() -> None:
    ids = [uuid7() for _ in range(2000)]  # many share a millisecond: the counter orders them
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert [str(i) for i in ids] == sorted(str(i) for i in ids)  # as text too (PG, logs)


def test_uuid7_generator_is_monotonic_when_the_clock_stalls_or_goes_back() -> None:
    gen = UUID7Generator()
    ms = 1_714_564_800_000
    ids = [gen.next(ms) for _ in range(100)] + [gen.next(ms - 5)]
    assert ids == sorted(ids)
    assert {i.int >> 80 for i in ids} == {ms}


def test_uuid7_generator_borrows_the_next_millisecond_when_the_counter_overflows() -> None:
    gen = UUID7Generator()
    ms = 1_714_564_800_000
    first = gen.next(ms)
    gen._counter = 0x3FF_FFFF_FFFF  # as if 2**42 ids had been made in this millisecond
    second = gen.next(ms)
    assert second > first
    assert second.int >> 80 == ms + 1


def test_uuid7_with_an_explicit_time_leaves_the_process_order_alone() -> None:
    future = uuid7(unix_ms=(2**48) - 1)
    assert future.int >> 80 == 2**48 - 1
    assert uuid7().int >> 80 <= time.time_ns() // 1_000_000


def test_new_event_id_carries_the_creation_time() -> None:
    event = new_event("t", {}, NOW, now=NOW)
    assert event.created_at == NOW
    assert event.id.version == 7
    assert event.id.int >> 80 == int(NOW.timestamp() * 1000)


@pytest.mark.parametrize(
    "text",
    [
        "6f1c2d3e-4b5a-4c6d-9e8f-0a1b2c3d4e5f",  # v4, as the Go original makes them
        "c232ab00-9414-11ec-b3c8-9f6bdeced846",  # v1
        "6F1C2D3E-4B5A-4C6D-9E8F-0A1B2C3D4E5F",  # upper case
        "6f1c2d3e4b5a4c6d9e8f0a1b2c3d4e5f",  # no hyphens
    ],
)
def test_any_rfc_4122_uuid_is_accepted_as_id(text: str) -> None:
    event = decode(compact(message(id=text, idempotency_key=...)))
    assert event.id == uuid.UUID(text)
    assert event.idempotency_key == str(uuid.UUID(text))  # canonical form


@pytest.mark.parametrize(
    "text",
    [
        "00000000-0000-0000-0000-000000000000",  # nil
        "ffffffff-ffff-ffff-ffff-ffffffffffff",  # max
        "6f1c2d3e-4b5a-0c6d-9e8f-0a1b2c3d4e5f",  # version 0
        "6f1c2d3e-4b5a-4c6d-1e8f-0a1b2c3d4e5f",  # NCS variant
        "6f1c2d3e4b5a0c6d9e8f0a1b2c3d4e5f",  # version 0, no hyphens
        "urn:uuid:6f1c2d3e-4b5a-4c6d-9e8f-0a1b2c3d4e5f",
        "6f1c2d3e-4b5a-4c6d-9e8f-0a1b2c3d4e5",
    ],
)
def test_non_rfc_uuids_are_rejected(text: str) -> None:
    assert reason_of(compact(message(id=text))) == "invalid_id"


# --- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123Z", datetime(2024, 5, 1, 12, 0, 0, 123_000, tzinfo=UTC)),
        ("2024-05-01T14:00:00.5+02:00", datetime(2024, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
        ("2024-05-01T06:30:00-05:30", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01t12:00:00z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01 12:00:00+00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123_457, tzinfo=UTC)),
        ("2024-05-01T00:30:00+23:59", datetime(2024, 4, 30, 0, 31, tzinfo=UTC)),
    ],
)
def test_parse_time_normalises_to_utc(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T12:00:00",
        "2024-05-01",
        "2024-05-01T12:00Z",
        "20240501T120000Z",
        "2024-05-01T24:00:00Z",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
        "",
    ],
)
def test_parse_time_rejects_what_rfc_3339_does_not_allow(text: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_time(text)
    assert info.value.reason == "invalid_timestamp"


def test_format_time_writes_utc_milliseconds_with_z() -> None:
    berlin = timezone(timedelta(hours=2))
    assert format_time(datetime(2024, 5, 1, 14, 0, 0, 123_999, tzinfo=berlin)) == (
        "2024-05-01T12:00:00.123Z"
    )
    assert format_time(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000Z"
    with pytest.raises(ValueError, match="no UTC offset"):
        format_time(datetime(2024, 5, 1))


def test_decoded_timestamps_are_utc_milliseconds_due_times_rounded_up() -> None:
    # A due time is never rounded down (the job would start before the instant asked for);
    # created_at is a record and is truncated.
    event = decode(
        compact(
            message(
                execute_at="2024-05-01T18:00:00.987654+05:30",
                created_at="2024-05-01T11:59:59.000999Z",
            )
        )
    )
    assert event.execute_at == datetime(2024, 5, 1, 12, 30, 0, 988_000, tzinfo=UTC)
    assert event.created_at == datetime(2024, 5, 1, 11, 59, 59, tzinfo=UTC)
    exact = decode(compact(message(execute_at="2024-05-01T12:30:00.987Z")))
    assert exact.execute_at == datetime(2024, 5, 1, 12, 30, 0, 987_000, tzinfo=UTC)
    last = compact(message(execute_at="9999-12-31T23:59:59.9995Z"))
    with pytest.raises(DecodeError, match="out of range"):
        decode_event(last, now=NOW, limits=DecodeLimits(max_past=1e12, horizon=1e12))
    assert event.execute_at.tzinfo is UTC and event.created_at.tzinfo is UTC


# --- limits -------------------------------------------------------------------------------


def test_lateness_window_boundaries() -> None:
    limits = DecodeLimits(max_past=3600, horizon=86_400)
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    ms = timedelta(milliseconds=1)

    def at(when: datetime) -> bytes:
        return compact(message(execute_at=format_time(when)))

    assert decode(at(now), now, limits).late is False
    assert decode(at(now - ms), now, limits).late is True
    assert decode(at(now - timedelta(hours=1)), now, limits).late is True
    assert reason_of(at(now - timedelta(hours=1) - ms), now, limits) == "too_old"
    assert decode(at(now + timedelta(days=1)), now, limits).late is False
    assert reason_of(at(now + timedelta(days=1) + ms), now, limits) == "beyond_horizon"


def test_unbounded_limits_do_not_overflow() -> None:
    limits = DecodeLimits(max_past=1e15, horizon=1e15)
    assert decode(compact(message(execute_at="0001-01-01T00:00:00Z")), limits=limits).late
    assert not decode(compact(message(execute_at="9999-12-31T23:59:59Z")), limits=limits).late


def test_message_size_limit_is_inclusive() -> None:
    value = compact(message())
    assert decode(value, limits=DecodeLimits(max_message_bytes=len(value)))
    assert reason_of(value, limits=DecodeLimits(max_message_bytes=len(value) - 1)) == "too_large"


@pytest.mark.parametrize("pretty", [False, True], ids=["fast-path", "fallback"])
def test_payload_depth_limit_is_inclusive(pretty: bool) -> None:
    def nested(depth: int) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        for _ in range(depth - 1):
            payload = {"a": payload}
        return payload

    def encoded(depth: int) -> bytes:
        obj = message(payload=nested(depth))
        return json.dumps(obj, indent=1).encode() if pretty else compact(obj)

    limits = DecodeLimits(max_payload_depth=5)
    assert decode(encoded(5), limits=limits)
    assert reason_of(encoded(6), limits=limits) == "too_deep"
    # Lists count as levels too; brackets inside strings do not.
    deep_list = compact(message(payload={"a": [[[[[1]]]]]}))
    assert reason_of(deep_list, limits=limits) == "too_deep"
    brackets = compact(message(payload={"text": "[[[[[[[[{{{{{{{{"}))
    assert decode(brackets, limits=limits).payload == {"text": "[[[[[[[[{{{{{{{{"}


def test_decode_limits_come_from_consumer_settings() -> None:
    assert DecodeLimits.from_settings(ConsumerSettings()) == DecodeLimits()
    with pytest.raises(ValueError):
        DecodeLimits(max_payload_depth=0)
    with pytest.raises(ValueError):
        DecodeLimits(horizon=math.inf)


# --- field rules ---------------------------------------------------------------------------


def test_idempotency_key_defaults_to_the_id_when_absent_or_null() -> None:
    assert decode(compact(message(idempotency_key=...))).idempotency_key == EVENT_ID
    assert decode(compact(message(idempotency_key=None))).idempotency_key == EVENT_ID


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"type": " "}, "invalid_type"),
        ({"type": "a\tb"}, "invalid_type"),
        ({"type": "t" * 200}, None),
        ({"type": "bestellung.eingegangen.\u00e4"}, None),
        ({"idempotency_key": "k" * 512}, None),
        ({"idempotency_key": "k\x00"}, "invalid_key"),
        ({"idempotency_key": "line\nbreak"}, None),
        ({"payload": {}}, None),
        ({"payload": {"big": 10**100, "neg": -(10**30), "small": 5e-324}}, None),
    ],
)
def test_field_rules(fields: dict[str, Any], reason: str | None) -> None:
    value = compact(message(**fields))
    if reason is None:
        assert decode(value)
    else:
        assert reason_of(value) == reason


def test_unknown_fields_and_a_missing_schema_header_are_accepted() -> None:
    value = compact(message(trace_id="abc", retries=[1, 2]))
    assert decode_event(value, now=NOW, limits=LIMITS).type == "order.placed"
    assert decode_event(value, now=NOW, limits=LIMITS, headers={"schema-version": None})


@pytest.mark.parametrize("version", [b"2", b"", b"1.0", b"v1"])
def test_other_schema_versions_are_rejected(version: bytes) -> None:
    value = compact(message())
    with pytest.raises(DecodeError) as info:
        decode_event(value, now=NOW, limits=LIMITS, headers={"schema-version": version})
    assert info.value.reason == "unsupported_schema"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"a":1,"a":1}', None),  # identical duplicates are harmless
        (b'{"a":1,"a":2}', "duplicate_key"),
        (b'{"a":1,"a":1.0}', "duplicate_key"),  # equal in Python, different JSON
        (b'{"a":1,"a":true}', "duplicate_key"),
        (b'{"a":{"b":[1,{"c":1,"c":[]}]}}', "duplicate_key"),
        (b'{"a":{"x":1,"y":2},"a":{"y":2,"x":1}}', None),
    ],
)
def test_duplicate_keys_in_the_payload(text: bytes, reason: str | None) -> None:
    value = compact(message(payload="@")).replace(b'"@"', text)
    if reason is None:
        assert decode(value)
    else:
        assert reason_of(value) == reason


def test_duplicate_keys_at_the_top_level_count_even_in_ignored_fields() -> None:
    value = compact(message())[:-1] + b',"trace":"a","trace":"b"}'
    assert reason_of(value) == "duplicate_key"


def test_decode_requires_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decode_event(compact(message()), now=datetime(2024, 5, 1), limits=LIMITS)


def test_decoded_events_are_real_frozen_events() -> None:
    event = decode(compact(message()))
    assert type(event) is Event
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.late = True  # type: ignore[misc]
    assert dataclasses.replace(event, late=True).late is True
    assert event == Event(**{f.name: getattr(event, f.name) for f in dataclasses.fields(Event)})


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"x": math.nan}, "NaN"),
        ({"x": [math.inf]}, "NaN"),
        ({"x": "a\x00"}, "NUL"),
        ({"x\x00": 1}, "NUL"),
        ({"x": {1, 2}}, "set"),
        ({1: "x"}, "keys must be str"),
        ([1], "must be a dict"),
    ],
)
def test_new_event_refuses_payloads_the_consumer_would_not_store(
    payload: Any, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        new_event("t", payload, NOW)


def test_new_event_refuses_bad_types_keys_and_naive_times() -> None:
    with pytest.raises(ValueError, match="invalid_type"):
        new_event("", {}, NOW)
    with pytest.raises(ValueError, match="invalid_key"):
        new_event("t", {}, NOW, idempotency_key="")
    with pytest.raises(ValueError, match="no UTC offset"):
        new_event("t", {}, datetime(2024, 5, 1))


# --- DLQ headers ------------------------------------------------------------------------------


def test_dlq_headers_keep_the_original_headers_and_add_ours() -> None:
    headers = dlq_headers(
        reason="invalid_json",
        error="Expecting value (offset 0)",
        source_topic="events",
        source_partition=2,
        source_offset=41,
        source_timestamp_ms=1_714_564_800_000,
        consumer_id="consumer-1",
        failed_at=NOW,
        original=[("content-type", b"application/json"), ("trace", None)],
    )
    assert headers == [
        ("content-type", b"application/json"),
        ("trace", None),
        ("dlq-reason", b"invalid_json"),
        ("dlq-error", b"Expecting value (offset 0)"),
        ("source-topic", b"events"),
        ("source-partition", b"2"),
        ("source-offset", b"41"),
        ("source-timestamp", b"1714564800000"),
        ("consumer-id", b"consumer-1"),
        ("failed-at", b"2024-05-01T12:00:00.250Z"),
    ]


def test_dlq_headers_are_ascii_bounded_and_replace_an_earlier_failure() -> None:
    headers = dlq_headers(
        reason="too_old",
        error="line one\nline two \u00e9 " * 500,
        source_topic="events",
        source_partition=0,
        source_offset=7,
        source_timestamp_ms=-1,  # librdkafka: no timestamp
        consumer_id="c\u00e9",
        failed_at=NOW,
        original=[("dlq-reason", b"invalid_json"), ("x", b"\xff")],
    )
    names = [name for name, _ in headers]
    assert names.count("dlq-reason") == 1
    assert "source-timestamp" not in names
    assert ("x", b"\xff") in headers  # original values untouched
    ours = {name: value for name, value in headers if name in DLQ_HEADER_NAMES}
    assert ours["dlq-reason"] == b"too_old"
    error = ours["dlq-error"]
    assert error is not None and len(error) <= 1024 and error.endswith(b"...")
    assert b"\n" not in error and error.startswith(b"line one line two \\xe9")
    assert ours["consumer-id"] == b"c\\xe9"
    assert all(v is not None and v.isascii() for v in ours.values())


# --- robustness -------------------------------------------------------------------------------


def test_decode_reasons_are_unique_snake_case_codes() -> None:
    assert len(set(DECODE_REASONS)) == len(DECODE_REASONS)
    assert all(r.replace("_", "").isalnum() and r.islower() for r in DECODE_REASONS)


def check_only_decode_errors(value: bytes, now: datetime = NOW) -> None:
    """The decoder's contract: an Event that keeps every invariant, or a known DecodeError."""
    try:
        event = decode_event(value, now=now, limits=SMALL_LIMITS)
    except DecodeError as err:
        assert err.reason in DECODE_REASONS
        assert "\n" not in err.detail and len(err.detail) <= 200
        return
    assert type(event) is Event
    assert event.execute_at.tzinfo is UTC and event.created_at.tzinfo is UTC
    assert event.execute_at.microsecond % 1000 == 0 == event.created_at.microsecond % 1000
    assert now - timedelta(seconds=SMALL_LIMITS.max_past) <= event.execute_at
    assert event.execute_at <= now + timedelta(seconds=SMALL_LIMITS.horizon)
    assert event.late == (event.execute_at < now)
    assert 1 <= len(event.type) <= 200 and event.type.isprintable()
    assert 1 <= len(event.idempotency_key) <= 512 and "\x00" not in event.idempotency_key
    assert event.id.variant == uuid.RFC_4122
    assert type(event.payload) is dict
    assert depth(event.payload) <= SMALL_LIMITS.max_payload_depth
    msgspec.json.encode(event.payload)  # storable: valid UTF-8 throughout
    for leaf in leaves(event.payload):
        assert not isinstance(leaf, float) or math.isfinite(leaf)
        assert not isinstance(leaf, str) or "\x00" not in leaf


SMALL_LIMITS = DecodeLimits(
    max_message_bytes=4096, max_payload_depth=4, max_past=3600, horizon=86400
)


def leaves(value: Any) -> Iterator[Any]:
    """Every key and scalar in a JSON value."""
    if isinstance(value, dict):
        yield from value
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    else:
        yield value


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_errors(value: bytes) -> None:
    check_only_decode_errors(value)


any_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and Infinity included: json.dumps writes them
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=15,
)
offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
near_now = st.builds(
    lambda delta, tz: (NOW + timedelta(seconds=delta)).astimezone(tz).isoformat(),
    st.floats(min_value=-2 * 3600, max_value=2 * 86400),  # around the lateness window
    offsets,
)
any_time = st.datetimes(timezones=st.just(UTC) | offsets | st.none()).map(datetime.isoformat)
payloads = st.dictionaries(st.text(max_size=5), any_json, max_size=4)
valid = {
    "id": st.uuids(version=4).map(str) | st.builds(lambda: str(uuid7())),
    "key": st.none() | st.text(min_size=1, max_size=20),
    "type": st.text(st.characters(categories=("L", "N", "P")), min_size=1, max_size=20),
    "payload": payloads,
    "go_payload": payloads | payloads.map(lambda p: base64.b64encode(compact(p)).decode()),
    "time": near_now,
}
junk = {
    "id": st.uuids().map(str) | st.text(max_size=40) | any_json,
    "key": st.text(max_size=600) | any_json,
    "type": st.text(max_size=300) | any_json,
    "payload": any_json,
    "go_payload": st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()) | any_json,
    "time": any_time | st.text(max_size=30) | any_json,
}
V1_FIELDS = {
    "id": "id",
    "idempotency_key": "key",
    "type": "type",
    "payload": "payload",
    "execute_at": "time",
    "created_at": "time",
}
GO_FIELDS = {
    "ID": "id",
    "IdempotencyKey": "key",
    "Type": "type",
    "Payload": "go_payload",
    "NextRunAt": "time",
    "CreatedAt": "time",
}


@st.composite
def near_valid_messages(draw: st.DrawFn) -> bytes:
    """Mostly valid messages of either shape: each field is sometimes dropped or junk, some
    fields are duplicated or come from the other shape, and some messages are corrupted."""
    shape = draw(st.sampled_from([V1_FIELDS, GO_FIELDS]))
    pairs: list[tuple[str, Any]] = []
    for name, kind in shape.items():
        roll = draw(st.integers(0, 19))  # hypothesis shrinks towards 0: valid
        if roll == 19:
            continue  # missing
        pairs.append((name, draw(junk[kind] if roll == 18 else valid[kind])))
    for name in draw(st.lists(st.sampled_from([*V1_FIELDS, *GO_FIELDS, "Status"]), max_size=2)):
        kind = V1_FIELDS.get(name) or GO_FIELDS.get(name) or "payload"
        pairs.append((name, draw(valid[kind] | junk[kind])))  # duplicate, stray or extra
    body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs)  # keeps duplicates
    value = ("{" + body + "}").encode()
    if draw(st.integers(0, 9)) == 9:  # corrupt: truncate, or overwrite one byte
        cut = draw(st.integers(0, len(value) - 1))
        if draw(st.booleans()):
            return value[:cut]
        return value[:cut] + bytes([draw(st.integers(0, 255))]) + value[cut + 1 :]
    return value


# 150 examples a run (~4 ms each), drawn anew each run; the random bytes above are ~0.3 ms.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_messages())
def test_near_valid_messages_raise_only_decode_errors(value: bytes) -> None:
    check_only_decode_errors(value)
