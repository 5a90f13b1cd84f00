"""The W3C traceparent helpers and the OTEL_* rule (core.runtime.tracing): pure, no exporter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from eventsched.core.domain.jobcontract import make_job
from eventsched.core.runtime import tracing
from eventsched.core.runtime.errors import ConfigError

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, VALID),
        (VALID.encode(), VALID),
        (f" {VALID} ", VALID),
        (f"00-{TRACE}-{SPAN}-00", f"00-{TRACE}-{SPAN}-00"),
        # a later version may carry more fields; we pass it on as version 00
        (f"cc-{TRACE}-{SPAN}-01-what-the-future-holds", VALID),
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is forbidden
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (VALID.upper(), None),  # lower-case hex only
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        ("", None),
        (None, None),
        (b"\xff" * 55, None),
        ("x" * 600, None),
    ],
)
def test_parse_traceparent_accepts_only_w3c_trace_context(
    value: str | bytes | None, expected: str | None
) -> None:
    assert tracing.parse_traceparent(value) == expected


def test_the_trace_id_is_read_from_a_valid_traceparent_only() -> None:
    assert tracing.trace_id_of(VALID) == TRACE
    assert tracing.trace_id_of("garbage") is None
    assert tracing.trace_id_of(None) is None


def test_the_kafka_header_is_found_among_others_and_validated() -> None:
    headers = [("content-type", b"application/json"), ("traceparent", VALID.encode())]
    assert tracing.header_traceparent(headers) == VALID
    assert tracing.header_traceparent([("traceparent", b"nonsense")]) is None
    assert tracing.header_traceparent([("traceparent", None)]) is None
    assert tracing.header_traceparent([("schema-version", b"1")]) is None
    assert tracing.header_traceparent(None) is None
    assert tracing.header_traceparent(()) is None


def test_with_traceparent_adds_or_replaces_the_header_and_leaves_others() -> None:
    base = [("schema-version", b"1")]
    assert tracing.with_traceparent(base, None) == base
    added = tracing.with_traceparent(base, VALID)
    assert added == [("schema-version", b"1"), ("traceparent", VALID.encode())]
    other = f"00-{TRACE}-{'1' * 16}-01"
    assert tracing.with_traceparent(added, other) == [
        ("schema-version", b"1"),
        ("traceparent", other.encode()),
    ]
    assert tracing.header_traceparent(tracing.with_traceparent(base, VALID)) == VALID


def test_a_job_carries_the_events_traceparent_only_when_there_is_one() -> None:
    assert make_job("e", 1, 0.0, 30).kwargs == {"event_id": "e"}
    assert make_job("e", 2, 0.0, 30, traceparent=VALID).kwargs == {
        "event_id": "e",
        "attempt": 2,
        "traceparent": VALID,
    }


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, True),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_tracing_is_off_unless_the_otel_variables_turn_it_on(
    environ: dict[str, str], on: bool
) -> None:
    assert tracing.wanted(environ) is on


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift", "OTEL_TRACES_EXPORTER": "otlp"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_a_bad_otel_value_is_a_config_error_naming_the_variable(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as info:
        tracing.wanted(environ)
    assert info.value.key == variable


def test_the_protocol_defaults_to_http_and_the_traces_variable_wins() -> None:
    assert tracing.protocol({}) == "http/protobuf"
    assert tracing.protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    both = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert tracing.protocol(both) == "http/protobuf"


# Spans need the OpenTelemetry SDK loaded; a fresh interpreter keeps this process's global
# tracer provider unset (tests/unit/test_import.py checks nothing loads it by default).
SPANS = textwrap.dedent(
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from eventsched.core.runtime import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    link = "00-11111111111111111111111111111111-2222222222222222-01"
    with tracing.span("execute t", kind="consumer", parent=parent) as current:
        inner = tracing.current_traceparent()
        started, carried = tracing.start_publish("events")
        tracing.end_publish(started, "boom", {"messaging.kafka.offset": 7})
        tracing.fail(current, "handler failed")
    with tracing.span("process events", links=[link, "", "junk"]):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    execute, publish, batch = spans["execute t"], spans["publish events"], spans["process events"]
    assert execute.context.trace_id == int(parent[3:35], 16), execute
    assert execute.parent.span_id == int(parent[36:52], 16)
    assert inner == f"00-{execute.context.trace_id:032x}-{execute.context.span_id:016x}-01"
    assert publish.parent.span_id == execute.context.span_id
    assert carried[3:35] == parent[3:35] and carried[36:52] == f"{publish.context.span_id:016x}"
    assert publish.attributes["messaging.kafka.offset"] == 7
    assert publish.status.description == "boom" and execute.status.description == "handler failed"
    assert [l.context.trace_id for l in batch.links] == [int("1" * 32, 16)]
    assert batch.parent is None

    # The client sends the application's current span, and nothing outside a span.
    from eventsched.client.messages import event_message
    from eventsched.core.domain.decode import DecodeLimits

    def sent(**kw):
        out = event_message("t", {}, at=None, delay=None, key=None, limits=DecodeLimits())
        return dict(out.headers).get("traceparent")

    assert sent() is None
    with tracing.span("checkout") as app:
        ctx = app.get_span_context()
        flags = int(ctx.trace_flags)
        assert sent() == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags:02x}".encode()
    print("ok")
    """
)


def test_spans_join_the_given_parent_link_and_carry_their_context() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SPANS], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_without_opentelemetry_loaded_the_helpers_make_no_span() -> None:
    if tracing.loaded():
        pytest.skip("another test of this process loaded OpenTelemetry")
    with tracing.span("x") as current:
        assert current is None
    assert tracing.current_traceparent() is None
    assert tracing.start_publish("events") is None


LOADED = textwrap.dedent(
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from eventsched.core.runtime import tracing

    # The API imported (redis-py does it) but no provider set: no spans, checked again and
    # again without the API's own lookup; a provider set later is seen at the next call.
    assert not tracing.loaded() and not tracing.loaded()
    assert tracing.current_traceparent() is None
    trace.set_tracer_provider(TracerProvider())
    assert tracing.loaded()
    with tracing.span("x") as current:
        assert current is not None and tracing.current_traceparent() is not None
    print("ok")
    """
)


def test_spans_start_once_a_provider_is_set_after_the_api_was_loaded() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOADED], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
