"""The recurring schedules of a deployment, from application code: :class:`ScheduleClient`.

Schedules are configuration that the HTTP API writes to PostgreSQL (``/v1/schedules``, see
docs/api.md), so this client talks to the API (``httpx``, blocking, thread-safe) with a
bearer token, not to Kafka: an application needs no database credentials to manage them.
Every definition is checked here first with the rules the API applies
(:func:`eventsched.core.domain.schedulefields.spec_from_fields`: ``ValueError`` naming the
key, and nothing is sent).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from eventsched.client.errors import ClientError
from eventsched.core.domain.schedulefields import spec_fields, spec_from_fields
from eventsched.core.domain.schedules import Misfire

__all__ = ["ScheduleApiError", "ScheduleClient"]


class ScheduleApiError(ClientError):
    """The API answered with an error: ``status`` (404 unknown name, 409 name taken or a
    schedule from settings, 422 bad fields, 401/403 token, 503 unavailable), its stable
    ``error`` code and, for 422, ``fields`` (field -> message)."""

    def __init__(self, status: int, error: str, message: str, fields: Mapping[str, str]) -> None:
        self.status = status
        self.error = error
        self.fields = dict(fields)
        super().__init__(f"{status} {error}: {message}")


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
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def list_all(self) -> list[dict[str, Any]]:
        schedules: list[dict[str, Any]] = self._call("GET", "")["schedules"]
        return schedules

    def get(self, name: str) -> dict[str, Any]:
        return self._call("GET", _path(name))

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
        spec = spec_from_fields(name, fields)
        body = {"name": name, **spec_fields(spec)}
        return self._call("POST", "", json={k: v for k, v in body.items() if v is not None})

    def pause(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"{_path(name)}/pause")

    def resume(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"{_path(name)}/resume")

    def delete(self, name: str) -> list[str]:
        """Delete; returns the idempotency keys of the materialised occurrences it cancelled."""
        cancelled: list[str] = self._call("DELETE", _path(name))["cancelled"]
        return cancelled

    def next(self, name: str, count: int = 10, after: datetime | None = None) -> list[datetime]:
        """The next ``count`` occurrences (after ``after``, default now), aware datetimes
        with the UTC offset in force in the schedule's time zone."""
        params: dict[str, Any] = {"count": count}
        if after is not None:
            if after.tzinfo is None:
                raise ValueError("after: a datetime with a UTC offset is required")
            params["from"] = after.isoformat()
        times = self._call("GET", f"{_path(name)}/next", params=params)["occurrences"]
        return [datetime.fromisoformat(t) for t in times]

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            answer = self._http.request(method, f"/v1/schedules{path}", **kwargs)
        except httpx.HTTPError as err:
            raise ClientError(f"the API did not answer: {err}") from err
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


def _path(name: str) -> str:
    return "/" + quote(name, safe="")
