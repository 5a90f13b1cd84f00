"""One trace from the caller to the webhook: the api, consumer and executor roles in this
process against the real broker, PostgreSQL and Redis, spans caught by an in-memory exporter.

The tracer provider is this process's global one (OpenTelemetry sets it once), so it samples
only while a test of this module asks it to: other tests of the session make no spans.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode

from eventsched.core.kafka import ensure_topics
from eventsched.core.runtime import tracing
from eventsched.core.runtime.settings import Settings
from tests.support.api import api_section, serving
from tests.support.clients import delete_queue_keys, query
from tests.support.ingest import running
from tests.support.servers import Names
from tests.support.waiting import wait_until
from tests.support.webhook import Receiver, loopback_webhook_executor


class _Switch(Sampler):
    """ALWAYS_ON while ``on``, else ALWAYS_OFF (no span recorded between the tests)."""

    on = False

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return (ALWAYS_ON if self.on else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "switch"


_SWITCH = _Switch()
_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(sampler=_SWITCH)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    assert tracing.loaded()
    _EXPORTER.clear()
    _SWITCH.on = True
    try:
        yield _EXPORTER
    finally:
        _SWITCH.on = False
        _EXPORTER.clear()


def _traceparent() -> tuple[str, str, str]:
    """A caller's traceparent, its trace id and span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def _in_trace(spans: Sequence[ReadableSpan], trace_id: str) -> list[ReadableSpan]:
    return [s for s in spans if s.context is not None and _hex(s.context.trace_id, 32) == trace_id]


def _one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _parent_of(span: ReadableSpan) -> str | None:
    return None if span.parent is None else _hex(span.parent.span_id, 16)


def _id(span: ReadableSpan) -> str:
    assert span.context is not None
    return _hex(span.context.span_id, 16)


def _traceparent_of(span: ReadableSpan) -> str:
    """The W3C traceparent that carries ``span`` as the parent."""
    assert span.context is not None
    context = span.context
    return f"00-{_hex(context.trace_id, 32)}-{_id(span)}-{int(context.trace_flags):02x}"


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, names: Names
) -> Settings:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})

    def make(**sections: Any) -> Settings:
        return make_settings(**sections, api=api_section())

    return loopback_webhook_executor(make)


