"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` environment turns it on, and the
W3C ``traceparent`` that carries an event's trace through Kafka, its jobs and its webhook.

The rule (:func:`wanted`): a process of eventsched (a role, ``eventsched send``) exports
traces when ``OTEL_SDK_DISABLED`` is not ``true`` and either ``OTEL_TRACES_EXPORTER`` names
an exporter other than ``none``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set. :func:`configure` then loads the SDK and
installs a tracer provider with a batch span processor; everything else (sampler, resource,
endpoint, headers, timeouts) is the SDK's and the exporter's own reading of ``OTEL_*``.

Spans are made where a tracer provider is set in the process (:func:`loaded`): by
:func:`configure`, or by an application that sends events with :mod:`eventsched.client`
and set OpenTelemetry up itself (its provider then gets our spans). Otherwise every helper
here costs a dictionary look-up or two, and importing eventsched imports nothing of
OpenTelemetry (tests/unit/test_import.py).

The ``traceparent`` helpers (:func:`parse_traceparent`, :func:`header_traceparent`) are pure
and work without OpenTelemetry: the consumer stores a valid incoming ``traceparent`` with the
event (``events.traceparent``) and in its job, whether or not it traces itself, so the
executor (and a retry hours later) continues the trace the producer started.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Final

from eventsched.core.runtime.errors import ConfigError

#: The W3C Trace Context header (Kafka header, job kwarg, HTTP header).
TRACEPARENT: Final = "traceparent"
#: The instrumentation scope of eventsched's spans.
TRACER_NAME: Final = "eventsched"
#: Exporters ``OTEL_TRACES_EXPORTER`` may name (comma-separated).
EXPORTERS: Final = ("otlp", "console", "none")
#: OTLP protocols ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` may name; the first is the default
#: (the one the OpenTelemetry specification recommends).
PROTOCOLS: Final = ("http/protobuf", "grpc")

# version-traceid-parentid-flags; a later version may append fields after a dash.
_TRACEPARENT_RE: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[ -~]*)?"
)
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
#: A longer header value is not parsed (W3C: vendors must not exceed 512 characters).
_MAX_TRACEPARENT: Final = 512
_API_MODULE: Final = "opentelemetry.trace"
_UNKNOWN: Final = object()

# The process's tracer provider once configure() installed one (like the log
# configuration: one per process, set up by the entry point).
_provider: Any = None
# A tracer provider was found set (it stays set: OpenTelemetry sets one once per process).
_active = False
# Whether the environment names a tracer provider for the API to load on first use (read
# once: get_tracer_provider() looks it up in os.environ on every call).
_ENV_PROVIDER: Final = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


# -- traceparent: pure ---------------------------------------------------------------------


def parse_traceparent(value: str | bytes | None) -> str | None:
    """``value`` as a version-00 ``traceparent``, or None when it is not a valid one (an
    invalid header is ignored, as W3C Trace Context asks: the trace restarts)."""
    if value is None or len(value) > _MAX_TRACEPARENT:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    match = _TRACEPARENT_RE.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a valid ``traceparent``, else None."""
    parsed = parse_traceparent(traceparent)
    return None if parsed is None else parsed[3:35]


def header_traceparent(headers: Iterable[tuple[str, bytes | str | None]] | None) -> str | None:
    """The valid ``traceparent`` among Kafka headers (the first one), or None."""
    if not headers:
        return None
    for name, value in headers:
        if name == TRACEPARENT:
            return parse_traceparent(value)
    return None


def with_traceparent(
    headers: Sequence[tuple[str, bytes]], traceparent: str | None
) -> list[tuple[str, bytes]]:
    """``headers`` plus ``traceparent`` (replacing one already there); unchanged for None."""
    out = [h for h in headers if traceparent is None or h[0] != TRACEPARENT]
    if traceparent is not None:
        out.append((TRACEPARENT, traceparent.encode("ascii")))
    return out


# -- configuration ----------------------------------------------------------------------------


def _exporters(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    for name in names:
        if name not in EXPORTERS:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER", f"unknown exporter {name!r} (one of {', '.join(EXPORTERS)})"
            )
    return names


def _disabled(environ: Mapping[str, str]) -> bool:
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables turn tracing on (the rule in the module docstring);
    ConfigError names a variable with a value eventsched cannot serve."""
    exporters = _exporters(environ)
    protocol(environ)
    if _disabled(environ):
        return False
    if exporters:
        return any(name != "none" for name in exporters)
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def protocol(environ: Mapping[str, str]) -> str:
    """The OTLP protocol for traces (``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``, else
    ``OTEL_EXPORTER_OTLP_PROTOCOL``, else ``http/protobuf``)."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip().lower()
        if value:
            if value not in PROTOCOLS:
                raise ConfigError(
                    name, f"unknown protocol {value!r} (one of {', '.join(PROTOCOLS)})"
                )
            return value
    return PROTOCOLS[0]


def configure(
    service: str,
    attributes: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Install a tracer provider exporting as the ``OTEL_*`` variables say, if they turn
    tracing on (returns whether they do). ``service`` is the ``service.name`` unless
    ``OTEL_SERVICE_NAME`` (or ``OTEL_RESOURCE_ATTRIBUTES``) names one. Once per process;
    a second call changes nothing. ConfigError names a variable with a bad value."""
    global _provider
    env = os.environ if environ is None else environ
    if not wanted(env) or _provider is not None:
        return _provider is not None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    base = dict(attributes or {})
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (os.environ);
    # our attributes would override them, so the service name is ours only when they have none.
    if not (
        env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    ):
        base[SERVICE_NAME] = service
    resource = Resource.create(base)
    processors = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]  # untyped __init__
    for name in _exporters(env) or ["otlp"]:
        if name == "otlp":
            processors.add_span_processor(BatchSpanProcessor(_otlp_exporter(protocol(env))))
        elif name == "console":
            processors.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    provider = TracerProvider(resource=resource, active_span_processor=processors)
    trace.set_tracer_provider(provider)
    _provider = provider
    _instrument_clients(processors, resource, env)
    return True


