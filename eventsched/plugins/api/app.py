"""The HTTP API's ASGI app (Starlette): routes, authentication, limits, error answers.

Runs on the trio side: hypercorn serves it on trio and Starlette runs on trio through
anyio. PostgreSQL reads go through :mod:`eventsched.core.store.queries` on the shared
pool, messages through the shared :class:`~eventsched.core.kafka.KafkaProducer`; a POST
answers only once the broker acknowledged its message. Every answer other than success
is JSON ``{"error", "message", "errors"?}`` (see :class:`~.schemas.ApiError`); the
``Authorization`` header is never logged.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from typing import Any, Final, TypeVar

import msgspec
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eventsched.core.domain.commands import (
    Command,
    Op,
    command_headers,
    encode_command,
    new_command,
    parse_command,
    refusal,
)
from eventsched.core.domain.decode import DecodeLimits
from eventsched.core.domain.event import STATUSES, format_time, parse_time
from eventsched.core.domain.wire import kafka_key
from eventsched.core.kafka import DeliveryReport, KafkaProducer, OutboundMessage
from eventsched.core.runtime import metrics, tracing
from eventsched.core.runtime.errors import DecodeError, DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.runtime.redaction import redact
from eventsched.core.store import queries
from eventsched.core.store.pool import Database
from eventsched.core.store.rowjson import event_json, stats_json, summary_json
from eventsched.plugins.api.auth import ANONYMOUS, Caller, Tokens
from eventsched.plugins.api.openapi import document
from eventsched.plugins.api.scheduling import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    V1_HEADER_LIST,
    accepted,
    prepare,
    prepare_batch,
)
from eventsched.plugins.api.schemas import (
    ApiError,
    CancelRequest,
    FieldError,
    RescheduleRequest,
    RetryRequest,
    ScheduleRequest,
    decode_body,
    due_time,
    field_for_reason,
    invalid,
)
from eventsched.plugins.api.views import decode_cursor, encode_cursor

log = get_logger(__name__)

T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]

#: Seconds a client should wait before trying again after a 503.
RETRY_AFTER: Final = "2"
MAX_LIMIT: Final = 500
DEFAULT_LIMIT: Final = 50
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ENCODER: Final = msgspec.json.Encoder()


#: A due time in the past is accepted only if it is still within consumer.max_past this
#: much later, when the consumer reads it (else it would go to the DLQ as too_old).
PAST_MARGIN: Final = 60.0


def api_limits(consumer: DecodeLimits) -> DecodeLimits:
    """The consumer's limits, with :data:`PAST_MARGIN` taken off ``max_past``."""
    return DecodeLimits(
        max_message_bytes=consumer.max_message_bytes,
        max_payload_depth=consumer.max_payload_depth,
        max_past=max(0.0, consumer.max_past - PAST_MARGIN),
        horizon=consumer.horizon,
    )


@dataclass(frozen=True)
class ApiConfig:
    topic: str
    limits: DecodeLimits
    produce_timeout: float
    #: None: ``api.auth = "none"`` (every request is allowed).
    tokens: Tokens | None


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(_ENCODER.encode(body), status, headers, media_type="application/json")


def _unavailable(dependency: str, message: str) -> ApiError:
    return ApiError(503, f"{dependency}_unavailable", message, headers={"Retry-After": RETRY_AFTER})


def _answers(endpoint: Endpoint) -> Endpoint:
    """Render ApiError (and anything unexpected, as 500) as a JSON answer."""

    @wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as err:
            return json_response(err.body(), err.status, err.headers)
        except Exception as err:  # a bug or an unexpected database error: 500, logged
            log.error("api_request_failed", path=request.url.path, error=redact(repr(err)))
            return json_response({"error": "internal", "message": "internal error"}, 500)

    return wrapper


