"""The HTTP API's recurring schedules: ``/v1/schedules`` (list, add), ``/v1/schedules/{name}``
(show, delete), ``.../pause``, ``.../resume`` and ``.../next``.

Schedule definitions are configuration, not events: they are written to PostgreSQL
directly (:mod:`eventsched.core.store.schedules`), and the executors' schedule leader turns
their occurrences into events on the log. Deleting a schedule publishes a cancel command for
each occurrence it had materialised ahead (after now, up to its watermark), keyed like the
occurrence, so each cancel lands behind its event on the same partition.

Same rules as the events endpoints (:mod:`.app`): bearer tokens (writes need a token that
is not read-only), 422 listing every bad field, 404 for an unknown name, 409 for a name
taken or a schedule from settings, 503 with ``Retry-After`` when PostgreSQL or Kafka is
down.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from eventsched.core.domain.commands import command_headers, encode_command, new_command
from eventsched.core.domain.schedulefields import (
    FIELDS,
    format_local,
    materialised_after,
    spec_from_fields,
)
from eventsched.core.domain.schedules import ScheduleSpec, next_occurrences, occurrence_key
from eventsched.core.kafka import OutboundMessage
from eventsched.core.runtime.errors import DependencyError
from eventsched.core.runtime.logs import get_logger
from eventsched.core.store import schedules as store
from eventsched.plugins.api.app import Handlers, _answers, _query_time, _unavailable, json_response
from eventsched.plugins.api.auth import Caller
from eventsched.plugins.api.schemas import ApiError, FieldError, invalid, json_object

log = get_logger(__name__)

#: ``GET .../next`` answers at most this many occurrences.
MAX_NEXT: Final = 1000
# What stands in for a bad field while the others are checked (every error is listed).
_STAND_INS: Final[dict[str, Any]] = {
    "type": "x",
    "payload": {},
    "timezone": "UTC",
    "every": "1s",
    "cron": "* * * * *",
}


class ScheduleHandlers:
    """The endpoints; they share the events endpoints' plumbing (tokens, body limit, the
    pool and the producer)."""

    def __init__(self, h: Handlers) -> None:
        self.h = h

    async def list_all(self, request: Request) -> Response:
        self.h._caller(request, write=False)
        rows = await self.h._read(store.list_schedules)
        return json_response({"schedules": [store.row_json(r) for r in rows]})

    async def get(self, request: Request) -> Response:
        self.h._caller(request, write=False)
        return json_response(store.row_json(await self._row(request)))

    async def add(self, request: Request) -> Response:
        caller = self.h._caller(request, write=True)
        spec = _spec(await self.h._body(request))
        row = await self.h._read(store.insert, spec, source="api")
        if row is None:
            raise ApiError(409, "exists", f"a schedule named {spec.name!r} exists already")
        log.info("schedule_added", schedule=spec.name, requested_by=caller.name)
        return json_response(store.row_json(row), 201, {"Location": f"/v1/schedules/{spec.name}"})

    async def pause(self, request: Request) -> Response:
        return await self._set_paused(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: Request, paused: bool) -> Response:
        caller = self.h._caller(request, write=True)
        row = await self.set_paused(caller, request.path_params["name"], paused)
        return json_response(store.row_json(row))

    async def set_paused(self, caller: Caller, name: str, paused: bool) -> store.ScheduleRow:
        """Pause or resume a schedule (``POST .../pause|resume`` and the web console's
        buttons); 404 for an unknown name."""
        row = await self.h._read(store.set_paused, name, paused)
        if row is None:
            raise _not_found()
        log.info("schedule_paused" if paused else "schedule_resumed", schedule=name,
                 requested_by=caller.name)  # fmt: skip
        return row

    async def delete(self, request: Request) -> Response:
        caller = self.h._caller(request, write=True)
        row = await self._row(request)
        if row.source == "settings":
            raise ApiError(
                409,
                "from_settings",
                f"schedule {row.name!r} comes from settings: remove it from the settings file"
                " (the next executor start deletes it), or pause it",
            )
        deleted = await self.h._read(store.delete, row.name)
        if deleted is None:
            raise _not_found()
        at = materialised_after(deleted.spec, deleted.materialised_through, datetime.now(UTC))
        keys = [occurrence_key(row.name, t) for t in at]
        await self._cancel(keys, caller.name)
        log.info("schedule_deleted", schedule=row.name, cancelled=len(keys),
                 requested_by=caller.name)  # fmt: skip
        return json_response({"name": row.name, "cancelled": keys})

    async def next_times(self, request: Request) -> Response:
        self.h._caller(request, write=False)
        params = request.query_params
        errors = [
            FieldError(p, "unknown parameter") for p in sorted(set(params) - {"count", "from"})
        ]
        count = 10
        if (text := params.get("count")) is not None:
            if not text.isdigit() or int(text) > MAX_NEXT:
                errors.append(FieldError("count", f"must be an integer from 0 to {MAX_NEXT}"))
            else:
                count = int(text)
        after = _query_time(params.get("from"), "from", errors)
        if errors:
            raise invalid(*errors)
        row = await self._row(request)
        times = next_occurrences(row.spec, after or datetime.now(UTC), count)
        zone = row.spec.timezone
        return json_response(
            {
                "name": row.name,
                "timezone": zone,
                "occurrences": [format_local(t, zone) for t in times],
            }
        )

    async def _row(self, request: Request) -> store.ScheduleRow:
        row = await self.h._read(store.get, request.path_params["name"])
        if row is None:
            raise _not_found()
        return row

    async def _cancel(self, keys: list[str], requested_by: str) -> None:
        if not keys:
            return
        topic = self.h.config.topic
        messages = []
        for key in keys:
            command = new_command("cancel", idempotency_key=key, requested_by=requested_by)
            value = encode_command(command)
            messages.append(OutboundMessage(topic, value, command.kafka_key, command_headers()))
        try:
            reports = await self.h.producer.send_many(messages)
        except DependencyError as err:
            log.warning("api_kafka_unavailable", error=err.problem)
            reports = []
        failed = len(keys) - sum(r.ok for r in reports)
        if failed:
            raise _unavailable(
                "kafka",
                f"the schedule is deleted, but {failed} of the cancels of its materialised"
                " occurrences were not acknowledged: cancel them as events, by key",
            )


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no schedule with this name")


def _spec(raw: bytes) -> ScheduleSpec:
    """The body of ``POST /v1/schedules``: ``name`` and the keys of a schedule; 422 listing
    every bad field (each is checked with stand-ins for the others' bad values)."""
    body = json_object(raw)
    fields = {k: v for k, v in body.items() if k != "name"}
    errors = [FieldError(k, "unknown field") for k in fields if k not in FIELDS]
    fields = {k: v for k, v in fields.items() if k in FIELDS}
    name = body.get("name")
    if not isinstance(name, str):
        errors.append(FieldError("name", "required, a string"))
        name = "x"
    for _ in range(len(FIELDS) + 2):
        try:
            spec = spec_from_fields(name, fields)
        except (ValueError, TypeError) as err:
            key, _, problem = str(err).partition(": ")
            keys = key.split(", ")
            errors.append(FieldError(keys[0], problem or str(err)))
            if keys[0] == "name":
                name = "x"
            elif keys == ["cron", "every"]:  # neither or both
                fields.pop("cron", None)
                fields["every"] = _STAND_INS["every"]
            elif keys[0] in _STAND_INS:
                fields[keys[0]] = _STAND_INS[keys[0]]
            elif keys[0] in fields:
                del fields[keys[0]]
            else:
                break
            continue
        if errors:
            break
        return spec
    raise invalid(*errors)


def schedule_routes(h: Handlers) -> list[Route]:
    s = ScheduleHandlers(h)
    return [
        Route("/v1/schedules", _answers(s.list_all), methods=["GET"]),
        Route("/v1/schedules", _answers(s.add), methods=["POST"]),
        Route("/v1/schedules/{name}", _answers(s.get), methods=["GET"]),
        Route("/v1/schedules/{name}", _answers(s.delete), methods=["DELETE"]),
        Route("/v1/schedules/{name}/pause", _answers(s.pause), methods=["POST"]),
        Route("/v1/schedules/{name}/resume", _answers(s.resume), methods=["POST"]),
        Route("/v1/schedules/{name}/next", _answers(s.next_times), methods=["GET"]),
    ]
