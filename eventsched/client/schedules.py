"""The recurring schedules of a deployment, from application code: :class:`ScheduleClient`
(blocking, thread-safe) and :class:`AsyncScheduleClient` (asyncio or trio).

Schedules are configuration that the HTTP API writes to PostgreSQL (``/v1/schedules``, see
docs/api.md), so these clients talk to the API (``httpx``) with a bearer token, not to
Kafka: an application needs no database credentials to manage them. Every definition is
checked here first with the rules the API applies
(:func:`eventsched.core.domain.schedulefields.spec_from_fields`: ``ValueError`` naming the
key, and nothing is sent). Both clients build their requests and read the answers with the
same functions below; only the transport differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from eventsched.client.errors import ClientError
from eventsched.core.domain.schedulefields import spec_fields, spec_from_fields
from eventsched.core.domain.schedules import Misfire

__all__ = ["AsyncScheduleClient", "ScheduleApiError", "ScheduleClient"]


class ScheduleApiError(ClientError):
    """The API answered with an error: ``status`` (404 unknown name, 409 name taken or a
    schedule from settings, 422 bad fields, 401/403 token, 503 unavailable), its stable
    ``error`` code and, for 422, ``fields`` (field -> message)."""

    def __init__(self, status: int, error: str, message: str, fields: Mapping[str, str]) -> None:
        self.status = status
        self.error = error
        self.fields = dict(fields)
        super().__init__(f"{status} {error}: {message}")


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _path(name: str, action: str = "") -> str:
    return "/v1/schedules" + ("/" + quote(name, safe="") if name else "") + action


def _add(name: str, fields: dict[str, Any]) -> _Request:
    spec = spec_from_fields(name, fields)  # ValueError naming the key: nothing is sent
    body = {"name": name, **spec_fields(spec)}
    return _Request("POST", _path(""), json={k: v for k, v in body.items() if v is not None})


def _next(name: str, count: int, after: datetime | None) -> _Request:
    params: dict[str, Any] = {"count": count}
    if after is not None:
        if after.tzinfo is None:
            raise ValueError("after: a datetime with a UTC offset is required")
        params["from"] = after.isoformat()
    return _Request("GET", _path(name, "/next"), params=params)


def _answer(answer: httpx.Response) -> dict[str, Any]:
    if answer.status_code >= 400:
        try:
            body = answer.json()
        except ValueError:
            body = {}
        raise ScheduleApiError(
            answer.status_code,
            str(body.get("error", "http_error")),
            str(body.get("message", answer.reason_phrase)),
            {e["field"]: e["message"] for e in body.get("errors", [])},
        )
    result: dict[str, Any] = answer.json()
    return result


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class ScheduleClient:
    """``list_all``, ``get``, ``add``, ``pause``, ``resume``, ``delete`` and ``next`` through the
    HTTP API at ``base_url`` (``http://127.0.0.1:8084``). Schedules come back as the API's
    JSON objects (``name``, the keys, ``source``, ``materialised_through``, ...)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(token), timeout=timeout, transport=transport
        )

    def list_all(self) -> list[dict[str, Any]]:
        schedules: list[dict[str, Any]] = self._call(_Request("GET", _path("")))["schedules"]
        return schedules

    def get(self, name: str) -> dict[str, Any]:
        return self._call(_Request("GET", _path(name)))

    def add(
        self,
        name: str,
        *,
        type: str,
        cron: str | None = None,
        every: timedelta | str | float | None = None,
        timezone: str | None = None,
        payload: dict[str, Any] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        misfire: Misfire | None = None,
        misfire_limit: int | None = None,
        paused: bool | None = None,
    ) -> dict[str, Any]:
        """Add a schedule (``ValueError`` for a bad key, before sending; 409 if taken)."""
        fields = {
            "type": type, "cron": cron, "every": every, "timezone": timezone,
            "payload": payload, "start": start, "end": end, "misfire": misfire,
            "misfire_limit": misfire_limit, "paused": paused,
        }  # fmt: skip
        return self._call(_add(name, fields))

    def pause(self, name: str) -> dict[str, Any]:
        return self._call(_Request("POST", _path(name, "/pause")))

    def resume(self, name: str) -> dict[str, Any]:
        return self._call(_Request("POST", _path(name, "/resume")))

    def delete(self, name: str) -> list[str]:
        """Delete; returns the idempotency keys of the materialised occurrences it cancelled."""
        cancelled: list[str] = self._call(_Request("DELETE", _path(name)))["cancelled"]
        return cancelled

    def next(self, name: str, count: int = 10, after: datetime | None = None) -> list[datetime]:
        """The next ``count`` occurrences (after ``after``, default now), aware datetimes
        with the UTC offset in force in the schedule's time zone."""
        times = self._call(_next(name, count, after))["occurrences"]
        return [datetime.fromisoformat(t) for t in times]

    def _call(self, request: _Request) -> dict[str, Any]:
        try:
            answer = self._http.request(
                request.method, request.path, json=request.json, params=request.params
            )
        except httpx.HTTPError as err:
            raise ClientError(f"the API did not answer: {err}") from err
        return _answer(answer)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncScheduleClient:
    """:class:`ScheduleClient`'s methods as coroutines (httpx runs on asyncio and on trio)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(token), timeout=timeout, transport=transport
        )

    async def list_all(self) -> list[dict[str, Any]]:
        answer = await self._call(_Request("GET", _path("")))
        schedules: list[dict[str, Any]] = answer["schedules"]
        return schedules

    async def get(self, name: str) -> dict[str, Any]:
        return await self._call(_Request("GET", _path(name)))

    async def add(
        self,
        name: str,
        *,
        type: str,
        cron: str | None = None,
        every: timedelta | str | float | None = None,
        timezone: str | None = None,
        payload: dict[str, Any] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        misfire: Misfire | None = None,
        misfire_limit: int | None = None,
        paused: bool | None = None,
    ) -> dict[str, Any]:
        fields = {
            "type": type, "cron": cron, "every": every, "timezone": timezone,
            "payload": payload, "start": start, "end": end, "misfire": misfire,
            "misfire_limit": misfire_limit, "paused": paused,
        }  # fmt: skip
        return await self._call(_add(name, fields))

    async def pause(self, name: str) -> dict[str, Any]:
        return await self._call(_Request("POST", _path(name, "/pause")))

    async def resume(self, name: str) -> dict[str, Any]:
        return await self._call(_Request("POST", _path(name, "/resume")))

    async def delete(self, name: str) -> list[str]:
        cancelled: list[str] = (await self._call(_Request("DELETE", _path(name))))["cancelled"]
        return cancelled

    async def next(
        self, name: str, count: int = 10, after: datetime | None = None
    ) -> list[datetime]:
        times = (await self._call(_next(name, count, after)))["occurrences"]
        return [datetime.fromisoformat(t) for t in times]

    async def _call(self, request: _Request) -> dict[str, Any]:
        try:
            answer = await self._http.request(
                request.method, request.path, json=request.json, params=request.params
            )
        except httpx.HTTPError as err:
            raise ClientError(f"the API did not answer: {err}") from err
        return _answer(answer)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