@contextmanager
def _traced(request: Request, name: str) -> Iterator[Sequence[tuple[str, bytes]]]:
    """The headers of the events a request publishes, inside a server span that continues
    the caller's ``traceparent`` (tracing on: each message then gets a producer span of its
    own); tracing off, the caller's valid ``traceparent`` travels with the events as it is."""
    incoming = tracing.parse_traceparent(request.headers.get(tracing.TRACEPARENT))
    if not tracing.loaded():
        yield tracing.with_traceparent(V1_HEADER_LIST, incoming)
        return
    with tracing.span(
        name, kind="server", parent=incoming, attributes={"http.route": request.url.path}
    ):
        yield V1_HEADER_LIST


class Handlers:
    """The endpoints; one instance per role, sharing the pool and the producer."""

    def __init__(self, config: ApiConfig, db: Database, producer: KafkaProducer) -> None:
        self.config = config
        self.db = db
        self.producer = producer

    # -- plumbing ------------------------------------------------------------------------

    def _caller(self, request: Request, *, write: bool) -> Caller:
        tokens = self.config.tokens
        if tokens is None:
            return ANONYMOUS
        caller = tokens.check(request.headers.get("authorization"))
        if caller is None:
            raise ApiError(
                401,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="eventsched"'},
            )
        if write and caller.read_only:
            raise ApiError(403, "forbidden", f"token {caller.name!r} is read-only")
        return caller

    async def _body(self, request: Request, *, batch: bool = False) -> bytes:
        limit = self.config.limits.max_message_bytes
        what = "consumer.max_message_bytes"
        if batch:
            limit, what = max(limit, MAX_BATCH_BYTES), "a batch"
        too_large = ApiError(413, "too_large", f"request body larger than {limit} bytes ({what})")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def _read(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            return await fn(self.db, *args, **kwargs)
        except DependencyError as err:
            log.warning("api_postgres_unavailable", error=err.problem)
            raise _unavailable("postgres", "PostgreSQL is unavailable; try again") from None

    async def _produce(
        self, value: bytes, key: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        timeout = self.config.produce_timeout
        try:
            with trio.move_on_after(timeout) as waited:
                report = await self.producer.send(
                    self.config.topic, value, key=key, headers=headers
                )
        except DependencyError as err:
            log.warning("api_kafka_unavailable", error=err.problem)
            raise _unavailable("kafka", "Kafka is unavailable; try again") from None
        if waited.cancelled_caught:
            log.warning("api_kafka_unavailable", error=f"no acknowledgement within {timeout:g}s")
            raise _unavailable(
                "kafka", f"the broker did not acknowledge within {timeout:g}s; try again"
            )
        if report.too_large:
            raise ApiError(413, "too_large", "the broker refused the message for its size")
        if not report.ok:
            log.warning("api_kafka_unavailable", error=report.error)
            raise _unavailable("kafka", "Kafka did not take the message; try again")

    async def _produce_many(self, messages: Sequence[OutboundMessage]) -> list[DeliveryReport]:
        """Publish many messages; their reports (503 only when none could be tried)."""
        timeout = self.config.produce_timeout
        try:
            with trio.move_on_after(timeout) as waited:
                return await self.producer.send_many(messages)
        except DependencyError as err:
            log.warning("api_kafka_unavailable", error=err.problem)
            raise _unavailable("kafka", "Kafka is unavailable; try again") from None
        assert waited.cancelled_caught  # send_many returned otherwise
        log.warning("api_kafka_unavailable", error=f"no acknowledgement within {timeout:g}s")
        raise _unavailable(
            "kafka", f"the broker did not acknowledge within {timeout:g}s; try again"
        )

    @staticmethod
    def _event_id(request: Request) -> uuid.UUID:
        try:
            return uuid.UUID(request.path_params["id"])
        except ValueError:
            raise ApiError(404, "not_found", "no event with this id") from None

    # -- writes --------------------------------------------------------------------------

    async def schedule(self, request: Request) -> Response:
        self._caller(request, write=True)
        body = decode_body(await self._body(request), ScheduleRequest)
        key = body.idempotency_key
        header_key = request.headers.get("idempotency-key")
        if header_key is not None:
            if key is not None and key != header_key:
                raise invalid(
                    FieldError("idempotency_key", "differs from the Idempotency-Key header")
                )
            key = header_key
        now = datetime.now(UTC)
        prepared = prepare(body, key, now, self.config.limits)
        event, value = prepared.event, prepared.value
        if key is not None:
            known = await self._read(queries.event_by_key, key)
            if known is not None:
                return json_response(
                    {
                        "id": str(known.id),
                        "idempotency_key": known.idempotency_key,
                        "execute_at": format_time(known.execute_at),
                        "status": known.status,
                        "already_known": True,
                    },
                    200,
                    {"Location": f"/v1/events/{known.id}"},
                )
        with _traced(request, "schedule event") as headers:
            await self._produce(value, kafka_key(event), headers)
        return json_response(
            {
                "id": str(event.id),
                "idempotency_key": event.idempotency_key,
                "execute_at": format_time(event.execute_at),
                "already_known": False,
            },
            202,
            {"Location": f"/v1/events/{event.id}"},
        )

    async def schedule_batch(self, request: Request) -> Response:
        self._caller(request, write=True)
        if request.headers.get("idempotency-key") is not None:
            raise invalid(
                FieldError("Idempotency-Key", "not taken by a batch: give each event its key")
            )
        now = datetime.now(UTC)
        prepared = prepare_batch(await self._body(request, batch=True), now, self.config.limits)
        keys = [p.event.idempotency_key for p in prepared if p.keyed]
        known = await self._read(queries.events_by_keys, keys) if keys else {}
        fresh = [p for p in prepared if p.event.idempotency_key not in known]
        with _traced(request, "schedule events") as headers:
            reports = await self._produce_many(
                [
                    OutboundMessage(self.config.topic, p.value, kafka_key(p.event), headers)
                    for p in fresh
                ]
            )
        answers: list[dict[str, Any]] = []
        failed = 0
        outcome = dict(zip((p.event.id for p in fresh), reports, strict=True))
        for p in prepared:
            was = known.get(p.event.idempotency_key)
            if was is not None:
                answers.append(
                    {
                        "id": str(was.id),
                        "idempotency_key": was.idempotency_key,
                        "execute_at": format_time(was.execute_at),
                        "status": was.status,
                        "already_known": True,
                    }
                )
                continue
            answer = accepted(p.event)
            report = outcome[p.event.id]
            if not report.ok:
                failed += 1
                answer["error"] = "too_large" if report.too_large else "not_acknowledged"
            answers.append(answer)
        if failed:
            log.warning("api_kafka_unavailable", error=f"{failed} of a batch not acknowledged")
            return json_response(
                {
                    "error": "kafka_unavailable",
                    "message": f"{failed} of {len(prepared)} events were not acknowledged;"
                    " send the batch again (events with an idempotency key are never"
                    " scheduled twice)",
                    "events": answers,
                },
                503,
                {"Retry-After": RETRY_AFTER},
            )
        return json_response({"events": answers}, 202)

    async def cancel(self, request: Request) -> Response:
        return await self._command(request, "cancel")

    async def reschedule(self, request: Request) -> Response:
        return await self._command(request, "reschedule")

    async def retry(self, request: Request) -> Response:
        return await self._command(request, "retry")

    async def _command(self, request: Request, op: Op) -> Response:
        caller = self._caller(request, write=True)
        event_id = self._event_id(request)
        raw = await self._body(request)
        now = datetime.now(UTC)
        due: datetime | None = None
        if op == "cancel":
            decode_body(raw, CancelRequest, optional=True)
        elif op == "reschedule":
            body = decode_body(raw, RescheduleRequest)
            due = due_time(body.execute_at, body.delay_ms, now, required=True)
        else:
            retry = decode_body(raw, RetryRequest, optional=True)
            due = due_time(retry.execute_at, retry.delay_ms, now, required=False)
        command = await self.send_command(caller, event_id, op, due, now=now)
        return json_response(
            {"command_id": str(command.command_id), "state": "accepted", "op": op}, 202
        )

    async def send_command(
        self,
        caller: Caller,
        event_id: uuid.UUID,
        op: Op,
        due: datetime | None,
        *,
        now: datetime | None = None,
    ) -> Command:
        """Check ``op`` on the event and publish it (the write path of
        ``POST /v1/events/{id}/<op>`` and of the web console's buttons): 422 for a due time
        beyond the consumer's limits, 404 for an unknown event, 409 for a transition its
        status refuses; returns once the broker acknowledged the command."""
        now = now or datetime.now(UTC)
        probe = new_command(op, event_id=event_id, execute_at=due, requested_by=caller.name)
        try:  # the consumer's limits (a due time beyond the horizon), before any lookup
            parse_command(encode_command(probe), now=now, limits=self.config.limits)
        except DecodeError as err:
            raise invalid(field_for_reason(err)) from None
        target = await self._read(queries.event_key, event_id)
        if target is None:
            raise ApiError(404, "not_found", "no event with this id")
        reason = refusal(op, target.status)
        if reason is not None:
            raise ApiError(409, "refused", reason)
        command = new_command(
            op,
            idempotency_key=target.idempotency_key,
            event_id=target.id,
            execute_at=due,
            requested_by=caller.name,
        )
        await self._produce(encode_command(command), command.kafka_key, command_headers())
        return command

    # -- reads ---------------------------------------------------------------------------

    async def get_event(self, request: Request) -> Response:
        self._caller(request, write=False)
        row = await self._read(queries.event_with_attempts, self._event_id(request))
        if row is None:
            raise ApiError(404, "not_found", "no event with this id")
        return json_response(event_json(row))

    async def list_events(self, request: Request) -> Response:
        self._caller(request, write=False)
        params = request.query_params
        errors: list[FieldError] = []
        unknown = set(params) - {"status", "type", "due_after", "due_before", "limit", "cursor"}
        errors += [FieldError(name, "unknown parameter") for name in sorted(unknown)]
        status = params.get("status")
        if status is not None and status not in STATUSES:
            errors.append(FieldError("status", f"must be one of {', '.join(STATUSES)}"))
        type_ = params.get("type")
        if type_ is not None and not type_:
            errors.append(FieldError("type", "must not be empty"))
        bounds: dict[str, datetime | None] = {}
        for name in ("due_after", "due_before"):
            bounds[name] = _query_time(params.get(name), name, errors)
        limit = DEFAULT_LIMIT
        if (text := params.get("limit")) is not None:
            if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
                errors.append(FieldError("limit", f"must be an integer from 1 to {MAX_LIMIT}"))
            else:
                limit = int(text)
        after = None
        if (cursor := params.get("cursor")) is not None:
            try:
                after = decode_cursor(cursor)
            except ValueError as err:
                errors.append(FieldError("cursor", str(err)))
        if errors:
            raise invalid(*errors)
        rows = await self._read(
            queries.list_events,
            limit=limit + 1,
            status=status,
            type_=type_,
            due_after=bounds["due_after"],
            due_before=bounds["due_before"],
            after=after,
        )
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1].execute_at, page[-1].id) if len(rows) > limit else None
        return json_response(
            {"events": [summary_json(r) for r in page], "next_cursor": next_cursor}
        )

    async def stats(self, request: Request) -> Response:
        self._caller(request, write=False)
        return json_response(stats_json(await self._read(queries.stats)))

    async def openapi(self, request: Request) -> Response:
        return json_response(self._document)

    @property
    def _document(self) -> dict[str, Any]:
        return document(self.config.limits.max_message_bytes, MAX_LIMIT, MAX_BATCH)


