"""``eventsched send``: build one event from the command line, check it as the consumer
would, publish it (blocking producer, on the calling thread)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Producer

from eventsched.core.domain.decode import DecodeLimits, decode_event
from eventsched.core.domain.event import Event, parse_time
from eventsched.core.domain.wire import encode_event, kafka_headers, kafka_key, new_event
from eventsched.core.kafka import ClientKind, config_from_settings
from eventsched.core.operations.oneshot import new_client
from eventsched.core.runtime import tracing
from eventsched.core.runtime.errors import DecodeError, DependencyError, EventschedError
from eventsched.core.runtime.settings import Settings
from eventsched.core.runtime.units import parse_duration


class InputError(EventschedError):
    """A command-line value is unusable; the CLI prints one line and exits 2."""

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"{option}: {problem}")


def build_event(
    settings: Settings,
    *,
    type_: str,
    at: str | None,
    in_: str | None,
    payload: str | None,
    key: str | None,
    now: datetime | None = None,
) -> Event:
    """The event ``eventsched send`` publishes; InputError names the bad option."""
    if (at is None) == (in_ is None):
        raise InputError("--at/--in", "give exactly one of --at TIME or --in DURATION")
    now = now or datetime.now(UTC)
    if at is not None:
        try:
            due = parse_time(at)
        except DecodeError:
            raise InputError(
                "--at", f"{at!r} is not an RFC 3339 time with an offset (2030-01-31T09:00:00Z)"
            ) from None
    else:
        assert in_ is not None
        try:
            due = now + timedelta(seconds=parse_duration(in_))
        except ValueError as err:
            raise InputError("--in", str(err)) from None
    data: Any = {}
    if payload is not None:
        data = _parse_payload(payload)
    limits = settings.consumer
    if due > now + timedelta(seconds=limits.horizon):
        raise InputError(
            "--at/--in", f"more than consumer.horizon ({_human(limits.horizon)}) ahead"
        )
    if due < now - timedelta(seconds=limits.max_past):
        raise InputError("--at", f"more than consumer.max_past ({_human(limits.max_past)}) ago")
    try:
        event = new_event(type_, data, due, idempotency_key=key)
    except ValueError as err:
        text = str(err)
        option = (
            "--key"
            if "idempotency" in text
            else "--payload"
            if text.startswith("payload")
            else "--type"
        )
        raise InputError(option, text) from None
    _check_as_consumer(event, DecodeLimits.from_settings(limits), now)
    return event


def _parse_payload(payload: str) -> Any:
    """The ``--payload`` JSON object; every parser failure is an InputError."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as err:
        raise InputError("--payload", f"not valid JSON ({err.msg} at {err.pos})") from None
    except RecursionError:
        raise InputError("--payload", "not valid JSON (nested too deeply to parse)") from None
    except ValueError as err:  # an integer beyond the int-string conversion limit
        detail = str(err).split(";")[0]
        raise InputError("--payload", f"not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise InputError("--payload", "must be a JSON object ({...})")
    return data


#: The option to blame for each reason the consumer's decoder can give.
_OPTION_OF_REASON: Final = {
    "invalid_type": "--type",
    "invalid_key": "--key",
    "too_old": "--at/--in",
    "beyond_horizon": "--at/--in",
    "invalid_timestamp": "--at/--in",
}


def _check_as_consumer(event: Event, limits: DecodeLimits, now: datetime) -> None:
    """Decode the bytes ``send`` would publish with the consumer's own decoder and limits
    (depth, size, number range, ...), so that nothing ``send`` accepts is dead-lettered;
    InputError names the option to blame."""
    value = encode_event(event)
    try:
        decode_event(value, now=now, limits=limits, headers=dict(kafka_headers()))
    except DecodeError as err:
        if err.reason == "too_large":
            raise InputError(
                "--payload",
                f"the event is {len(value)} bytes encoded, more than "
                f"consumer.max_message_bytes ({limits.max_message_bytes})",
            ) from None
        option = _OPTION_OF_REASON.get(err.reason, "--payload")
        raise InputError(option, err.detail) from None


def _human(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def send_event(settings: Settings, event: Event, *, timeout: float = 15.0) -> tuple[int, int]:
    """Publish ``event`` (idempotent producer, acks=all); returns (partition, offset)."""
    config = config_from_settings(
        settings, ClientKind.PRODUCER, own={"message.timeout.ms": int(timeout * 1000)}
    )
    producer = new_client(Producer, config)
    with tracing.span(
        f"publish {settings.kafka.topic}",
        kind="producer",
        attributes={"eventsched.event.id": str(event.id), "eventsched.event.type": event.type},
    ):
        traced = tracing.with_traceparent(kafka_headers(), tracing.current_traceparent())
        return _send(settings, producer, event, [*traced], timeout)


def _send(
    settings: Settings,
    producer: Producer,
    event: Event,
    headers: list[tuple[str, str | bytes | None]],
    timeout: float,
) -> tuple[int, int]:
    outcome: dict[str, Any] = {}

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        outcome["error"] = err
        outcome["where"] = (msg.partition(), msg.offset())

    try:
        producer.produce(
            settings.kafka.topic,
            value=encode_event(event),
            key=kafka_key(event),
            headers=headers,
            on_delivery=on_delivery,
        )
    except (KafkaException, BufferError) as err:
        raise DependencyError("kafka", f"cannot send: {err}") from err
    producer.flush(timeout + 1)
    if "error" not in outcome:
        raise DependencyError("kafka", f"no delivery report within {timeout:g}s")
    if outcome["error"] is not None:
        raise DependencyError("kafka", f"delivery failed: {outcome['error'].str()}")
    where: tuple[int, int] = outcome["where"]
    return where
