"""The settings of recurring schedules: ``[scheduler]`` (the schedule leader of the
executors) and ``[schedules.<name>]`` (one schedule each), typed and checked here as part of
:mod:`eventsched.core.runtime.settings`. What the keys of a schedule mean, and the rest of
their validation (cron syntax, time zone names), is :mod:`eventsched.core.domain.schedules`;
the CLI applies it at start-up (``eventsched.core.domain.schedulefields.specs_from_settings``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import msgspec

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.units import Duration

__all__ = ["ScheduleSettings", "SchedulerSettings", "check_scheduler", "convert_schedules"]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Immutable, and a misspelt key is an error (as every settings section)."""


class SchedulerSettings(_Section, frozen=True):
    enabled: bool = True
    # How often the leader materialises occurrences, and how far ahead of now.
    interval: Duration = Duration(5.0)
    lookahead: Duration = Duration(60.0)
    # Occurrences of one schedule materialised in one pass, at most.
    batch: int = 1000


class ScheduleSettings(_Section, frozen=True):
    """One ``[schedules.<name>]``: exactly the keys of a schedule."""

    type: str
    cron: str | None = None
    every: str | float | None = None
    timezone: str = "UTC"
    payload: dict[str, Any] = {}
    start: datetime | None = None
    end: datetime | None = None
    misfire: Literal["run_once", "run_all", "skip"] = "run_once"
    misfire_limit: int = 100
    paused: bool = False


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def convert_schedules(value: Any) -> dict[str, ScheduleSettings]:
    """``[schedules.<name>]`` one by one, so that an error names the schedule and the key
    (``schedules.nightly.misfire``; msgspec would show the name as ``[...]``). Names keep
    their case, but an all-upper-case name (all an environment variable can spell) is taken
    as lower case; keys are lowered; a payload is left as written."""
    if not isinstance(value, Mapping):
        raise ConfigError("schedules", "expected a table of [schedules.<name>] tables")
    out: dict[str, ScheduleSettings] = {}
    for raw_name, entry in value.items():
        name = str(raw_name).lower() if str(raw_name).isupper() else str(raw_name)
        if isinstance(entry, Mapping):
            entry = {str(k).lower(): v for k, v in entry.items()}
        try:
            out[name] = msgspec.convert(entry, ScheduleSettings)
        except msgspec.ValidationError as err:
            raise _error(name, str(err)) from None
    return out


def _error(name: str, text: str) -> ConfigError:
    match = _AT.match(text)
    assert match is not None  # the pattern accepts any text
    message, path = match.group("msg"), (match.group("path") or "").lstrip(".")
    if found := re.match(r"Object (?:contains unknown|missing required) field `([^`]+)`", message):
        path = f"{path}.{found.group(1)}" if path else found.group(1)
        message = "unknown key" if "unknown" in message else "required"
    key = f"schedules.{name}" + (f".{path}" if path else "")
    return ConfigError(key, message[:1].lower() + message[1:])


def check_scheduler(s: SchedulerSettings, horizon: float) -> None:
    """Cross-field checks of ``[scheduler]`` (``horizon``: ``consumer.horizon``)."""
    if s.interval <= 0:
        raise ConfigError("scheduler.interval", "must be positive")
    if s.lookahead < s.interval:
        raise ConfigError("scheduler.lookahead", "must be >= scheduler.interval")
    if s.lookahead > horizon:
        raise ConfigError("scheduler.lookahead", "must be <= consumer.horizon")
    if s.batch <= 0:
        raise ConfigError("scheduler.batch", f"must be positive, got {s.batch}")