_OFFSET_AS_SPACE: Final = re.compile(r" (\d{2}:?\d{2})$")


def _query_time(text: str | None, name: str, errors: list[FieldError]) -> datetime | None:
    if text is None:
        return None
    # An unencoded "+" of an offset arrives as a space in a query string.
    text = _OFFSET_AS_SPACE.sub(r"+\1", text)
    try:
        return parse_time(text)
    except DecodeError as err:
        errors.append(FieldError(name, f"{err.detail} (RFC 3339 with an offset, e.g. ...Z)"))
        return None


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return json_response({"error": code, "message": exc.detail}, exc.status_code, exc.headers)


class RequestMetrics:
    """ASGI middleware: ``eventsched_api_requests_total{route,method,status}`` and
    ``eventsched_api_request_duration_seconds{route,method}``; ``route`` is the route's
    template (``/v1/events/{id}``) or ``unmatched``, so the label sets stay bounded.

    ``direct`` maps (method, path) of routes without path parameters to their endpoint:
    those requests skip Starlette's router and middleware stack (the hot
    ``POST /v1/events``). The answer is the same: Starlette would match the same endpoint
    first, and the endpoint (wrapped by :func:`_answers`) turns every exception into an
    answer itself, so the middleware has nothing to do for it.
    """

    def __init__(self, app: ASGIApp, direct: Mapping[tuple[str, str], Endpoint]) -> None:
        self.app = app
        self.direct = dict(direct)
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        route: str | None = None
        try:
            endpoint = None
            if not scope.get("root_path"):
                endpoint = self.direct.get((scope["method"], scope["path"]))
            if endpoint is None:
                await self.app(scope, receive, send_status)
            else:
                route = scope["path"]  # a route without parameters: template == path
                response = await endpoint(Request(scope, receive, send_status))
                await response(scope, receive, send_status)
        finally:
            if route is None:
                route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self._record(route, method, status, time.perf_counter() - started)

    def _record(self, route: str, method: str, status: int, seconds: float) -> None:
        # The labelled children are looked up once per label set (they never change).
        counter = self._counters.get((route, method, status))
        if counter is None:
            counter = metrics.API_REQUESTS.labels(route, method, str(status))
            self._counters[(route, method, status)] = counter
        timer = self._timers.get((route, method))
        if timer is None:
            timer = metrics.API_REQUEST_DURATION.labels(route, method)
            self._timers[(route, method)] = timer
        counter.inc()
        timer.observe(seconds)


