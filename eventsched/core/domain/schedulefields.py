"""Recurring schedules as data, and the schedule leader's decisions. Pure; any side.

- :func:`spec_from_fields`: a :class:`ScheduleSpec` from the keys a user writes (settings
  ``[schedules.<name>]``, the HTTP API's JSON, ``eventsched schedules add``): ``every`` as a
  duration (``"15m"``, ``"500ms"``, or seconds), ``start``/``end`` as RFC 3339 with an offset;
  :func:`specs_from_settings` does it for every ``[schedules.<name>]`` (``ConfigError``
  naming the key);
- :func:`spec_fields`: the same keys back, JSON-ready; :func:`definition_hash` hashes them;
- :func:`plan`: what the leader publishes now and how far its watermark moves;
- :func:`materialised_after`: the occurrences a deleted schedule had materialised ahead;
- :func:`format_local`: an instant as RFC 3339 with the UTC offset in force in a zone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

import msgspec

from eventsched.core.domain.event import format_time, parse_time
from eventsched.core.domain.schedules import ScheduleSpec, due_occurrences, next_occurrences
from eventsched.core.runtime.errors import ConfigError, DecodeError
from eventsched.core.runtime.units import parse_duration

if TYPE_CHECKING:
    from eventsched.core.runtime.settings import Settings

__all__ = [
    "FIELDS",
    "MAX_CANCELS",
    "Plan",
    "definition_hash",
    "format_every",
    "format_local",
    "materialised_after",
    "plan",
    "spec_fields",
    "spec_from_fields",
    "specs_from_settings",
]

#: The keys of a schedule (besides its name), in the order they are shown.
FIELDS: Final = (
    "type",
    "cron",
    "every",
    "timezone",
    "payload",
    "start",
    "end",
    "misfire",
    "misfire_limit",
    "paused",
)
#: A deleted schedule cancels at most this many materialised occurrences (a lookahead
#: holds lookahead / every of them; a longer list means a tiny interval, not a real need).
MAX_CANCELS: Final = 100_000
_MS: Final = timedelta(milliseconds=1)
_UNITS: Final = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))
_ENCODER: Final = msgspec.json.Encoder(order="sorted")


def spec_from_fields(name: str, fields: Mapping[str, Any]) -> ScheduleSpec:
    """A validated spec; ``ValueError`` whose message starts with the key's name (an
    unknown key too). ``None`` means "the default" for every key but ``type``."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (keys: {', '.join(FIELDS)})")
    given = {k: v for k, v in fields.items() if v is not None}
    if "type" not in given:
        raise ValueError("type: required")
    if "every" in given and not isinstance(given["every"], timedelta):
        given["every"] = _every(given["every"])
    for key in ("start", "end"):
        if isinstance(given.get(key), str):
            try:
                given[key] = parse_time(given[key])
            except DecodeError:
                raise ValueError(
                    f"{key}: {given[key][:60]!r} is not an RFC 3339 time with an offset"
                ) from None
    return ScheduleSpec(name=name, **given)


def _every(value: object) -> timedelta:
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise ValueError(f"every: {err}") from None
    every = timedelta(seconds=seconds)
    if every % _MS:
        raise ValueError(f"every: {value!r} is not a whole number of milliseconds")
    return every


def specs_from_settings(settings: Settings) -> dict[str, ScheduleSpec]:
    """Every ``[schedules.<name>]`` as a spec; ``ConfigError`` naming the first bad key
    (``schedules.nightly.cron``)."""
    specs: dict[str, ScheduleSpec] = {}
    for name, entry in settings.schedules.items():
        fields = {key: getattr(entry, key) for key in FIELDS}
        try:
            specs[name] = spec_from_fields(name, fields)
        except ValueError as err:
            key, _, problem = str(err).partition(": ")
            if key == "name":
                raise ConfigError(f"schedules.{name}", f"name {problem}") from None
            keys = [k for k in key.split(", ") if k in FIELDS] or [key]
            raise ConfigError(f"schedules.{name}.{keys[0]}", problem or str(err)) from None
    return specs


def format_every(every: timedelta) -> str:
    """A duration as the largest unit that divides it: ``15m``, ``1500ms``, ``2d``."""
    ms = every // _MS
    for unit, size in _UNITS:
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def spec_fields(spec: ScheduleSpec) -> dict[str, Any]:
    """The keys of ``spec`` (FIELDS, unset ones as None), JSON-ready."""
    return {
        "type": spec.type,
        "cron": spec.cron,
        "every": None if spec.every is None else format_every(spec.every),
        "timezone": spec.timezone,
        "payload": spec.payload,
        "start": None if spec.start is None else format_time(spec.start),
        "end": None if spec.end is None else format_time(spec.end),
        "misfire": spec.misfire,
        "misfire_limit": spec.misfire_limit,
        "paused": spec.paused,
    }


def definition_hash(spec: ScheduleSpec) -> str:
    """A hash of the name and every key: equal definitions, equal hashes."""
    data = {"name": spec.name, **spec_fields(spec)}
    return hashlib.sha256(_ENCODER.encode(data)).hexdigest()


def format_local(at: datetime, zone: str) -> str:
    """RFC 3339 in ``zone``, with the UTC offset in force then (milliseconds when any)."""
    local = at.astimezone(ZoneInfo(zone))
    return local.isoformat(timespec="milliseconds" if local.microsecond else "seconds")


@dataclass(frozen=True, slots=True)
class Plan:
    """One schedule's share of a leader's pass."""

    #: Occurrences to publish, ascending.
    occurrences: list[datetime]
    #: The watermark once they are acknowledged: everything up to it is materialised.
    through: datetime
    #: Missed occurrences dropped because the consumer would refuse them as too old.
    too_old: int = 0


def plan(
    spec: ScheduleSpec,
    through: datetime | None,
    now: datetime,
    *,
    lookahead: float,
    max_past: float,
    limit: int,
) -> Plan:
    """What to materialise now: :func:`due_occurrences` with the watermark ``through``
    (every occurrence up to it was materialised, so none after it was: it can stand for
    the newest materialised occurrence), capped at ``limit`` occurrences (then the
    watermark stops at the last one, and the next pass goes on from there), without those
    more than ``max_past`` seconds old (``consumer.max_past``: the consumer would send them
    to the dead-letter topic). The watermark otherwise moves to ``now + lookahead``."""
    due = due_occurrences(spec, through, now, lookahead)
    oldest = now - timedelta(seconds=max_past)
    fresh = [at for at in due if at >= oldest]
    too_old = len(due) - len(fresh)
    horizon = now + timedelta(seconds=lookahead)
    if len(fresh) > limit:
        fresh = fresh[:limit]
        horizon = fresh[-1]
    if through is not None:
        horizon = max(horizon, through)
    return Plan(fresh, horizon, too_old)


def materialised_after(
    spec: ScheduleSpec, through: datetime | None, now: datetime
) -> list[datetime]:
    """The occurrences after ``now`` up to the watermark ``through``: materialised, not due
    yet (what deleting the schedule cancels); at most :data:`MAX_CANCELS`."""
    out: list[datetime] = []
    if through is None or through <= now:
        return out
    for at in next_occurrences(spec, now, MAX_CANCELS):
        if at > through:
            break
        out.append(at)
    return out
