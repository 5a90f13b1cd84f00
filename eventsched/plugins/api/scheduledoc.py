"""The recurring schedules' part of the OpenAPI document (:mod:`.openapi` merges it in)."""

from __future__ import annotations

from typing import Any

_NSTR = {"type": ["string", "null"]}
_NTIME = {"type": ["string", "null"], "format": "date-time"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_READ = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}
_WRITE = {
    **_READ,
    "403": {"$ref": "#/components/responses/Forbidden"},
    "413": {"$ref": "#/components/responses/TooLarge"},
    "422": {"$ref": "#/components/responses/Invalid"},
}
_ERROR = {"$ref": "#/components/schemas/Error"}
_SCHEDULE = {"$ref": "#/components/schemas/Schedule"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def schedule_schemas() -> dict[str, Any]:
    keys: dict[str, Any] = {
        "type": {"type": "string", "minLength": 1, "maxLength": 200},
        "cron": {**_NSTR, "description": "5 fields, or 6 with the seconds first"},
        "every": {
            "type": ["string", "number", "null"],
            "description": "a duration (500ms, 30s, 15m, 2h, 1d) or seconds; elapsed time",
        },
        "timezone": {"type": "string", "default": "UTC", "description": "IANA name"},
        "payload": {"type": "object", "default": {}},
        "start": {**_NTIME, "description": "first possible occurrence (inclusive)"},
        "end": {**_NTIME, "description": "last possible occurrence (inclusive)"},
        "misfire": {"type": "string", "enum": ["run_once", "run_all", "skip"]},
        "misfire_limit": {"type": "integer", "minimum": 1, "default": 100},
        "paused": {"type": "boolean", "default": False},
    }
    name = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]*$"}
    return {
        "ScheduleRequest": {
            "type": "object",
            "required": ["name", "type"],
            "properties": {"name": name, **keys},
            "additionalProperties": False,
            "description": "exactly one of cron and every",
        },
        "Schedule": {
            "type": "object",
            "required": ["name", *keys, "source", "created_at", "updated_at"],
            "properties": {
                "name": name,
                **keys,
                "every": {**_NSTR, "description": "in its largest whole unit (15m)"},
                "source": {"type": "string", "enum": ["settings", "api"]},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "materialised_through": {
                    **_NTIME,
                    "description": "every occurrence up to here is on the events topic",
                },
            },
        },
    }


def schedule_paths(max_next: int) -> dict[str, Any]:
    not_found = _json(_ERROR, "no schedule with this name")
    return {
        "/v1/schedules": {
            "get": {
                "operationId": "listSchedules",
                "summary": "Every recurring schedule, by name",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["schedules"],
                            "properties": {"schedules": {"type": "array", "items": _SCHEDULE}},
                        },
                        "the schedules",
                    ),
                    **_READ,
                },
            },
            "post": {
                "operationId": "addSchedule",
                "summary": "Add a recurring schedule (written to PostgreSQL)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ScheduleRequest"}
                        }
                    },
                },
                "responses": {
                    "201": _json(_SCHEDULE, "added"),
                    "409": _json(_ERROR, "a schedule with this name exists"),
                    **_WRITE,
                },
            },
        },
        "/v1/schedules/{name}": {
            "get": {
                "operationId": "getSchedule",
                "summary": "One schedule",
                "parameters": [_NAME],
                "responses": {"200": _json(_SCHEDULE, "the schedule"), "404": not_found, **_READ},
            },
            "delete": {
                "operationId": "deleteSchedule",
                "summary": "Delete a schedule; cancel the occurrences it materialised ahead",
                "parameters": [_NAME],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["name", "cancelled"],
                            "properties": {
                                "name": {"type": "string"},
                                "cancelled": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "idempotency keys a cancel was sent for",
                                },
                            },
                        },
                        "deleted",
                    ),
                    "404": not_found,
                    "409": _json(_ERROR, "the schedule comes from settings"),
                    **_WRITE,
                },
            },
        },
        **{
            f"/v1/schedules/{{name}}/{op}": {
                "post": {
                    "operationId": f"{op}Schedule",
                    "summary": summary,
                    "parameters": [_NAME],
                    "responses": {
                        "200": _json(_SCHEDULE, "the schedule"),
                        "404": not_found,
                        **_WRITE,
                    },
                }
            }
            for op, summary in (
                ("pause", "Stop materialising (materialised occurrences still run)"),
                ("resume", "Materialise again from now (the paused time is skipped)"),
            )
        },
        "/v1/schedules/{name}/next": {
            "get": {
                "operationId": "nextOccurrences",
                "summary": "The next occurrences, RFC 3339 with the UTC offset in force",
                "parameters": [
                    _NAME,
                    {
                        "name": "count",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": max_next,
                            "default": 10,
                        },
                    },
                    {
                        "name": "from",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                        "description": "after this instant (default: now)",
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["name", "timezone", "occurrences"],
                            "properties": {
                                "name": {"type": "string"},
                                "timezone": {"type": "string"},
                                "occurrences": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "the occurrences",
                    ),
                    "404": not_found,
                    "422": {"$ref": "#/components/responses/Invalid"},
                    **_READ,
                },
            }
        },
    }