async def _finished(client: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    with trio.fail_after(30):
        while True:
            got = await client.get(f"/v1/events/{event_id}")
            if got.status_code == 200 and got.json()["status"] in ("succeeded", "dead"):
                return dict(got.json())
            await trio.sleep(0.1)


async def test_one_trace_spans_the_request_the_publish_the_attempts_and_the_webhook(
    spans: InMemorySpanExporter,
    settings: Settings,
    receiver: Receiver,
    database: str,
    names: Names,
    redis_url: str,
) -> None:
    ok_parent, ok_trace, caller_span = _traceparent()
    flaky_parent, flaky_trace, _ = _traceparent()
    try:
        async with serving(settings, ("consumer", "executor", "api")) as client:
            ids = {}
            for parent, status in ((ok_parent, 200), (flaky_parent, 503)):
                answer = await client.post(
                    "/v1/events",
                    json={
                        "type": "traced",
                        "payload": {"webhook_url": f"{receiver.base}/{status}"},
                        "delay_ms": 0,
                    },
                    headers={"traceparent": parent},
                )
                assert answer.status_code == 202, answer.text
                ids[status] = answer.json()["id"]
            ok = await _finished(client, ids[200])
            await _finished(client, ids[503])
            # A retry command (hours later, in real life) runs the dead event again in the
            # trace it was published in: the consumer's job for it carries its traceparent.
            retried = await client.post(f"/v1/events/{ids[503]}/retry")
            assert retried.status_code == 202, retried.text
            with trio.fail_after(30):
                while (flaky := await _finished(client, ids[503]))["attempt_count"] < 4:  # noqa: ASYNC110
                    await trio.sleep(0.1)
    finally:
        delete_queue_keys(redis_url, names.queue)
    assert (ok["status"], flaky["status"], flaky["attempt_count"]) == ("succeeded", "dead", 4)
    # The API shows the trace each event belongs to: the caller's.
    assert (ok["trace_id"], flaky["trace_id"]) == (ok_trace, flaky_trace)

    finished = spans.get_finished_spans()
    # request -> publish -> execute, in the caller's trace
    ok_spans = _in_trace(finished, ok_trace)
    request = _one(ok_spans, "schedule event")
    publish = _one(ok_spans, f"publish {names.topic}")
    execute = _one(ok_spans, "execute traced")
    assert (request.kind, publish.kind, execute.kind) == (
        SpanKind.SERVER,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
    )
    assert _parent_of(request) == caller_span
    assert _parent_of(publish) == _id(request)
    assert _parent_of(execute) == _id(publish)
    assert execute.attributes is not None
    assert execute.attributes["eventsched.event.id"] == ids[200]
    assert execute.attributes["eventsched.attempt"] == 1
    assert execute.status.status_code != StatusCode.ERROR

    # The consumer's batch span links to the message's context (the publish span).
    batches = [s for s in finished if s.name == "process events"]
    linked = {(_hex(link.context.trace_id, 32), _hex(link.context.span_id, 16))
              for s in batches for link in s.links}  # fmt: skip
    assert (ok_trace, _id(publish)) in linked
    assert all(_hex(s.context.trace_id, 32) not in (ok_trace, flaky_trace) for s in batches)  # type: ignore[union-attr]

    # The event keeps the message's traceparent: what a retry hours later continues.
    stored = dict(query(database, "SELECT id::text, traceparent FROM events"))
    assert stored[ids[200]] == _traceparent_of(publish)

    # Every attempt of the failing event, before and after the retry command, is a child of
    # its publish span: one trace.
    flaky_spans = _in_trace(finished, flaky_trace)
    flaky_publish = _one(flaky_spans, f"publish {names.topic}")
    attempts = sorted(
        (s for s in flaky_spans if s.name == "execute traced"),
        key=lambda s: s.attributes["eventsched.attempt"] if s.attributes else 0,
    )
    assert [s.attributes["eventsched.attempt"] for s in attempts if s.attributes] == [1, 2, 3, 4]
    assert {_parent_of(s) for s in attempts} == {_id(flaky_publish)}
    assert all(s.status.status_code == StatusCode.ERROR for s in attempts)
    assert "HTTP 503" in (attempts[0].status.description or "")

    # Each webhook request carried its attempt span as the W3C traceparent.
    received = sorted(
        (path, headers.get("traceparent") or headers.get("Traceparent"), body["attempt"])
        for path, headers, body in receiver.requests
    )
    assert received == sorted(
        [
            ("/200", _traceparent_of(execute), 1),
            ("/503", _traceparent_of(attempts[0]), 1),
            ("/503", _traceparent_of(attempts[1]), 2),
            ("/503", _traceparent_of(attempts[2]), 3),
            ("/503", _traceparent_of(attempts[3]), 4),
        ]
    )


async def test_an_occurrence_of_a_schedule_and_its_attempts_share_one_trace(
    spans: InMemorySpanExporter,
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    receiver: Receiver,
    database: str,
    names: Names,
    redis_url: str,
) -> None:
    ensure_topics(kafka_bootstrap, {names.topic: 1, names.dlq_topic: 1})

    def make(**sections: Any) -> Settings:
        return make_settings(
            **sections,
            scheduler={"interval": "200ms", "lookahead": "1s"},
            schedules={
                "beat": {
                    "type": "beat",
                    "every": "1s",
                    "payload": {"webhook_url": f"{receiver.base}/503"},
                }
            },
        )

    settings = loopback_webhook_executor(make)
    try:
        async with running(settings, ["consumer", "executor"]):
            dead = "SELECT 1 FROM events WHERE status = 'dead' LIMIT 1"
            await wait_until(lambda: bool(query(database, dead)), limit=30)
    finally:
        delete_queue_keys(redis_url, names.queue)

    event_id, key, traceparent = query(
        database,
        "SELECT id::text, idempotency_key, traceparent FROM events WHERE status = 'dead' LIMIT 1",
    )[0]
    assert key.startswith("beat@")  # an occurrence (<name>@<time>)
    trace_id = tracing.trace_id_of(traceparent)
    assert trace_id is not None
    in_trace = _in_trace(spans.get_finished_spans(), trace_id)
    # The leader published the occurrence in a trace of its own (no other event's), and
    # both attempts (the first failed with 503, the second too) are its children.
    publish = _one(in_trace, f"publish {names.topic}")
    assert publish.parent is None and traceparent == _traceparent_of(publish)
    attempts = [s for s in in_trace if s.name == "execute beat"]
    assert sorted(s.attributes["eventsched.attempt"] for s in attempts if s.attributes) == [1, 2]
    assert all(s.attributes and s.attributes["eventsched.event.id"] == event_id for s in attempts)
    assert {_parent_of(s) for s in attempts} == {_id(publish)}
