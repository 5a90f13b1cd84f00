"""The ``[types."<event type>"]`` and ``[types.default]`` settings: per-type policies.

Every key is optional: one left out is inherited (``types."<t>"``, then ``[handlers]`` for
the handler, then ``types.default``, then ``[handlers] default`` and ``[executor]``; the
resolution is :mod:`eventsched.core.domain.policies`). Kept out of
:mod:`~eventsched.core.runtime.settings` so that module stays small; it builds these with
:func:`convert_types` and checks them with :func:`check_types`. A bad value raises
:class:`ConfigError` naming the key as in a settings file: ``types."order.placed".rate``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.units import Duration

#: The name of the table whose values apply to every type that does not set them.
DEFAULT_TYPE = "default"


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Immutable, and a misspelt key is an error."""


class BackoffOverride(_Table, frozen=True):
    """``retry_backoff`` of a type: the keys of ``executor.retry_backoff``, each optional."""

    base: Duration | None = None
    factor: float | None = None
    max: Duration | None = None
    jitter: float | None = None


class TypeSettings(_Table, frozen=True):
    """One ``[types."<event type>"]`` table (or ``[types.default]``); None = inherited."""

    handler: str | None = None  # "module:attr", as in [handlers]
    max_retries: int | None = None
    retry_backoff: BackoffOverride | None = None
    timeout: Duration | None = None  # the handler's time limit (executor.job_timeout)
    # Jobs of this type in flight across all executor processes (0: no limit).
    concurrency: int | None = None
    # Starts per second across all executor processes (0: no limit), and how many may
    # start at once after a quiet spell (the token bucket's size).
    rate: float | None = None
    burst: int | None = None
    # Higher starts first when due work is more than the free slots can take.
    priority: int | None = None


def type_key(type_: str, field: str = "") -> str:
    """The key as written in a settings file: ``types."order.placed".rate``."""
    name = type_ if re.fullmatch(r"[A-Za-z0-9_-]+", type_) else f'"{type_}"'
    return f"types.{name}" + (f".{field}" if field else "")


def convert_types(raw: Any, dec_hook: Callable[[type, Any], Any]) -> dict[str, TypeSettings]:
    """The ``types`` table as typed settings, one type at a time so an error names it.

    Event types are case-sensitive in files; an environment variable can only spell upper
    case (``EVENTSCHED_TYPES__ORDER_PLACED__RATE``), so an all-upper-case type is taken to
    mean its lower-case name, as for ``[handlers]``; the keys inside are lower-cased.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("types", f"expected a table of event types, got {type(raw).__name__}")
    out: dict[str, TypeSettings] = {}
    for key, table in raw.items():
        type_ = str(key).lower() if str(key).isupper() else str(key)
        if not isinstance(table, Mapping):
            raise ConfigError(type_key(type_), "expected a table of policy keys")
        lowered = {str(k).lower(): _lower(v) for k, v in table.items()}
        try:
            out[type_] = msgspec.convert(lowered, TypeSettings, dec_hook=dec_hook)
        except msgspec.ValidationError as err:
            raise _error(type_, err) from None
    return out


def _lower(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k).lower(): v for k, v in value.items()}
    return value


def _error(type_: str, err: msgspec.ValidationError) -> ConfigError:
    text = str(err)
    path = ""
    if " - at `$" in text:
        text, _, rest = text.partition(" - at `$")
        path = rest.rstrip("`").lstrip(".")
    unknown = re.match(r"Object contains unknown field `([^`]+)`", text)
    if unknown:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return ConfigError(type_key(type_, path), "unknown setting")
    return ConfigError(
        type_key(type_, path) if path else type_key(type_), text[:1].lower() + text[1:]
    )


def check_types(types: Mapping[str, TypeSettings]) -> None:
    """Range checks, and limits only on named types (a limit is one type's budget)."""
    for type_, t in types.items():
        if t.handler is not None and ":" not in t.handler:
            raise ConfigError(
                type_key(type_, "handler"), f"expected 'module:attr', got {t.handler!r}"
            )
        if t.max_retries is not None and t.max_retries <= 0:
            raise ConfigError(type_key(type_, "max_retries"), "must be positive")
        if t.timeout is not None and t.timeout <= 0:
            raise ConfigError(type_key(type_, "timeout"), "must be positive")
        b = t.retry_backoff
        if b is not None:
            if b.base is not None and b.base < 0:
                raise ConfigError(type_key(type_, "retry_backoff.base"), "must not be negative")
            if b.factor is not None and b.factor < 1:
                raise ConfigError(type_key(type_, "retry_backoff.factor"), "must be >= 1")
            if b.max is not None and b.max < 0:
                raise ConfigError(type_key(type_, "retry_backoff.max"), "must not be negative")
            if b.jitter is not None and not 0 <= b.jitter <= 1:
                raise ConfigError(
                    type_key(type_, "retry_backoff.jitter"), "must be between 0 and 1"
                )
        for field, value in (("concurrency", t.concurrency), ("rate", t.rate)):
            if value is not None and value < 0:
                raise ConfigError(type_key(type_, field), "must not be negative (0: no limit)")
            if type_ == DEFAULT_TYPE and value:
                raise ConfigError(
                    type_key(type_, field),
                    'limits are per event type: set it under [types."<event type>"]',
                )
        if t.burst is not None:
            if t.burst <= 0:
                raise ConfigError(type_key(type_, "burst"), "must be positive")
            if not t.rate:
                raise ConfigError(type_key(type_, "burst"), "needs a rate (starts per second)")
        if t.priority is not None and not -1000 <= t.priority <= 1000:
            raise ConfigError(type_key(type_, "priority"), "must be between -1000 and 1000")
