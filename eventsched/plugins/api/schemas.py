"""Request bodies of the HTTP API (msgspec structs) and the errors the API answers with.

Pure functions, no I/O. :func:`decode_body` turns raw bytes into a struct or raises
:class:`ApiError` 422 listing *every* bad field (msgspec stops at the first one, so a failed
conversion is redone field by field to name them all). :class:`ApiError` carries the status,
a stable ``error`` code, a message and the field errors; the app renders it as JSON.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import msgspec

from eventsched.core.runtime.errors import DecodeError

__all__ = [
    "ApiError",
    "CancelRequest",
    "FieldError",
    "RescheduleRequest",
    "RetryRequest",
    "ScheduleRequest",
    "decode_body",
    "due_time",
    "field_for_reason",
    "invalid",
]

StructT = TypeVar("StructT", bound=msgspec.Struct)


class FieldError(msgspec.Struct, frozen=True):
    field: str
    message: str


class ApiError(Exception):
    """An answer other than success: ``status``, a stable ``error`` code and a message."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        fields: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.fields = fields or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.fields:
            out["errors"] = [{"field": f.field, "message": f.message} for f in self.fields]
        return out


def invalid(*fields: FieldError) -> ApiError:
    """422 for the given bad fields."""
    shown = "; ".join(f"{f.field}: {f.message}" for f in fields)
    return ApiError(422, "invalid_request", shown, fields=list(fields))


class ScheduleRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``POST /v1/events``: due at ``execute_at`` or ``delay_ms`` from now (one of them)."""

    type: str
    payload: dict[str, Any]
    execute_at: datetime | None = None
    delay_ms: int | None = None
    idempotency_key: str | None = None


class CancelRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``POST /v1/events/{id}/cancel``: no fields (an empty body or ``{}``)."""


class RescheduleRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``POST /v1/events/{id}/reschedule``: the new due time (one of the two)."""

    execute_at: datetime | None = None
    delay_ms: int | None = None


class RetryRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``POST /v1/events/{id}/retry``: when to run again (default: at once)."""

    execute_at: datetime | None = None
    delay_ms: int | None = None


_DECODER: Final = msgspec.json.Decoder()
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def decode_body(raw: bytes, struct: type[StructT], *, optional: bool = False) -> StructT:
    """Parse a JSON object body into ``struct``; 422 naming every bad field.

    ``optional``: an empty body means the struct's defaults.
    """
    if optional and not raw.strip():
        return msgspec.convert({}, struct)
    return convert_object(json_object(raw), struct)


def json_object(raw: bytes, what: str = "a JSON object") -> dict[str, Any]:
    """A body that must hold a JSON object; 422 (field ``body``) for anything else.
    ``what``: how the refusal names the object that was expected."""
    if not raw.strip():
        raise invalid(FieldError("body", f"{what} is required"))
    try:
        obj = _DECODER.decode(raw)
    except msgspec.DecodeError as err:
        raise invalid(FieldError("body", f"invalid JSON: {err}")) from None
    if not isinstance(obj, dict):
        raise invalid(FieldError("body", f"must be {what}, got {_kind(obj)}"))
    return obj


def convert_object(obj: dict[str, Any], struct: type[StructT]) -> StructT:
    """A decoded JSON object as ``struct``; 422 naming every bad field."""
    try:
        return msgspec.convert(obj, struct)
    except msgspec.ValidationError:
        pass
    errors: list[FieldError] = []
    known = {f.name: f for f in msgspec.structs.fields(struct)}
    for name in obj:
        if name not in known:
            errors.append(FieldError(name, "unknown field"))
    for name, info in known.items():
        if name not in obj:
            if info.required:
                errors.append(FieldError(name, "required"))
            continue
        try:
            msgspec.convert(obj[name], info.type)
        except msgspec.ValidationError as err:
            errors.append(FieldError(_path(name, str(err)), _message(str(err))))
    if not errors:  # not expected: the struct refused what each field accepts
        errors.append(FieldError("body", "does not match the request schema"))
    raise invalid(*errors)


def _path(name: str, message: str) -> str:
    match = _AT.match(message)
    sub = match.group("path") if match else None
    return f"{name}{sub}" if sub else name


def _message(message: str) -> str:
    match = _AT.match(message)
    text = match.group("msg") if match else message
    return text[:1].lower() + text[1:]


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def due_time(
    execute_at: datetime | None, delay_ms: int | None, now: datetime, *, required: bool
) -> datetime | None:
    """The due time a body asks for: ``execute_at`` (with an offset) or ``now + delay_ms``;
    422 when both are given, when neither is and one is required, or for a bad value."""
    if execute_at is not None and delay_ms is not None:
        raise invalid(
            FieldError("execute_at", "give execute_at or delay_ms, not both"),
            FieldError("delay_ms", "give execute_at or delay_ms, not both"),
        )
    if delay_ms is not None:
        if delay_ms < 0:
            raise invalid(FieldError("delay_ms", "must not be negative"))
        try:
            return now + timedelta(milliseconds=delay_ms)
        except OverflowError:
            raise invalid(FieldError("delay_ms", "too large")) from None
    if execute_at is not None:
        if execute_at.tzinfo is None or execute_at.utcoffset() is None:
            raise invalid(FieldError("execute_at", "needs a UTC offset (e.g. Z or +02:00)"))
        try:
            return execute_at.astimezone(UTC)
        except OverflowError:
            raise invalid(FieldError("execute_at", "out of range in UTC")) from None
    if required:
        raise invalid(FieldError("execute_at", "required (or delay_ms)"))
    return None


#: The body field a decoder reason points at (see eventsched.core.domain.decode).
_REASON_FIELDS: Final = {
    "invalid_type": "type",
    "invalid_key": "idempotency_key",
    "invalid_payload": "payload",
    "too_deep": "payload",
    "duplicate_key": "payload",
    "invalid_timestamp": "execute_at",
    "too_old": "execute_at",
    "beyond_horizon": "execute_at",
}


def field_for_reason(err: DecodeError) -> FieldError:
    """A decoder refusal of what the API built, as the body field it came from."""
    return FieldError(_REASON_FIELDS.get(err.reason, "body"), f"{err.reason}: {err.detail}")