def _instrument_clients(processors: Any, resource: Any, env: Mapping[str, str]) -> None:
    """psycopg and Redis spans through their maintained instrumentations, only inside a
    trace eventsched started (their own provider samples no root span): the job queue polls
    Redis and the group commits run statements all the time, and a trace per poll would
    bury the events' traces. ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` (``psycopg``,
    ``redis``) turns either off."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    disabled = {n.strip() for n in env.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")}
    children = TracerProvider(
        resource=resource, sampler=ParentBased(ALWAYS_OFF), active_span_processor=processors
    )
    if "psycopg" not in disabled:
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

        PsycopgInstrumentor().instrument(tracer_provider=children, skip_dep_check=True)
    if "redis" not in disabled:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor().instrument(tracer_provider=children)


def _otlp_exporter(proto: str) -> Any:
    if proto == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter()


def configured() -> bool:
    """Whether :func:`configure` installed a tracer provider (and :func:`shutdown` has work)."""
    return _provider is not None


def shutdown(timeout: float = 5.0) -> None:
    """Export the spans still buffered (at most ``timeout`` s); a no-op unless configured."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.force_flush(int(timeout * 1000))
        provider.shutdown()


# -- spans ------------------------------------------------------------------------------------


def loaded() -> bool:
    """Whether spans are made: the OpenTelemetry API is loaded in this process and a tracer
    provider is set (by :func:`configure` or by the application). Other libraries load the
    API without setting one (redis-py does, for its metrics): no spans then."""
    global _active
    if _active:
        return True
    trace = sys.modules.get(_API_MODULE)
    if trace is None:
        return False
    # Called several times per executed job: while the API's global provider is unset (and
    # the environment names none), answer without get_tracer_provider()'s os.environ lookup
    # (~4% of the executor's loop thread in a burst). An API without that global: its call.
    if getattr(trace, "_TRACER_PROVIDER", _UNKNOWN) is None and not _ENV_PROVIDER:
        return False
    _active = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return _active


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span, or None (no API loaded, no valid span)."""
    if not loaded():
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def span(
    name: str,
    *,
    kind: str = "internal",
    parent: str | None = None,
    links: Iterable[str] = (),
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> AbstractContextManager[Any]:
    """A span made current for the ``with`` block (None inside when tracing is off).

    ``kind``: ``internal``, ``producer``, ``consumer``, ``server`` or ``client``.
    ``parent``: a ``traceparent`` the span is a child of (else: the current span's child);
    ``links``: ``traceparent`` values the span links to (a batch's messages). The block's
    exception, if any, is recorded on the span and marks it failed."""
    if not loaded():
        return nullcontext()
    return _span(name, kind, parent, links, attributes)


@contextmanager
def _span(
    name: str,
    kind: str,
    parent: str | None,
    links: Iterable[str],
    attributes: Mapping[str, str | int | float | bool] | None,
) -> Iterator[Any]:
    from opentelemetry import trace

    context = None
    parent_ctx = _span_context(parent)
    if parent_ctx is not None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent_ctx))
    linked = [trace.Link(c) for c in map(_span_context, links) if c is not None]
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=trace.SpanKind[kind.upper()],
        links=linked,
        attributes=dict(attributes) if attributes else None,
    ) as current:
        yield current


def _span_context(traceparent: str | None) -> Any:
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    from opentelemetry import trace

    return trace.SpanContext(
        trace_id=int(parsed[3:35], 16),
        span_id=int(parsed[36:52], 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(parsed[53:55], 16)),
    )


def set_attributes(current: Any, attributes: Mapping[str, str | int | float | bool | None]) -> None:
    """Set attributes (None values skipped) on a span from :func:`span` (None: tracing off)."""
    if current is None:
        return
    current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def fail(current: Any, description: str) -> None:
    """Mark a span from :func:`span` failed with ``description`` (None: tracing off)."""
    if current is None:
        return
    from opentelemetry.trace import Status, StatusCode

    current.set_status(Status(StatusCode.ERROR, description))


def start_publish(topic: str) -> tuple[Any, str] | None:
    """A producer span for one message to ``topic``, child of the current span and not
    made current, with the ``traceparent`` the message carries; None when tracing is off
    (or the span is not sampled: nothing to carry then but the current context)."""
    if not loaded():
        return None
    from opentelemetry import trace

    started = trace.get_tracer(TRACER_NAME).start_span(
        f"publish {topic}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": topic,
        },
    )
    ctx = started.get_span_context()
    if not ctx.is_valid:
        started.end()
        return None
    return started, f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def end_publish(started: Any, error: str | None, attributes: Mapping[str, Any]) -> None:
    """End a span from :func:`start_publish`, failed with ``error`` unless it is None."""
    set_attributes(started, attributes)
    if error is not None:
        fail(started, error)
    started.end()
