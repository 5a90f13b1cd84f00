"""The OpenAPI 3.1 document of the HTTP API (``GET /v1/openapi.json``).

A pure function of two limits, built once per process; tests validate it with
openapi-spec-validator and check that it names every route of the app.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from eventsched.plugins.api.scheduledoc import schedule_paths, schedule_schemas

_TIME = {"type": "string", "format": "date-time"}
_NTIME = {"type": ["string", "null"], "format": "date-time"}
_NSTR = {"type": ["string", "null"]}
_UUID = {"type": "string", "format": "uuid"}
_STATUS = {
    "type": "string",
    "enum": ["scheduled", "running", "retrying", "succeeded", "dead", "cancelled"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _unavailable() -> dict[str, Any]:
    answer = _error("PostgreSQL or Kafka is unavailable (or the broker did not acknowledge)")
    answer["headers"] = {
        "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
    }
    return answer


_READ_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}
_WRITE_ERRORS = {
    **_READ_ERRORS,
    "403": {"$ref": "#/components/responses/Forbidden"},
    "413": {"$ref": "#/components/responses/TooLarge"},
    "422": {"$ref": "#/components/responses/Invalid"},
}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": _UUID}


def _command(op: str, summary: str, body: dict[str, Any] | None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{op}Event",
        "summary": summary,
        "parameters": [_ID_PARAM],
        "responses": {
            "202": _json(_ref("CommandAccepted"), "the command is in Kafka"),
            "404": _error("no event with this id"),
            "409": _error("the event's status does not allow this command"),
            **_WRITE_ERRORS,
        },
    }
    if body is not None:
        operation["requestBody"] = {
            "required": op == "reschedule",
            "content": {"application/json": {"schema": body}},
        }
    return operation


@lru_cache(maxsize=4)
def document(max_body_bytes: int, max_limit: int, max_batch: int) -> dict[str, Any]:
    """The OpenAPI document; ``max_body_bytes`` is consumer.max_message_bytes."""
    due = {
        "execute_at": {**_TIME, "description": "due time, RFC 3339 with an offset"},
        "delay_ms": {"type": "integer", "minimum": 0, "description": "due in this many ms"},
    }
    schemas: dict[str, Any] = {
        "Error": _obj(
            ["error", "message"],
            error={"type": "string", "description": "stable code, e.g. invalid_request"},
            message={"type": "string"},
            errors={
                "type": "array",
                "items": _obj(
                    ["field", "message"], field={"type": "string"}, message={"type": "string"}
                ),
            },
        ),
        "ScheduleRequest": {
            **_obj(
                ["type", "payload"],
                type={"type": "string", "minLength": 1, "maxLength": 200},
                payload={"type": "object"},
                idempotency_key={"type": "string", "minLength": 1, "maxLength": 512},
                **due,
            ),
            "additionalProperties": False,
            "description": "exactly one of execute_at and delay_ms",
        },
        "Scheduled": _obj(
            ["id", "idempotency_key", "execute_at", "already_known"],
            id=_UUID,
            idempotency_key={"type": "string"},
            execute_at=_TIME,
            status=_STATUS,
            already_known={"type": "boolean"},
        ),
        "ScheduleBatchRequest": {
            **_obj(
                ["events"],
                events={
                    "type": "array",
                    "items": _ref("ScheduleRequest"),
                    "minItems": 1,
                    "maxItems": max_batch,
                },
            ),
            "additionalProperties": False,
            "description": "all events are checked first: one bad event refuses the batch",
        },
        "BatchScheduled": _obj(
            ["events"],
            events={
                "type": "array",
                "description": "one answer per event, in the request's order",
                "items": {
                    "allOf": [
                        _ref("Scheduled"),
                        _obj(
                            [],
                            error={
                                "type": "string",
                                "enum": ["not_acknowledged", "too_large"],
                                "description": "only in a 503: this event was not published",
                            },
                        ),
                    ]
                },
            },
            error={"type": "string"},
            message={"type": "string"},
        ),
        "RescheduleRequest": {
            **_obj([], **due),
            "additionalProperties": False,
            "description": "exactly one of execute_at and delay_ms",
        },
        "RetryRequest": {
            **_obj([], **due),
            "additionalProperties": False,
            "description": "at most one of execute_at and delay_ms (default: at once)",
        },
        "CommandAccepted": _obj(
            ["command_id", "state"],
            command_id=_UUID,
            state={"type": "string", "enum": ["accepted"]},
            op={"type": "string", "enum": ["cancel", "reschedule", "retry"]},
        ),
        "Attempt": _obj(
            ["attempt", "scheduled_for", "started_at", "lateness_ms"],
            attempt={"type": "integer"},
            scheduled_for=_TIME,
            started_at=_TIME,
            finished_at=_NTIME,
            lateness_ms={"type": "number"},
            outcome={
                "type": ["string", "null"],
                "enum": ["succeeded", "retried", "dead", "cancelled", None],
            },
            error=_NSTR,
            worker_id={"type": "string"},
        ),
        "Command": _obj(
            ["command_id", "op", "requested_by", "created_at", "applied_at", "result"],
            command_id=_UUID,
            op={"type": "string", "enum": ["cancel", "reschedule", "retry"]},
            requested_by={"type": "string"},
            execute_at=_NTIME,
            created_at=_TIME,
            applied_at=_TIME,
            result={
                "type": "string",
                "enum": ["applied", "cancel_requested", "not_applicable", "refused"],
            },
            status_before=_NSTR,
            detail={"type": "string"},
        ),
        "EventSummary": _obj(
            ["id", "idempotency_key", "type", "status", "execute_at", "attempt_count"],
            id=_UUID,
            idempotency_key={"type": "string"},
            type={"type": "string"},
            status=_STATUS,
            execute_at=_TIME,
            attempt_count={"type": "integer"},
            late={"type": "boolean"},
            created_at=_TIME,
            updated_at=_TIME,
        ),
        "Event": {
            "allOf": [
                _ref("EventSummary"),
                _obj(
                    ["payload", "attempts", "history"],
                    payload={"type": "object"},
                    next_attempt_at=_NTIME,
                    last_error=_NSTR,
                    dead_reason=_NSTR,
                    trace_id={
                        **_NSTR,
                        "description": "the OpenTelemetry trace the event was published"
                        " under (32 hex digits), null when it came without one",
                    },
                    recorded_at=_TIME,
                    finished_at=_NTIME,
                    attempts={"type": "array", "items": _ref("Attempt")},
                    history={
                        "type": "array",
                        "items": _ref("Command"),
                        "description": "commands applied to the event, oldest first",
                    },
                ),
            ]
        },
        "EventPage": _obj(
            ["events", "next_cursor"],
            events={"type": "array", "items": _ref("EventSummary")},
            next_cursor={**_NSTR, "description": "pass as cursor for the next page"},
        ),
        "Stats": _obj(
            ["total", "by_status", "by_type", "oldest_overdue"],
            total={"type": "integer"},
            by_status={"type": "object", "additionalProperties": {"type": "integer"}},
            by_type={"type": "object", "additionalProperties": {"type": "integer"}},
            oldest_overdue={
                "oneOf": [
                    {"type": "null"},
                    _obj(
                        ["id", "type", "execute_at", "overdue_seconds"],
                        id=_UUID,
                        type={"type": "string"},
                        execute_at=_TIME,
                        overdue_seconds={"type": "number"},
                    ),
                ]
            },
        ),
    }
    query = [
        {"name": "status", "in": "query", "schema": _STATUS},
        {"name": "type", "in": "query", "schema": {"type": "string"}},
        {"name": "due_after", "in": "query", "schema": _TIME, "description": "inclusive"},
        {"name": "due_before", "in": "query", "schema": _TIME, "description": "exclusive"},
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": max_limit, "default": 50},
        },
        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    ]
    paths: dict[str, Any] = {
        "/v1/events": {
            "post": {
                "operationId": "scheduleEvent",
                "summary": "Schedule an event (answered once the broker acknowledged it)",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "the idempotency key (same as the body field)",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ScheduleRequest")}},
                },
                "responses": {
                    "202": _json(_ref("Scheduled"), "in Kafka; the consumer records it"),
                    "200": _json(_ref("Scheduled"), "the key's event is already recorded"),
                    **_WRITE_ERRORS,
                },
            },
            "get": {
                "operationId": "listEvents",
                "summary": "Events in (execute_at, id) order, a page at a time",
                "parameters": query,
                "responses": {
                    "200": _json(_ref("EventPage"), "one page"),
                    "422": {"$ref": "#/components/responses/Invalid"},
                    **_READ_ERRORS,
                },
            },
        },
        "/v1/events/batch": {
            "post": {
                "operationId": "scheduleEvents",
                "summary": f"Schedule up to {max_batch} events in one request",
                "description": "Answered once the broker acknowledged every event. A 503"
                " lists which events were not published; sending the batch again is safe"
                " for events with an idempotency key.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ScheduleBatchRequest")}},
                },
                "responses": {
                    "202": _json(_ref("BatchScheduled"), "every event is in Kafka or known"),
                    **_WRITE_ERRORS,
                    "503": _json(_ref("BatchScheduled"), "some events were not published"),
                },
            }
        },
        "/v1/events/{id}": {
            "get": {
                "operationId": "getEvent",
                "summary": "One event with its attempts",
                "parameters": [_ID_PARAM],
                "responses": {
                    "200": _json(_ref("Event"), "the event"),
                    "404": _error("no event with this id"),
                    **_READ_ERRORS,
                },
            }
        },
        "/v1/events/{id}/cancel": {
            "post": _command("cancel", "Cancel an event that has not finished", None)
        },
        "/v1/events/{id}/reschedule": {
            "post": _command(
                "reschedule", "Move a scheduled or retrying event", _ref("RescheduleRequest")
            )
        },
        "/v1/events/{id}/retry": {
            "post": _command("retry", "Run a dead or cancelled event again", _ref("RetryRequest"))
        },
        "/v1/stats": {
            "get": {
                "operationId": "stats",
                "summary": "Counts by status and type, the oldest overdue event",
                "responses": {"200": _json(_ref("Stats"), "the counts"), **_READ_ERRORS},
            }
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document (no token needed)",
                "security": [],
                "responses": {"200": {"description": "the OpenAPI document"}},
            }
        },
    }
    schemas.update(schedule_schemas())
    paths.update(schedule_paths(max_next=1000))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "eventsched API",
            "version": "1",
            "description": (
                "Schedule deferred events, cancel, reschedule and retry them, read their"
                " state; manage recurring schedules."
                f" Request bodies are limited to {max_body_bytes} bytes."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Unauthorized": _error("no valid bearer token"),
                "Forbidden": _error("the token is read-only"),
                "TooLarge": _error(f"the body is larger than {max_body_bytes} bytes"),
                "Invalid": _error("a field is missing or invalid (one entry per field)"),
                "Unavailable": _unavailable(),
            },
        },
    }