def build_app(config: ApiConfig, db: Database, producer: KafkaProducer) -> ASGIApp:
    """The API as an ASGI app (Starlette inside the metrics middleware)."""
    h = Handlers(config, db, producer)
    schedule = _answers(h.schedule)
    routes: list[BaseRoute] = [
        Route("/v1/events", schedule, methods=["POST"]),
        Route("/v1/events/batch", _answers(h.schedule_batch), methods=["POST"]),
        Route("/v1/events", _answers(h.list_events), methods=["GET"]),
        Route("/v1/events/{id}", _answers(h.get_event), methods=["GET"]),
        Route("/v1/events/{id}/cancel", _answers(h.cancel), methods=["POST"]),
        Route("/v1/events/{id}/reschedule", _answers(h.reschedule), methods=["POST"]),
        Route("/v1/events/{id}/retry", _answers(h.retry), methods=["POST"]),
        Route("/v1/stats", _answers(h.stats), methods=["GET"]),
        Route("/v1/openapi.json", _answers(h.openapi), methods=["GET"]),
    ]
    # Imported here: the schedules module builds on this one's plumbing.
    from eventsched.plugins.api.schedules import schedule_routes

    routes += schedule_routes(h)
    from eventsched.plugins.api.console import console_routes

    routes += console_routes(h)
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
    return RequestMetrics(app, direct={("POST", "/v1/events"): schedule})
